"""Checkpoints on S3-compatible storage, against a real SeaweedFS server (tests/servers.py): the
streamed safetensors format (tensors and state trees), both storage backends, keys confined to
their location, resume exactness through S3, re-runnable faults (the store down mid-save and to the
end of a run, corruption after commit), preflight errors, `dvgt ckpt`, remote weights. (SIGTERM
under each restart policy: tests/test_local_runner.py.)"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash
from conftest import free_port, tiny_overrides
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from servers import SeaweedS3

from dvgt.checkpoint import tools
from dvgt.checkpoint.manager import CheckpointManager, rng_state
from dvgt.checkpoint.safetensors_stream import read_safetensors, read_state, write_safetensors, write_state
from dvgt.checkpoint.storage import InvalidKeyError, LocalStorage, StorageError, open_storage
from dvgt.cli import main as cli_main
from dvgt.config import S3Config, load_config
from dvgt.models.weights import read_checkpoint
from dvgt.train import exit_codes
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer, train

DVGT = [sys.executable, "-m", "dvgt"]
SMALL_PARTS = S3Config(part_size_mb=5, concurrency=3)


def sample_tensors():
    return {
        "w": torch.randn(300, 7),
        "half": torch.randn(5).half(),
        "bf": torch.randn(3, 3).bfloat16(),
        "count": torch.tensor(4),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2),
        "ids": torch.arange(9, dtype=torch.int32),
    }


class Collect(bytearray):
    def write(self, data):
        self.extend(data)
        return len(data)


def test_streamed_safetensors_round_trips_through_the_library():
    tensors = sample_tensors()
    ours = Collect()
    size = write_safetensors(tensors, ours, metadata={"step": "3"})
    assert size == len(ours)
    loaded = load_safetensors(bytes(ours))  # the reference reader accepts our stream
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    back = read_safetensors(bytearray(save_safetensors(tensors)))  # and we read the reference writer's files
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_safetensors(bytearray(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"))


def test_optimizer_and_rng_state_round_trip_without_pickle():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "scaler": {}, "nan": float("nan")}
    out = Collect()
    write_state(state, out)
    back = read_state(out)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert sorted(back["optimizer"]["state"]) == [0, 1]  # int keys stay ints, so the optimizer takes it
    assert torch.equal(back["optimizer"]["state"][1]["exp_avg"], state["optimizer"]["state"][1]["exp_avg"])
    assert back["rng"]["python"] == state["rng"]["python"] and math.isnan(back["nan"])
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(back["optimizer"])
    assert torch.equal(
        restored.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"]
    )
    with pytest.raises(TypeError, match="'opt.fn' is a builtin_function_or_method"):
        write_state({"opt": {"fn": len}}, Collect())
    with pytest.raises(ValueError, match="not a state file"):
        read_state(bytearray(save_safetensors({"x": torch.zeros(2)})))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_storage_streams_objects_and_discards_failed_writes(backend, tmp_path, request):
    if backend == "s3":
        request.getfixturevalue("s3_env")
        storage = open_storage("s3://ckpt/storage-test", SMALL_PARTS)
    else:
        storage = LocalStorage(tmp_path)
    data = os.urandom(12 * 2**20 + 123)  # three parts of 5 MB on S3, the last one short
    with storage.open_write("a/big.bin") as writer:
        for start in range(0, len(data), 3 * 2**20):
            writer.write(data[start : start + 3 * 2**20])
    assert writer.size == len(data)  # one checksum, of the parts in order
    assert writer.digests == {"xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert storage.read("a/big.bin") == data
    if backend == "s3":  # parts of one written buffer go up as slices of it; parts gathered from pieces are copied
        taken = []  # into part buffers, reused from part to part
        take = storage.take_buffer
        storage.take_buffer = lambda: taken.append(1) or take()
        with storage.open_write("a/one.bin") as writer:
            writer.write(data)
        assert taken == [] and storage.read("a/one.bin") == data
        with storage.open_write("a/pieces.bin") as writer:
            for start in range(0, len(data), 2**20):
                writer.write(data[start : start + 2**20])
        assert len(taken) == 3 and storage.read("a/pieces.bin") == data
        storage.delete_prefix("a/one.bin")
        storage.delete_prefix("a/pieces.bin")
    hasher = xxhash.xxh3_128()  # ranges arrive out of order; the hasher gets them in order
    assert (
        storage.read("a/big.bin", hasher=hasher, size=len(data)) == data
        and hasher.hexdigest() == writer.digests["xxh3_128"]
    )
    assert storage.read_range("a/big.bin", 5 * 2**20 - 3, 10) == data[5 * 2**20 - 3 : 5 * 2**20 + 7]
    with pytest.raises(RuntimeError, match="serialiser broke"):
        with storage.open_write("a/broken.bin") as writer:
            writer.write(data[: 11 * 2**20])  # two parts already uploaded
            raise RuntimeError("serialiser broke")
    assert storage.list("a") == ["a/big.bin"] and storage.unfinished("") == []
    with pytest.raises(FileNotFoundError, match="a/missing.bin"):
        storage.read("a/missing.bin")
    storage.delete_prefix("a")
    assert storage.list("") == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_keys_outside_the_location_are_refused_before_any_read_or_write(backend, tmp_path, request, capsys):
    """Storage refuses absolute keys and '..' parts on both backends; a manifest listing such a key
    (here '../../../outside.txt', beside a real file there) is refused by `dvgt ckpt verify` and by
    a resume, naming the key, and nothing outside the checkpoint folder is read."""
    if backend == "s3":
        request.getfixturevalue("s3_env")
        uri = "s3://ckpt/confined/run"
    else:
        uri = str(tmp_path / "confined" / "run")
    storage = open_storage(uri, SMALL_PARTS)
    for key in ("../outside.txt", "/etc/passwd", "step_00000001/../../x", "a//b", "a\\..\\b"):
        with pytest.raises(InvalidKeyError, match=re.escape(f"'{key}'")):
            storage.read(key)
        with pytest.raises(InvalidKeyError):
            storage.open_write(key)
    manager = CheckpointManager(uri, s3=SMALL_PARTS)
    manager.save(
        1,
        model_state={"w": torch.ones(3)},
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={"step": 1},
        config_yaml="a: 1\n",
        epoch=0,
    )
    manifest = json.loads(manager.storage.read("step_00000001/manifest.json"))
    outside = "../../../outside.txt"
    manifest["objects"].append({"key": outside, "size": 7, "xxh3_128": xxhash.xxh3_128(b"secret!").hexdigest()})
    (tmp_path / "outside.txt").write_bytes(b"secret!")
    manager.storage.write_bytes("step_00000001/manifest.json", json.dumps(manifest).encode())

    code, out, err = ckpt_cli(capsys, "verify", uri)
    assert code == exit_codes.REFUSED and out == ""
    assert f"lists the object key '{outside}', which is not a path inside the checkpoint folder" in err
    with pytest.raises(ValueError, match=re.escape(outside)):
        manager.load_newest(0, warn=print)


def s3_run(tiny_data_root, run_dir, uri, **extra):
    return load_config(
        "train/dvgt1/demo.yaml",
        tiny_overrides(tiny_data_root, run_dir, **{"checkpoint.uri": uri, "checkpoint.s3.part_size_mb": 5, **extra}),
    )


def train_losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss/objective"] for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def full_run(seaweedfs, tiny_data_root, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (2 epochs of 3) saving to S3 every 2 steps: what resumed runs must match."""
    full = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in seaweedfs.env().items():
            patch.setenv(key, value)
        seaweedfs.make_bucket("ckpt")
        train(s3_run(tiny_data_root, full, "s3://ckpt/exact/full", **{"checkpoint.save_every_steps": 2}))
    return full


def test_resume_through_s3_continues_exactly(s3_env, full_run, tiny_data_root, tmp_path):
    """The same check as the local-folder resume test (tests/test_trainer.py), through S3."""
    full = full_run
    manager = CheckpointManager("s3://ckpt/exact/full")
    assert manager.committed_steps() == [2, 3, 4, 6]
    records = [r for r in read_log(full / "train_log.jsonl") if r["kind"] == "checkpoint"]
    assert [r["step"] for r in records] == [2, 3, 4, 6] and {r["outcome"] for r in records} == {"ok"}
    assert all(
        r["bytes"] > 0
        and r["blocked_s"] >= 0
        and r["upload_s"] > 0
        and r["cost_s"] >= 0
        and r["prune_s"] >= 0
        and r["where"] == f"s3://ckpt/exact/full/step_{r['step']:08d}"
        for r in records
    )

    resumed = tmp_path / "resumed"
    train(
        s3_run(
            tiny_data_root,
            resumed,
            "s3://ckpt/exact/resumed",
            **{"checkpoint.resume_checkpoint_path": "s3://ckpt/exact/full/step_00000002"},
        )
    )
    expected, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    final_a = manager.open(6).model_state()
    final_b = CheckpointManager("s3://ckpt/exact/resumed").open(6).model_state()
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


@pytest.fixture
def own_seaweedfs(tmp_path, monkeypatch):
    """A server of this test's own, to stop and restart without disturbing the session's."""
    server = SeaweedS3(tmp_path / "weed").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.make_bucket("ckpt")
        yield server
    finally:
        server.kill()  # its data is not needed: no orderly shutdown (seconds)


def test_a_save_retries_through_an_outage_and_commits(own_seaweedfs):
    """The store goes down: a save whose retry budget (1 s) is shorter than the outage fails and
    never commits; the next save retries with backoff until the store is back 1 s later and
    commits, its event counting the retries, and removes what the failed save and a killed one left."""
    options = S3Config(part_size_mb=5, concurrency=2, max_attempts=1, connect_timeout_s=1)
    manager = CheckpointManager("s3://ckpt/retry", async_mode="wait", s3=options, retry_budget_s=1.0)
    state = dict(
        model_state={"w": torch.randn(3 * 2**20)},
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={},
        config_yaml="a: 1\n",
        epoch=0,
    )  # 12 MB: a multipart upload
    with manager.storage.open_write("step_00000001/model.safetensors") as writer:  # a killed save's leftover
        writer.write(b"half")
    own_seaweedfs.kill()
    manager.save(2, **state)
    assert manager.wait(60)
    event = manager.stats.last_event
    assert (event.step, event.outcome) == (2, "failed") and "cannot reach the S3 endpoint" in event.error

    manager.retry_budget_s = 60.0
    manager.save(3, **state)
    time.sleep(1)
    own_seaweedfs.start()
    assert manager.wait(60)
    event = manager.stats.last_event
    assert (event.step, event.outcome) == (3, "ok") and event.retries >= 1
    assert manager.committed_steps() == [3] and sorted(manager.step_dirs()) == [3]  # leftovers collected
    assert manager.storage.unfinished("") == []


class HookedLoader:
    """A trainer's data loader that runs a hook before the batch of given steps: the fault injections."""

    def __init__(self, trainer: Trainer, hooks: dict) -> None:
        self.loader, self.trainer, self.hooks = trainer.train_loader, trainer, hooks
        self.batch_sampler = self.loader.batch_sampler

    def __iter__(self):
        for batch in self.loader:
            hook = self.hooks.pop(self.trainer.step + 1, None)
            if hook:
                hook()
            yield batch


def test_store_down_to_the_end_the_next_start_uploads_the_final_checkpoint_and_resumes_exactly(
    own_seaweedfs, full_run, tiny_data_root, tmp_path, capsys
):
    """The store dies after the first commit (step 2) and stays down to the end of the run, which is
    preempted after step 5: the saves of steps 3 and 4 retry and fail, the final checkpoint is
    committed to the local spill folder (the run's result says so: exit code 143, retryable), and
    `dvgt ckpt ls --spill` shows it. The store comes back; the next start uploads it before anything
    else, resumes from it and continues exactly as the uninterrupted run did."""
    uri, spill = "s3://ckpt/outage", tmp_path / "spill"
    settings = {
        "checkpoint.save_every_steps": 2,
        "checkpoint.retry_budget_s": 1,
        "checkpoint.preemption_budget_s": 2,
        "checkpoint.spill_dir": spill,
        "checkpoint.s3.max_attempts": 1,
        "checkpoint.s3.connect_timeout_s": 1,
    }
    trainer = Trainer(s3_run(tiny_data_root, tmp_path / "a", uri, **settings))
    trainer.train_loader = HookedLoader(
        trainer,
        {
            3: lambda: (trainer.checkpoints.wait(60), own_seaweedfs.kill()),  # once step 2 is committed
            5: lambda: trainer._on_sigterm(signal.SIGTERM, None),
        },
    )  # (what SIGTERM does)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert (result["step"], result["preempted"], result["spilled"]) == (5, True, True)
    events = [
        (r["step"], r["outcome"]) for r in read_log(tmp_path / "a" / "train_log.jsonl") if r["kind"] == "checkpoint"
    ]
    assert events[0] == (2, "ok") and {(3, "failed"), (4, "failed")} <= set(events) and events[-1] == (5, "spilled")

    own_seaweedfs.start()
    listed = "\n".join(tools.ls(uri, spill=str(spill)))
    assert re.search(rf"\n\s+5 .*{spill}/step_00000005 \(spilled: uploaded at the next start\)", listed), listed
    assert CheckpointManager(uri).committed_steps() == [2]
    capsys.readouterr()
    resumed = Trainer(s3_run(tiny_data_root, tmp_path / "b", uri, **settings))
    try:
        assert (
            f"uploaded the spilled checkpoint {spill}/step_00000005 to {uri}/step_00000005" in capsys.readouterr().out
        )
        assert resumed.step == 5 and not (spill / "step_00000005").exists()
        resumed.fit()
    finally:
        resumed.close()
    assert CheckpointManager(uri).committed_steps() == [2, 5, 6]
    expected, got = train_losses(full_run), train_losses(tmp_path / "b")
    assert list(got) == [6] and got[6] == pytest.approx(expected[6], rel=1e-6, abs=1e-7)


def test_async_skip_mode_counts_a_skipped_save(s3_env, tmp_path):
    manager = CheckpointManager("s3://ckpt/skip", async_mode="skip", s3=SMALL_PARTS)
    release = threading.Event()
    real_open = manager.storage.open_write
    manager.storage.open_write = lambda key, progress=None: (release.wait(60), real_open(key, progress))[1]
    state = dict(
        model_state={"w": torch.randn(4)},
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={},
        config_yaml="a: 1\n",
        epoch=0,
    )
    manager.save(1, **state)
    skipped = manager.save(2, **state)  # the first is still uploading
    release.set()
    assert skipped.outcome == "skipped" and manager.wait(60)
    assert (manager.stats.ok, manager.stats.skipped, manager.committed_steps()) == (1, 1, [1])


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DVGT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {}))
    )


def save_small_checkpoints(uri: str, steps, tiny_data_root, tmp_path) -> CheckpointManager:
    """Committed checkpoints of a tiny model written by the manager directly (no training: fast)."""
    trainer = Trainer(s3_run(tiny_data_root, tmp_path, uri))
    for step in steps:
        trainer.step = step
        trainer.save(final=True)
    trainer.log.close()
    trainer.close()
    return CheckpointManager(uri)


def test_corrupt_object_is_named_by_verify_and_resume_falls_back(s3_env, tiny_data_root, tmp_path, capsys):
    save_small_checkpoints("s3://ckpt/corrupt", [1, 2, 3], tiny_data_root, tmp_path)
    s3_env.client().put_object(Bucket="ckpt", Key="corrupt/step_00000003/optimizer.safetensors", Body=b"bit rot")

    done = run_cli("ckpt", "verify", "--all", "s3://ckpt/corrupt", env=s3_env.env())
    assert done.returncode == 1
    assert re.search(r"step 3: 5 objects, 1 BAD: optimizer.safetensors", done.stdout), done.stdout
    assert "step 2: 5 objects, all intact" in done.stdout

    capsys.readouterr()
    trainer = Trainer(s3_run(tiny_data_root, tmp_path, "s3://ckpt/corrupt"))  # checkpoint.resume=auto
    out = capsys.readouterr().out
    assert re.search(r"warning: .*step_00000003: object 'optimizer.safetensors' does not match.*falling back", out), out
    assert "Resumed from s3://ckpt/corrupt/step_00000002 at step 2" in out and trainer.step == 2
    trainer.close()


def ckpt_cli(capsys, *args) -> tuple:
    """`dvgt ckpt ...` in this process (the subprocess path is covered by the verify test above):
    (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["ckpt", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_ckpt_cli_lists_shows_exports_and_prunes(s3_env, tiny_data_root, tmp_path, capsys):
    manager = save_small_checkpoints("s3://ckpt/cli", [1, 2, 3], tiny_data_root, tmp_path)
    capsys.readouterr()
    code, out, _ = ckpt_cli(capsys, "ls", "s3://ckpt/cli")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["1", "2", "3"]
    assert out.splitlines()[1].endswith("s3://ckpt/cli/step_00000001")  # where each checkpoint is
    code, out, _ = ckpt_cli(capsys, "show", "s3://ckpt/cli/step_00000002")
    assert "step 2, epoch 0, world size 1" in out and "model.safetensors" in out
    assert "model.name=dvgt1, model.size=tiny" in out
    code, out, _ = ckpt_cli(capsys, "export", "s3://ckpt/cli", "--out", tmp_path / "export")
    assert code == 0
    weights = read_checkpoint(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in manager.open(3).model_state().items())
    assert (tmp_path / "export" / "config.yaml").read_text().startswith("exp_name")
    manager.storage.write_bytes("step_00000002/manifest.json", b"{not json")  # one unreadable manifest ...
    code, out, _ = ckpt_cli(capsys, "ls", "s3://ckpt/cli")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]  # ... hides no other
    assert "UNREADABLE: s3://ckpt/cli/step_00000002/manifest.json is not valid JSON" in lines[2]
    code, out, _ = ckpt_cli(capsys, "prune", "s3://ckpt/cli", "--keep", "1")
    assert "deleted steps [1, 2]" in out
    assert manager.committed_steps() == [3]


def test_pretrained_weights_load_from_s3(s3_env):
    state = sample_tensors()
    open_storage("s3://ckpt/weights").write_bytes("dvgt1.safetensors", save_safetensors(state))
    loaded = read_checkpoint("s3://ckpt/weights/dvgt1.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint("s3://ckpt/weights/missing.pt")


@pytest.mark.parametrize(
    "env, uri, message, exit_code",
    [
        (
            {"AWS_SECRET_ACCESS_KEY": "wrong"},
            "s3://ckpt/x",
            "credentials were rejected.*AWS_SECRET_ACCESS_KEY",
            exit_codes.REFUSED,
        ),
        ({}, "s3://no-such-bucket/x", "bucket does not exist", exit_codes.REFUSED),
        (
            {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"},
            "s3://ckpt/x",
            "cannot reach the S3 endpoint.*AWS_ENDPOINT_URL_S3",
            exit_codes.TEMPORARY,
        ),  # a restart may find it up
    ],
)
def test_storage_problems_stop_the_trainer_before_training(
    s3_env, tiny_data_root, tmp_path, monkeypatch, env, uri, message, exit_code
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(StorageError, match=message) as error:
        Trainer(s3_run(tiny_data_root, tmp_path, uri))
    print(f"failed after {time.monotonic() - started:.1f} s")
    assert exit_codes.for_error(error.value) == exit_code
    assert not (tmp_path / "train_log.jsonl").exists()  # before the model and the log


def test_storage_problem_is_one_clear_cli_line(s3_env, tiny_data_root, tmp_path):
    done = run_cli(
        "train",
        "--config=train/dvgt1/demo.yaml",
        *tiny_overrides(tiny_data_root, tmp_path),
        "checkpoint.uri=s3://no-such-bucket/x",
        env=s3_env.env(),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "error: checkpoint storage s3://no-such-bucket/x: the bucket does not exist; create it or fix checkpoint.uri"
    ], done.stderr

"""Checkpoints on S3-compatible storage, against a real SeaweedFS server (tests/servers.py): the
streamed safetensors format (tensors and state trees), both storage backends, resume exactness
through S3, faults (server down mid-upload, corruption after commit, SIGTERM), preflight errors,
`dvgt ckpt`, remote weights."""

import hashlib
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from conftest import free_port, tiny_overrides
from dvgt.checkpoint.manager import CheckpointManager, rng_state
from dvgt.cli import main as cli_main
from dvgt.checkpoint.safetensors_stream import read_safetensors, read_state, write_safetensors, write_state
from dvgt.checkpoint.storage import LocalStorage, StorageError, open_storage
from dvgt.config import S3Config, load_config
from dvgt.models.weights import read_checkpoint
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer, train
from servers import SeaweedS3

torch.set_num_threads(1)
DVGT = [sys.executable, "-m", "dvgt"]
SMALL_PARTS = S3Config(part_size_mb=5, concurrency=3)


def sample_tensors():
    return {"w": torch.randn(300, 7), "half": torch.randn(5).half(), "bf": torch.randn(3, 3).bfloat16(),
            "count": torch.tensor(4), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 2),
            "ids": torch.arange(9, dtype=torch.int32)}


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
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
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
            writer.write(data[start:start + 3 * 2**20])
    assert writer.size == len(data)  # the digests cover the parts in order, hashed beside the upload
    assert writer.digests == {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert storage.read("a/big.bin") == data
    assert storage.read_range("a/big.bin", 5 * 2**20 - 3, 10) == data[5 * 2**20 - 3:5 * 2**20 + 7]
    with pytest.raises(RuntimeError, match="serialiser broke"):
        with storage.open_write("a/broken.bin") as writer:
            writer.write(data[:11 * 2**20])  # two parts already uploaded
            raise RuntimeError("serialiser broke")
    assert storage.list("a") == ["a/big.bin"] and storage.unfinished("") == []
    with pytest.raises(FileNotFoundError, match="a/missing.bin"):
        storage.read("a/missing.bin")
    storage.delete_prefix("a")
    assert storage.list("") == []


def s3_run(tiny_data_root, run_dir, uri, **extra):
    return load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, run_dir, **{
        "checkpoint.uri": uri, "checkpoint.s3.part_size_mb": 5, **extra}))


def train_losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss/objective"] for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


def test_resume_through_s3_continues_exactly(s3_env, tiny_data_root, tmp_path):
    """The same check as the local-folder resume test (tests/test_trainer.py), through S3."""
    full = tmp_path / "full"
    train(s3_run(tiny_data_root, full, "s3://ckpt/exact/full", **{"checkpoint.save_every_steps": 2}))
    manager = CheckpointManager("s3://ckpt/exact/full")
    assert manager.committed_steps() == [2, 3, 4, 6]
    records = [r for r in read_log(full / "train_log.jsonl") if r["kind"] == "checkpoint"]
    assert [r["step"] for r in records] == [2, 3, 4, 6] and {r["outcome"] for r in records} == {"ok"}
    assert all(r["bytes"] > 0 and r["blocked_s"] >= 0 and r["upload_s"] > 0 for r in records)

    resumed = tmp_path / "resumed"
    train(s3_run(tiny_data_root, resumed, "s3://ckpt/exact/resumed",
                 **{"checkpoint.resume_checkpoint_path": "s3://ckpt/exact/full/step_00000002"}))
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
        server.stop()


def test_server_down_during_upload_never_commits_and_the_next_save_succeeds(own_seaweedfs, tiny_data_root, tmp_path):
    trainer = Trainer(s3_run(tiny_data_root, tmp_path, "s3://ckpt/fault", **{
        "checkpoint.s3.max_attempts": 2, "checkpoint.s3.connect_timeout_s": 1}))
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))
    trainer.save()
    assert trainer.checkpoints.wait(60) and trainer.checkpoints.stats.last_committed_step == 1

    # Hold the next save after its first object, stop the server, let the save go on.
    storage, real_open = trainer.checkpoints.storage, trainer.checkpoints.storage.open_write
    first_written, server_down = threading.Event(), threading.Event()

    def open_write(key, progress=None):
        if key.endswith("optimizer.safetensors"):
            first_written.set()
            server_down.wait(60)
        return real_open(key, progress)

    storage.open_write = open_write
    trainer.train_step(next(batches))
    trainer.save()  # step 2, in the background
    assert first_written.wait(60)
    own_seaweedfs.stop()
    server_down.set()
    assert trainer.checkpoints.wait(120)
    event = trainer.checkpoints.stats.last_event
    assert (event.step, event.outcome) == (2, "failed") and "cannot reach the S3 endpoint" in event.error
    record = trainer.train_step(next(batches))  # training goes on while the server is down
    assert record["loss/objective"] > 0

    own_seaweedfs.start()
    storage.open_write = real_open
    manager = CheckpointManager("s3://ckpt/fault")
    assert manager.committed_steps() == [1]
    assert manager.latest().step == 1  # step 2's model object exists, but without a manifest it is invisible
    trainer.save()  # step 3
    assert trainer.checkpoints.wait(60) and trainer.checkpoints.stats.last_event.outcome == "ok"
    assert manager.committed_steps() == [1, 3]
    assert sorted(manager.step_dirs()) == [1, 3]  # step 2's leftovers were collected
    assert manager.storage.unfinished("") == []
    trainer.log.close()
    logged = [(r["step"], r["outcome"]) for r in read_log(tmp_path / "train_log.jsonl") if r["kind"] == "checkpoint"]
    assert logged == [(1, "ok"), (2, "failed"), (3, "ok")]
    trainer.close()


def test_async_skip_mode_counts_a_skipped_save(s3_env, tmp_path):
    manager = CheckpointManager("s3://ckpt/skip", async_mode="skip", s3=SMALL_PARTS)
    release = threading.Event()
    real_open = manager.storage.open_write
    manager.storage.open_write = lambda key, progress=None: (release.wait(60), real_open(key, progress))[1]
    state = dict(model_state={"w": torch.randn(4)}, optimizer_state={"state": {}, "param_groups": []},
                 trainer_state={}, config_yaml="a: 1\n", epoch=0)
    manager.save(1, **state)
    skipped = manager.save(2, **state)  # the first is still uploading
    release.set()
    assert skipped.outcome == "skipped" and manager.wait(60)
    assert (manager.stats.ok, manager.stats.skipped, manager.committed_steps()) == (1, 1, [1])


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*DVGT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


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
    """`dvgt ckpt ...` in this process (the subprocess path is covered by the verify test above)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["ckpt", *map(str, args)])
    return exit_info.value.code, capsys.readouterr().out


def test_ckpt_cli_lists_shows_exports_and_prunes(s3_env, tiny_data_root, tmp_path, capsys):
    manager = save_small_checkpoints("s3://ckpt/cli", [1, 2, 3], tiny_data_root, tmp_path)
    capsys.readouterr()
    code, out = ckpt_cli(capsys, "ls", "s3://ckpt/cli")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["1", "2", "3"]
    code, out = ckpt_cli(capsys, "show", "s3://ckpt/cli/step_00000002")
    assert "step 2, epoch 0, world size 1" in out and "model.safetensors" in out
    assert "model.name=dvgt1, model.size=tiny" in out
    code, out = ckpt_cli(capsys, "export", "s3://ckpt/cli", "--out", tmp_path / "export")
    assert code == 0
    weights = read_checkpoint(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in manager.open(3).model_state().items())
    assert (tmp_path / "export" / "config.yaml").read_text().startswith("exp_name")
    code, out = ckpt_cli(capsys, "prune", "s3://ckpt/cli", "--keep", "1")
    assert "deleted steps [1, 2]" in out
    assert manager.committed_steps() == [3]


def test_pretrained_weights_load_from_s3(s3_env):
    state = sample_tensors()
    open_storage("s3://ckpt/weights").write_bytes("dvgt1.safetensors", save_safetensors(state))
    loaded = read_checkpoint("s3://ckpt/weights/dvgt1.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint("s3://ckpt/weights/missing.pt")


@pytest.mark.parametrize("env, uri, message", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://ckpt/x", "credentials were rejected.*AWS_SECRET_ACCESS_KEY"),
    ({}, "s3://no-such-bucket/x", "bucket does not exist"),
    ({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}, "s3://ckpt/x", "cannot reach the S3 endpoint.*AWS_ENDPOINT_URL_S3"),
])
def test_storage_problems_stop_the_trainer_before_training(s3_env, tiny_data_root, tmp_path, monkeypatch, env, uri, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(StorageError, match=message):
        Trainer(s3_run(tiny_data_root, tmp_path, uri))
    print(f"failed after {time.monotonic() - started:.1f} s")
    assert not (tmp_path / "train_log.jsonl").exists()  # before the model and the log


def test_storage_problem_is_one_clear_cli_line(s3_env, tiny_data_root, tmp_path):
    done = run_cli("train", "--config=train/dvgt1/demo.yaml", *tiny_overrides(tiny_data_root, tmp_path),
                   "checkpoint.uri=s3://no-such-bucket/x", env=s3_env.env())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: checkpoint storage s3://no-such-bucket/x: the bucket does not exist; create it or fix "
                     "checkpoint.uri"], done.stderr


def wait_for_step(log: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if log.exists() and any(r["kind"] == "train" and r["step"] >= step for r in read_log(log)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {log}")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_commits_a_final_checkpoint_and_a_rerun_resumes(s3_env, tiny_data_root, tmp_path, ranks, capsys):
    """SIGTERM to `dvgt train` (1 rank) or to the torchrun launcher (2 gloo ranks, dvgt.train.launch):
    the step in progress finishes, a final checkpoint is committed, the exit code is 143."""
    uri = f"s3://ckpt/sigterm-{ranks}"
    overrides = tiny_overrides(tiny_data_root, tmp_path, max_epochs=1000, **{"checkpoint.uri": uri,
                                                                           "limit_val_batches": 0})
    entry = ([sys.executable, "-m", "dvgt.train.launch", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
              "-m", "dvgt.train"] if ranks > 1 else [*DVGT, "train"])
    env = dict(os.environ, **s3_env.env(), OMP_NUM_THREADS="1")
    process = subprocess.Popen([*entry, "--config=train/dvgt1/demo.yaml", *overrides], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "train_log.jsonl", 2, process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err[-3000:]
    last_step = max(r["step"] for r in read_log(tmp_path / "train_log.jsonl") if r["kind"] == "train")
    manager = CheckpointManager(uri)
    assert manager.committed_steps()[-1] == last_step
    assert len([o for o in manager.latest().manifest["objects"] if o["key"].startswith("rng/")]) == ranks

    resumed = Trainer(s3_run(tiny_data_root, tmp_path / "rerun", uri))  # the re-run (checkpoint.resume=auto)
    assert resumed.step == last_step and "Resumed from" in capsys.readouterr().out
    resumed.close()

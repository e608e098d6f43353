"""The trainer end to end on CPU: resume exactness, accumulation, the non-finite guard, frozen
modules, clipping coverage, two-process torchrun, and learning on the demo config."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_overrides

from dvgt.checkpoint.manager import CheckpointManager
from dvgt.config import load_config
from dvgt.data import format as fmt
from dvgt.data.loader import load_clip
from dvgt.data.scene_dataset import DatasetSpec, SceneDataset
from dvgt.train.checkpoint_cost import CheckpointCost
from dvgt.train.logger import read_log
from dvgt.train.loop import CheckpointMismatchError, NonFiniteLossError, Trainer, train

DVGT = [sys.executable, "-m", "dvgt"]
pytestmark = pytest.mark.torch_threads(2)  # the in-process training runs (the suite ran them with 2)


def train_losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss/objective"] for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


def make_trainer(tiny_data_root, run_dir, **extra) -> Trainer:
    return Trainer(load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, run_dir, **extra)))


def test_resumed_run_continues_exactly(tiny_data_root, tmp_path):
    full = tmp_path / "full"
    result = train(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(tiny_data_root, full, num_workers=1, **{"checkpoint.save_every_steps": 2}),
        )
    )
    assert result["step"] == 6
    manager = CheckpointManager(str(full / "ckpts"))
    assert manager.committed_steps() == [2, 3, 4, 6]  # every 2 steps, and at the end of each epoch
    manifest = manager.open(2).manifest
    assert {o["key"] for o in manifest["objects"]} == {
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.safetensors",
        "config.yaml",
        "rng/rank_00000.safetensors",
    }

    resumed = tmp_path / "resumed"  # "stopped after step 2": continue from that checkpoint elsewhere
    train(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(
                tiny_data_root,
                resumed,
                num_workers=1,
                **{"checkpoint.resume_checkpoint_path": full / "ckpts" / "step_00000002"},
            ),
        )
    )
    expected, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    final_a = CheckpointManager(str(full / "ckpts")).open(6).model_state()
    final_b = CheckpointManager(str(resumed / "ckpts")).open(6).model_state()
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_auto_resume_picks_up_the_newest_checkpoint(tiny_data_root, tmp_path):
    run = tmp_path / "run"
    train(load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, run, max_epochs=1)))
    trainer = make_trainer(tiny_data_root, run, max_epochs=2)  # checkpoint.resume=auto is the default
    assert (trainer.step, trainer.epoch) == (3, 1)
    trainer.close()
    fresh = make_trainer(tiny_data_root, run, max_epochs=2, **{"checkpoint.resume": "never"})
    assert fresh.step == 0
    fresh.close()


def duplicated_batch(tiny_data_root, copies: int) -> dict:
    """`copies` copies of one 2-frame clip (every camera, 32 x 64) of the tiny training split, scaled by 0.1."""
    spec = DatasetSpec(
        root=tiny_data_root,
        parquet=fmt.Tree(tiny_data_root, "demo").parquet("train"),
        clip_split="DVGT1",
        fixed_num_frames=2,
        fixed_aspect_ratio=2.0,
        image_width=64,
        gt_scale_factor=0.1,
    )
    clip = load_clip(SceneDataset(spec), 0)
    return {k: (torch.cat([v] * copies) if torch.is_tensor(v) else v * copies) for k, v in clip.items()}


@pytest.mark.parametrize("accum_steps", [2, 8])
def test_gradient_accumulation_matches_one_pass(tiny_data_root, tmp_path, accum_steps):
    """Two identical clips: split into chunks or not, the gradients reaching the optimizer are the
    same; more chunks than clips is fine. (Switched off: DINOv3's random RoPE rescale in train mode,
    since each chunk would draw its own, and the quantile outlier filter, whose cut-off depends on
    how many pixels it sees.)"""
    batch = duplicated_batch(tiny_data_root, 2)
    grads = []
    for accum in (1, accum_steps):
        trainer = make_trainer(
            tiny_data_root, tmp_path / f"a{accum}", accum_steps=accum, **{"loss.point.valid_range": -1}
        )
        trainer.model.aggregator.patch_embed.rope_embed.rescale_coords = None
        seen = {}
        trainer.optimizer.step = lambda seen=seen, model=trainer.model: seen.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )
        assert not trainer.train_step(batch)["skipped"]
        grads.append(seen)
        trainer.close()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    worst = max(float((grads[0][n] - grads[1][n]).norm() / (grads[0][n].norm() + 1e-12)) for n in grads[0])
    print(f"largest relative gradient difference: {worst:.2e}")
    assert worst < 1e-5  # float32 summation order; a wrong chunk weighting would be off by ~50%


def test_nonfinite_steps_are_skipped_counted_commit_nothing_and_stop_the_run(tiny_data_root, tmp_path):
    """A step with a non-finite loss is skipped on the device (the weights stay as they were) and
    counted when the steps are read; no checkpoint is committed while the last step was skipped; a
    run of max_consecutive_nonfinite of them stops the run naming the steps, after counting them all."""
    trainer = make_trainer(
        tiny_data_root, tmp_path, **{"optim.max_consecutive_nonfinite": 3, "logging.metrics": "false"}
    )
    batch = duplicated_batch(tiny_data_root, 1)
    bad = dict(batch, images=batch["images"].clone().fill_(float("nan")))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(2):
        trainer.train_step(bad)
    assert [(r["step"], r["skipped"], r["nonfinite_skipped"]) for r in trainer.read_steps()] == [
        (1, True, 1),
        (2, True, 2),
    ]
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    state = trainer.optimizer.state_dict()["state"].values()  # AdamW's state stays as created: step 0, no moments
    assert state and all(int(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in state)
    trainer.save()
    assert trainer.checkpoints.committed_steps() == []  # the last step was skipped: nothing committed
    trainer.train_step(batch)  # a good step resets the run of skips ...
    assert not trainer.read_steps()[-1]["skipped"] and trainer.nonfinite_in_a_row == 0
    trainer.save()
    assert trainer.checkpoints.wait(60) and trainer.checkpoints.committed_steps() == [3]
    for _ in range(3):
        trainer.train_step(bad)
    with pytest.raises(
        NonFiniteLossError,
        match=r"steps 4-6 \(3 in a row\) had a non-finite loss.*"
        r"optim.max_consecutive_nonfinite \(now 3\)",
    ):
        trainer._record_steps()  # ... and three in a row stop it
    assert trainer.nonfinite_total == 5 and trainer.checkpoints.committed_steps() == [3]
    trainer.log.close()
    log = read_log(tmp_path / "train_log.jsonl")
    assert [r["nonfinite_skipped"] for r in log if "nonfinite_skipped" in r][-1] == 5  # the last one counted too
    skipped = [r for r in log if r.get("kind") == "checkpoint"]
    assert [(r["step"], r["outcome"]) for r in skipped] == [(2, "skipped")] and "was skipped as non-finite" in skipped[
        0
    ]["error"]
    trainer.close()


def test_the_training_step_does_not_synchronise_with_the_device(tiny_data_root, tmp_path):
    """Counted on CPU: every call that would make the host wait for the device (.item(), .tolist(),
    bool/float/int of a tensor, .numpy(), .cpu()) made by the training loop's code (the loop, its
    ranks' agreement, clipping, the optimizer step, checkpoints, metrics) over 9 steps of the loop
    with logging.log_freq=3: only the reads at the logging interval (steps 1, 3, 6, 9), one each.
    Not counted: the data pipeline, and the model's and losses' own code (printed when they sync)."""
    trainer = make_trainer(
        tiny_data_root, tmp_path, limit_val_batches=0, max_epochs=1, limit_train_batches=9, **{"logging.log_freq": 3}
    )
    loop_code = (
        "/dvgt/train/loop.py",
        "/dvgt/train/distributed.py",
        "/dvgt/train/clipping.py",
        "/dvgt/train/optim.py",
        "/dvgt/train/checkpoint_cost.py",
        "/dvgt/checkpoint/",
        "/dvgt/metrics/",
    )
    counted, elsewhere, counting = [], set(), [False]
    originals = {
        name: getattr(torch.Tensor, name)
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
    }

    def counter(name, original):
        def call(self, *args, **kwargs):
            if counting[0]:  # the innermost frame of dvgt's own code made (or led to) the call
                frame = next((f for f in traceback.extract_stack()[-2::-1] if "/dvgt/" in f.filename), None)
                where = (
                    f"{name} at {frame.filename.split('/dvgt/')[-1]}:{frame.lineno} ({frame.name})" if frame else name
                )
                (counted.append if frame and any(part in frame.filename for part in loop_code) else elsewhere.add)(
                    where
                )
            return original(self, *args, **kwargs)

        return call

    loader = trainer.train_loader

    class Uncounted:  # the data pipeline is not the training loop
        batch_sampler = loader.batch_sampler

        def __iter__(self):
            for batch in loader:
                counting[0] = True
                yield batch
                counting[0] = False

    trainer.train_loader = Uncounted()
    trainer._final_save = lambda preempted: False  # (a save copies the state off the device: not a step)
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counter(name, original))
        trainer.fit()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        trainer.close()
    print("not the loop's:", sorted(elsewhere))
    assert trainer.step == 9
    assert len(counted) == 4 and all(
        call.startswith("tolist at train/loop.py") and "(read_steps)" in call for call in counted
    ), counted


EXIT_WITH_A_SAVE_RUNNING = """
import sys, threading, time, torch
from dvgt.cli import exit_process
def upload():  # a checkpoint thread still inside native code (torch) when the process ends
    a = torch.randn(1000, 1000)
    while True:
        a = (a @ a).tanh_()
threading.Thread(target=upload, name="dvgt-checkpoint-7", daemon=True).start()
time.sleep(0.3)
exit_process(143) if sys.argv[1] == "dvgt" else sys.exit(143)
"""


def test_an_exit_with_a_checkpoint_thread_still_running_is_not_an_abort():
    """The exit-time abort ("terminate called without an active exception", exit 134: a needless
    restart) comes from a daemon thread caught inside native code while the interpreter shuts down,
    as a checkpoint thread is when a run ends before its upload does (preempted past its budget, or
    stopped by an error): plain sys.exit aborts, the CLI's exit keeps the exit code."""

    def run(how: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", EXIT_WITH_A_SAVE_RUNNING, how],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )

    plain = run("plain")
    assert plain.returncode == -signal.SIGABRT and "terminate called without an active exception" in plain.stderr
    ours = run("dvgt")
    assert ours.returncode == 143 and "terminate" not in ours.stderr


def test_checkpoint_cost_is_the_extra_time_of_the_steps_a_save_overlaps():
    cost = CheckpointCost(window=4)
    for step_time in (1.0, 1.2, 0.8, 1.0, 9.0):  # the median of the last 4 quiet steps is 1.0 (9.0 is not one of them)
        cost.observe(step_time, saving=step_time == 9.0)
    cost.observe(1.5, saving=True)
    assert cost.finish() == pytest.approx(8.0 + 0.5) and cost.finish() == 0.0  # then it starts over
    cost.observe(0.9, saving=True)  # a save that overlapped only a step faster than usual costs nothing
    assert cost.finish() == 0.0
    cost.add(0.25)  # saved between epochs, outside any step
    assert cost.finish() == 0.25


def test_frozen_modules_stay_unchanged(tiny_data_root, tmp_path):
    trainer = make_trainer(tiny_data_root, tmp_path, **{"optim.frozen_module_names": "[aggregator.patch_embed.*]"})
    frozen = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("aggregator.patch_embed.")
    }
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("point_head.")}
    trainer.step = 5
    trainer.train_step(duplicated_batch(tiny_data_root, 1))
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)
    assert any(not torch.equal(trained[n], params[n]) for n in trained)
    trainer.close()


def test_bad_frozen_glob_and_uncovered_clipping_are_refused(tiny_data_root, tmp_path):
    with pytest.raises(ValueError, match="glob 'aggregater.*' matches no parameter"):
        make_trainer(tiny_data_root, tmp_path, **{"optim.frozen_module_names": "[aggregater.*]"})
    with pytest.raises(ValueError, match="does not cover .* trainable parameter.*ego_pose_head"):
        make_trainer(
            tiny_data_root,
            tmp_path,
            **{"optim.gradient_clip": "[{module_name: [aggregator], max_norm: 1.0}, {module_name: [point_head]}]"},
        )


def test_two_process_torchrun_keeps_replicas_identical(tiny_data_root, tmp_path):
    """torchrun with 2 CPU ranks (gloo); every step each rank checks that all ranks hold bit-identical
    parameters (distributed.verify_replicas) and the run fails otherwise."""
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "dvgt.train",
        "--config=train/dvgt1/demo.yaml",
        "--debug",
        *tiny_overrides(tiny_data_root, run, **{"distributed.verify_replicas": "true", "accum_steps": 2}),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 7))  # 3 steps per epoch (limit_train_batches), 2 epochs
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    manifest = CheckpointManager(str(run / "ckpts")).latest().manifest
    assert manifest["world_size"] == 2
    assert {"rng/rank_00000.safetensors", "rng/rank_00001.safetensors"} <= {o["key"] for o in manifest["objects"]}


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*DVGT, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def no_checkpoints(run_dir: Path) -> bool:
    return not (run_dir / "ckpts").exists() or not any((run_dir / "ckpts").iterdir())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
        (["max_epochs=many"], "'max_epochs'.*expects int"),
        (
            ["data.root=/nonexistent/dvgt", "data.train.datasets=[{dataset: nuscene, split: train}]"],
            "parquet '/nonexistent/dvgt/data_annotation/.*/nuscene_train.parquet' does not exist; fix data.train.datasets\\[0\\]",
        ),
        (
            ["checkpoint.direct_load_pretrained_weights_path=/nonexistent/dvgt1.pt"],
            "checkpoint.direct_load_pretrained_weights_path: weights file '/nonexistent/dvgt1.pt' does not exist",
        ),
        (
            ["checkpoint.load_pretrained_weights_path=/nonexistent/model.safetensors"],
            "checkpoint.load_pretrained_weights_path: weights file '/nonexistent/model.safetensors' does not exist",
        ),
        (
            ["checkpoint.resume_checkpoint_path=/nonexistent/step_00000010"],
            "resume_checkpoint_path '/nonexistent/step_00000010' is not a committed checkpoint",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_no_checkpoint(tiny_data_root, tmp_path, overrides, message):
    run = tmp_path / "bad"
    done = run_cli("train", "--config=train/dvgt1/demo.yaml", *tiny_overrides(tiny_data_root, run), *overrides)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert no_checkpoints(run)


def test_unreadable_image_names_the_file(tiny_data_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_root, data)
    for image in (data / fmt.IMAGE_DIR / "demo").rglob("synthetic-train-*/**/*.jpg"):
        image.write_bytes(b"not a jpeg")  # every training image: the first batch meets one
    run = tmp_path / "run"
    done = run_cli(
        "train",
        "--config=train/dvgt1/demo.yaml",
        *tiny_overrides(data, run, **{"max_epochs": 1, "limit_val_batches": 0}),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.match(r"error: cannot decode image file '.*synthetic-train-\d+/CAM_\w+/\w+\.jpg'", done.stderr)
    assert done.stderr.count("\n") == 1 and no_checkpoints(run)


def test_pretrained_weights_load_and_mismatches_are_reported(tiny_data_root, tmp_path):
    trainer = make_trainer(tiny_data_root, tmp_path / "source")
    state = trainer.model.state_dict()
    trainer.close()
    good = tmp_path / "good.pt"
    torch.save({"model": state}, good)
    loaded = make_trainer(
        tiny_data_root,
        tmp_path / "a",
        **{"checkpoint.direct_load_pretrained_weights_path": good, "checkpoint.strict": "true"},
    )
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())
    loaded.close()

    bad_state = {k: v for k, v in state.items() if not k.startswith("point_head.scratch.output_conv2")}
    bad_state["extra_head.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pt"
    torch.save(bad_state, bad)
    run = tmp_path / "b"
    done = run_cli(
        "train",
        "--config=train/dvgt1/demo.yaml",
        *tiny_overrides(tiny_data_root, run),
        f"checkpoint.direct_load_pretrained_weights_path={bad}",
        "checkpoint.strict=true",
    )
    assert done.returncode == 2
    assert "point_head.scratch.output_conv2" in done.stderr and "extra_head.weight" in done.stderr
    assert no_checkpoints(run)


def test_resuming_another_models_checkpoint_is_one_readable_summary(tiny_data_root, tmp_path):
    """A checkpoint of the tiny model resumed by a small one: counts, a few keys of each kind and
    the likely cause (model.size differs), in one screen; not hundreds of keys on one line."""
    trainer = make_trainer(tiny_data_root, tmp_path / "tiny")
    trainer.save(final=True)
    trainer.close()
    with pytest.raises(CheckpointMismatchError) as error:
        make_trainer(
            tiny_data_root,
            tmp_path / "small",
            **{
                "model.size": "small",
                "checkpoint.resume_checkpoint_path": tmp_path / "tiny" / "ckpts" / "step_00000000",
            },
        )
    message = str(error.value)
    print(message)
    assert len(message) < 2500 and len(message.splitlines()) <= 25
    assert re.search(r"loaded \d+ of \d+ model entries; \d+ missing, \d+ unexpected, \d+ shape mismatched", message)
    assert "Likely cause: the checkpoint was written with model.size=tiny (this run: small)" in message


def test_corrupt_checkpoint_is_refused_on_resume(tiny_data_root, tmp_path):
    run = tmp_path / "run"
    train(load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, run, max_epochs=1)))
    model_file = run / "ckpts" / "step_00000003" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    done = run_cli("train", "--config=train/dvgt1/demo.yaml", *tiny_overrides(tiny_data_root, run))
    assert done.returncode == 2
    assert "model.safetensors" in done.stderr and "corrupt" in done.stderr


def test_model_info_cli_prints_the_layout_without_weights():
    done = run_cli("model-info", "--config=train/dvgt1/default.yaml", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["num_parameters"] == 1_732_105_522 and len(info["state_dict"]) == 1798
    assert info["state_dict"]["aggregator.temporal_pos_embed"] == [[1, 48, 1024], "float32"]
    small = json.loads(run_cli("model-info", "--config=train/dvgt1/default.yaml", "model.size=small", "--json").stdout)
    assert small["num_parameters"] < info["num_parameters"] / 50


def test_data_synth_cli_writes_an_official_tree(tmp_path):
    done = run_cli("data", "synth", "--out", tmp_path, "--splits", "val", "--scenes", "1")
    assert done.returncode == 0, done.stderr
    table = fmt.read_table(fmt.Tree(tmp_path, "demo").parquet("val"))
    assert set(table.scene_id.to_pylist()) == {"synthetic-val-0000"} and table.num_rows == 12 * 8


def test_python_api_builds_and_runs_the_model(tmp_path):
    import dvgt

    model = dvgt.build_model("train/dvgt1/default.yaml", overrides=["model.size=tiny"], device="cpu")
    out = model(torch.rand(1, 2, 2, 3, 32, 64))
    assert out["points"].shape == (1, 2, 2, 32, 64, 3) and out["absolute_ego_pose_enc"].shape == (1, 2, 7)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    again = dvgt.build_model("train/dvgt1/default.yaml", overrides=["model.size=tiny"], weights=str(weights))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tensorboard_option_writes_event_files(tiny_data_root, tmp_path):
    train(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(tiny_data_root, tmp_path, max_epochs=1, **{"logging.tensorboard": "true"}),
        )
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_demo_config_learns(tmp_path):
    """The demo stage as shipped (small model, synthetic data), shortened to 2 of its 6 epochs: the
    training loss, the held-out objective and the held-out chamfer distance must all drop clearly
    (measured: chamfer 23.2 -> 18.8-19.3 m, completeness 17.4 -> 13.5 m, objective 9.9 -> 4.3 after 80 steps;
    the exact curve moves with the CPU's thread count, hence the margins)."""
    run = tmp_path / "demo"
    cfg = load_config(
        "train/dvgt1/demo.yaml",
        [
            "max_epochs=2",
            f"logging.log_dir={run}",
            f"checkpoint.uri={run / 'ckpts'}",
            "logging.progress=false",
            f"data.root={tmp_path / 'data'}",
        ],
    )
    train(cfg)
    log = read_log(run / "train_log.jsonl")
    losses = [r["loss/objective"] for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 80
    assert evals[-1]["val/demo/ego_first_chamfer"] < 0.9 * evals[0]["val/demo/ego_first_chamfer"]
    assert evals[-1]["val/demo/ego_first_completeness"] < 0.9 * evals[0]["val/demo/ego_first_completeness"]
    assert evals[-1]["val/loss/objective"] < 0.6 * evals[0]["val/loss/objective"]


class OtherRankStops:
    """Stands in for distributed.StopVote when the SIGTERM reached another rank only (the pod of another node
    was preempted): one process has no process group, so the vote's outcome is given: stop after `step`."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        self.trainer, self.step = trainer, step

    def cast(self, stop: bool) -> bool:
        return stop or self.trainer.step >= self.step

    def result(self) -> bool:
        return False


def test_a_rank_stopped_by_another_ranks_sigterm_commits_the_final_checkpoint(tiny_data_root, tmp_path, capsys):
    """A rank that got no SIGTERM itself but learns from the vote that another one did commits the final
    checkpoint within the preemption budget, counted from when it learned (it used to fail: no SIGTERM time)."""
    trainer = make_trainer(tiny_data_root, tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.stop_vote = OtherRankStops(trainer, step=2)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert (result["step"], result["preempted"]) == (2, True)
    assert "SIGTERM: committing a final checkpoint at step 2" in capsys.readouterr().out
    assert CheckpointManager(str(tmp_path / "ckpts")).committed_steps()[-1] == 2

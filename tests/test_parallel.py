"""Model parallelism on CPU: model.device_map over CPU devices (every local GPU index resolves to the
CPU when device=cpu: the same placement hooks run, nothing moves) and pipeline stages
(distributed.pipeline.stages) on gloo, against unsplit runs."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_overrides

from dvgt.checkpoint.manager import CheckpointManager
from dvgt.config import load_config
from dvgt.families import model_skeleton
from dvgt.train.device_map import DeviceMapError, resolve
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer, train
from dvgt.train.pipeline import balanced_bounds, split_model

DVGT1_MAP = "{backbone: 0, aggregator: 1, ego_pose_head: 2, point_head: 2}"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/objective"] for r in read_log(run / "train_log.jsonl") if r["kind"] == "train"}


def overrides(data_root: Path, run: Path, **extra) -> list:
    """Tiny DVGT-1, 2 epochs of 3 steps, 2-frame clips of 2 views (2 clips per batch), 2 micro-batches
    per step, a checkpoint at the end of each epoch (steps 3 and 6)."""
    values = {"accum_steps": 2, "limit_val_batches": 0, "data.train.fixed_num_frames": 2, **extra}
    return tiny_overrides(data_root, run, **values)


def test_device_map_over_cpu_devices_trains_as_the_unmapped_model(tiny_data_root, tmp_path, capsys):
    """Same losses step by step, the same checkpoint files (names and values), and the mapped run's
    checkpoint resumes a model without a map."""
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    train(load_config("train/dvgt1/demo.yaml", overrides(tiny_data_root, plain)))
    train(load_config("train/dvgt1/demo.yaml", overrides(tiny_data_root, mapped, **{"model.device_map": DVGT1_MAP})))
    assert "GPU 2 (cpu): ego_pose_head, point_head" in capsys.readouterr().out  # the placement report
    expected, got = losses(plain), losses(mapped)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-6)
    a, b = (CheckpointManager(str(run / "ckpts")).open(6).model_state() for run in (plain, mapped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    resumed = Trainer(
        load_config(
            "train/dvgt1/demo.yaml",
            overrides(
                tiny_data_root,
                tmp_path / "resumed",
                **{"checkpoint.resume_checkpoint_path": mapped / "ckpts" / "step_00000006"},
            ),
        )
    )
    try:
        assert resumed.step == 6
        assert all(torch.equal(p.detach(), b[n]) for n, p in resumed.model.named_parameters())
    finally:
        resumed.close()


@pytest.mark.parametrize(
    "device_map,message",
    [
        (
            "{backbone: 0, aggregator: 0, depth_head: 1, ego_pose_head: 1, point_head: 1}",
            "model.device_map names unknown part(s) depth_head; this model's parts are backbone, aggregator, "
            "ego_pose_head, point_head",
        ),
        (
            "{backbone: 0, aggregator: 0, point_head: 1}",
            "model.device_map leaves part(s) ego_pose_head unplaced; give every part a local GPU index",
        ),
        ("{backbone: 0, aggregator: 0, ego_pose_head: 2, point_head: 2}", "uses GPU indices up to 2 but not [1]"),
    ],
)
def test_a_bad_device_map_is_refused_before_anything_is_allocated(tiny_data_root, tmp_path, device_map, message):
    with pytest.raises(DeviceMapError, match=None) as error:
        Trainer(
            load_config(
                "train/dvgt1/demo.yaml", overrides(tiny_data_root, tmp_path, **{"model.device_map": device_map})
            )
        )
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "ckpts").exists()  # refused before the checkpoint storage, the data, the model


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"distributed.pipeline.stages": 2, "limit_val_batches": 1}, "does not evaluate during training yet"),
        ({"distributed.pipeline.stages": 2, "distributed.strategy": "fsdp"}, "runs data parallelism as DDP"),
        ({"distributed.pipeline.stages": 2}, "does not divide the 1 processes into whole pipelines"),
        ({"model.device_map": DVGT1_MAP, "distributed.strategy": "fsdp"}, "works with distributed.strategy=ddp only"),
    ],
)
def test_layouts_that_cannot_run_are_refused_in_one_line(tiny_data_root, tmp_path, extra, message):
    with pytest.raises(ValueError) as error:
        Trainer(load_config("train/dvgt1/demo.yaml", overrides(tiny_data_root, tmp_path, **extra)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_gpu_index_the_node_does_not_have_is_refused():
    """Local rank 1 with 2 GPUs per process owns GPUs 2 and 3; a node showing 3 GPUs lacks GPU 3.
    (No GPU here: the check takes the visible count, as the trainer passes torch.cuda.device_count().)"""
    parts = model_skeleton(load_config("train/vggt/default.yaml").model).device_map_parts()
    device_map = {"backbone": 0, "aggregator": 0, "camera_head": 1, "point_head": 1}
    placed = resolve(device_map, parts, torch.device("cuda", 2), visible=4)
    assert placed == {"backbone": torch.device("cuda", 2), "aggregator": torch.device("cuda", 2)} | {
        "camera_head": torch.device("cuda", 3),
        "point_head": torch.device("cuda", 3),
    }
    with pytest.raises(DeviceMapError) as error:
        resolve(device_map, parts, torch.device("cuda", 2), visible=3)
    assert str(error.value).startswith(
        "model.device_map needs 2 GPUs per process: this process (first GPU 2) would use GPUs 2..3, but the node "
        "shows 3; start 1 process(es) per node (torchrun --nproc_per_node=1)"
    )


def test_the_stage_split_balances_parameters_and_carries_what_the_heads_read():
    """The full DVGT-1 (built on the meta device) in 4 stages: consecutive units whose largest stage
    is the smallest any split achieves; the DPT head's intermediate layers travel to the last stage."""
    model = model_skeleton(load_config("train/dvgt1/default.yaml").model)
    split = split_model(model, 4, ("images",))
    sizes = split.sizes
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    stage_max = max(sum(sizes[a:b]) for a, b in itertools.pairwise(split.bounds))
    best = min(
        max(sum(sizes[a:b]) for a, b in itertools.pairwise((0, *cuts, len(sizes))))
        for cuts in itertools.combinations(range(1, len(sizes)), 3)
    )
    assert stage_max == best
    assert split.units[-1].name == "heads" and split.units[0].name == "aggregator.embed"
    into_last = split.carried_into(3)
    assert into_last[0] == "images" and {"layer4", "layer11", "layer17", "layer23"} <= set(into_last)
    assert "stage 3:" in split.report(data_parallel=2, schedule="1f1b")
    assert balanced_bounds([5, 1, 1, 1, 1, 5], 3) == [0, 1, 5, 6]


def launch(processes: int, data_root: Path, run: Path, **extra) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "dvgt.train",
        "--config=train/dvgt1/demo.yaml",
        *overrides(data_root, run, **extra),
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


def test_pipeline_stages_train_as_the_unsplit_model_and_share_its_checkpoints(tiny_data_root, tmp_path):
    """Three torchrun launches at once, on gloo:
    - 2 stages x 1 (GPipe) resumed from the single-process run's step-3 checkpoint: steps 4-6 give the
      single-process losses, and its step-6 checkpoint holds the single-process weights and AdamW
      state under the same names and order, which an unsplit model resumes from;
    - 2 stages x 2 data-parallel ranks (1F1B, 4 processes) against plain DDP on 2 ranks, from scratch."""
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1): the same summation order
    try:
        train(load_config("train/dvgt1/demo.yaml", overrides(tiny_data_root, single)))
    finally:
        torch.set_num_threads(threads)
    step3 = single / "ckpts" / "step_00000003"
    runs = {
        "pp2": launch(
            2,
            tiny_data_root,
            tmp_path / "pp2",
            **{
                "distributed.pipeline.stages": 2,
                "distributed.pipeline.schedule": "gpipe",
                "checkpoint.resume_checkpoint_path": step3,
            },
        ),
        "pp2x2": launch(4, tiny_data_root, tmp_path / "pp2x2", **{"distributed.pipeline.stages": 2}),
        "ddp2": launch(2, tiny_data_root, tmp_path / "ddp2"),
    }
    outputs = {name: process.communicate(timeout=600)[0] for name, process in runs.items()}
    for name, process in runs.items():
        assert process.returncode == 0, f"{name}:\n{outputs[name][-3000:]}"
    assert "stage 1: heads .. heads" in outputs["pp2"]  # the split, reported at start

    expected = losses(single)
    got = losses(tmp_path / "pp2")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    reference, pipelined = (CheckpointManager(str(run / "ckpts")).open(6) for run in (single, tmp_path / "pp2"))
    a, b = reference.model_state(), pipelined.model_state()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    optimizer_a, optimizer_b = reference.load_all(0)["optimizer"], pipelined.load_all(0)["optimizer"]
    assert optimizer_a["param_groups"] == optimizer_b["param_groups"]
    assert optimizer_a["state"].keys() == optimizer_b["state"].keys()
    for i, state in optimizer_a["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[key], optimizer_b["state"][i][key], rtol=1e-4, atol=1e-12), (i, key)

    unsplit = Trainer(
        load_config(
            "train/dvgt1/demo.yaml",
            overrides(tiny_data_root, tmp_path / "unsplit", **{"checkpoint.resume_checkpoint_path": pipelined.uri}),
        )
    )
    try:
        assert unsplit.step == 6
        assert all(torch.equal(p.detach(), b[n]) for n, p in unsplit.model.named_parameters())
    finally:
        unsplit.close()

    expected, got = losses(tmp_path / "ddp2"), losses(tmp_path / "pp2x2")
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"

"""FSDP2 (distributed.strategy=fsdp) against DDP on 2 CPU ranks (gloo, torchrun), sharded DCP
checkpoints (local and through SeaweedFS S3), resume across strategies and world sizes, export, and
evaluation on every rank.

Four torchrun runs of the tiny DVGT-1 demo, 2 epochs x 2 steps, each batch in 2 micro-steps
(gradient accumulation) with activation checkpointing on (the demo's default), evaluating 3 held-out
clips (2 on rank 0, 1 on rank 1 and a repeat that is not counted) at the start and after each epoch:
  ddp        DDP from scratch (checkpoints at steps 2 and 4)
  zero2      FSDP zero2 from scratch
  zero3      FSDP zero3 resuming from ddp's step 2, checkpoints to S3
  ddp_after  DDP resuming from zero2's step 2 (a sharded checkpoint)
and two of the tiny DVGT-2 demo (DDP and zero3), for its in-place ego-token update.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port, tiny_overrides

from dvgt.checkpoint.dcp import optimizer_state_by_name, read_full_model
from dvgt.checkpoint.manager import CheckpointManager, CorruptCheckpointError
from dvgt.checkpoint.safetensors_stream import read_safetensors
from dvgt.config import ConfigError, load_config
from dvgt.data import format as fmt
from dvgt.data.anchors import write_anchors
from dvgt.data.synthetic import generate_synthetic_dataset
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer

# Relative tolerance of a loss under FSDP vs DDP: the same float32 math, reduced in another order
# (reduce-scatter vs all-reduce; measured differences are ~1e-6).
LOSS_RTOL = 1e-4
RUN = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 3, "accum_steps": 2}
pytestmark = pytest.mark.torch_threads(2)  # the in-process evaluations (the launched ranks: OMP_NUM_THREADS=1)


def losses(run_dir) -> dict:
    return {r["step"]: r["loss/objective"] for r in read_log(run_dir / "train_log.jsonl") if r["kind"] == "train"}


def torchrun(data_root, run_dir, env=None, config="train/dvgt1/demo.yaml", **overrides) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "dvgt.train",
        f"--config={config}",
        *tiny_overrides(data_root, run_dir, **{**RUN, **overrides}),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tiny_data_root, seaweedfs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    bucket = seaweedfs.make_bucket("fsdp")
    dirs = {name: root / name for name in ("ddp", "zero2", "zero3", "ddp_after")}
    torchrun(tiny_data_root, dirs["ddp"])
    torchrun(tiny_data_root, dirs["zero2"], **{"distributed.strategy": "fsdp", "distributed.fsdp.mode": "zero2"})
    torchrun(
        tiny_data_root,
        dirs["zero3"],
        env=seaweedfs.env(),
        **{
            "distributed.strategy": "fsdp",
            "distributed.fsdp.mode": "zero3",
            "checkpoint.uri": f"s3://{bucket}/zero3",
            "checkpoint.resume_checkpoint_path": dirs["ddp"] / "ckpts" / "step_00000002",
        },
    )
    torchrun(
        tiny_data_root,
        dirs["ddp_after"],
        **{"checkpoint.resume_checkpoint_path": dirs["zero2"] / "ckpts" / "step_00000002"},
    )
    return dirs


def assert_close(got: dict, expected: dict, steps: list) -> None:
    assert sorted(got) == steps
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"


def test_zero2_and_zero3_give_the_losses_of_ddp(runs):
    reference = losses(runs["ddp"])
    assert sorted(reference) == [1, 2, 3, 4]
    assert_close(losses(runs["zero2"]), reference, [1, 2, 3, 4])
    assert_close(losses(runs["zero3"]), reference, [3, 4])  # ... after resuming DDP's checkpoint under FSDP


@pytest.mark.parametrize("run", ["ddp", "zero2", "zero3"])
def test_every_rank_evaluates_and_the_reduced_metrics_equal_one_process(
    runs, run, tiny_data_root, seaweedfs, monkeypatch, tmp_path
):
    """The metrics each 2-rank run logged at its last step (each rank scored its share, sums all-reduced)
    equal one process evaluating the same 3 clips with the weights of that step."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    logged = [r for r in read_log(runs[run] / "train_log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in logged] == ([0, 2, 4] if run != "zero3" else [4])
    final = {k: v for k, v in logged[-1].items() if k.startswith("val/")}
    assert {"val/demo/ego_first_chamfer", "val/demo/ego_n_Abs Rel", "val/loss/objective"} <= set(final)
    checkpoint = "s3://fsdp/zero3/step_00000004" if run == "zero3" else runs[run] / "ckpts" / "step_00000004"
    trainer = Trainer(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(tiny_data_root, tmp_path, **{**RUN, "checkpoint.resume_checkpoint_path": checkpoint}),
        )
    )
    try:
        alone = trainer.evaluate()
    finally:
        trainer.close()
    assert alone.keys() == final.keys()
    for key, value in final.items():
        assert alone[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_dvgt2_under_zero3_gives_the_losses_of_ddp(tmp_path):
    """DVGT-2 adds the ego head's temporal embedding in place to an aggregator output; under zero3 the
    blocks' parameters are gathered again in backward, so this checks that nothing there is lost."""
    root = tmp_path / "data"
    generate_synthetic_dataset(root, "train", num_scenes=6, num_frames=12, height=32, width=64, seed=0)
    write_anchors([(fmt.read_table(fmt.Tree(root, "demo").parquet("train")), "demo", 2)], root / "anchors")
    planning = {
        "model.anchor_dir": root / "anchors",
        "limit_val_batches": 0,
        "data.train.datasets": "[{dataset: demo, split: train}]",
    }
    torchrun(root, tmp_path / "ddp", config="train/dvgt2/demo.yaml", **planning)
    torchrun(
        root,
        tmp_path / "zero3",
        config="train/dvgt2/demo.yaml",
        **planning,
        **{"distributed.strategy": "fsdp", "distributed.fsdp.mode": "zero3"},
    )
    assert_close(losses(tmp_path / "zero3"), losses(tmp_path / "ddp"), [1, 2, 3, 4])


def test_a_sharded_checkpoint_resumes_under_ddp(runs):
    assert_close(losses(runs["ddp_after"]), losses(runs["ddp"]), [3, 4])


def test_sharded_checkpoints_on_s3_are_committed_per_rank_and_verify(runs, seaweedfs, monkeypatch):
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    manager = CheckpointManager("s3://fsdp/zero3")
    assert manager.committed_steps() == [4]  # the resumed run saves at the end of epoch 2 only
    checkpoint = manager.open(4)
    assert checkpoint.sharded and checkpoint.manifest["world_size"] == 2
    assert {o["key"] for o in checkpoint.manifest["objects"]} == {
        "dcp/metadata.json",
        "dcp/rank_00000.distcp",
        "dcp/rank_00001.distcp",
        "rng/rank_00000.safetensors",
        "rng/rank_00001.safetensors",
        "trainer_state.safetensors",
        "config.yaml",
    }
    done = subprocess.run(
        [sys.executable, "-m", "dvgt", "ckpt", "verify", "s3://fsdp/zero3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.returncode == 0 and "7 objects, all intact" in done.stdout, done.stdout + done.stderr
    # The final models of FSDP (zero3, via S3) and DDP agree.
    ddp = CheckpointManager(str(runs["ddp"] / "ckpts")).open(4).model_state()
    fsdp = read_full_model(checkpoint)
    assert fsdp.keys() == ddp.keys()
    assert all(torch.allclose(fsdp[k], ddp[k], rtol=1e-3, atol=1e-5) for k in ddp)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_sharded_checkpoint_reshards_to_one_process(runs, tiny_data_root, tmp_path, strategy):
    """zero2's step-2 checkpoint (2 ranks) into one process, plain or FSDP over a group of one: the
    model equals `dvgt ckpt export` of it, and model and optimizer match DDP's step 2."""
    source = runs["zero2"] / "ckpts" / "step_00000002"
    exported = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "dvgt", "ckpt", "export", str(source), "--out", str(exported)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "sharded over 2 ranks" in done.stdout, done.stderr
    export = read_safetensors(bytearray((exported / "model.safetensors").read_bytes()))
    trainer = Trainer(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(
                tiny_data_root,
                tmp_path / "run",
                **RUN,
                **{"distributed.strategy": strategy, "checkpoint.resume_checkpoint_path": source},
            ),
        )
    )
    try:
        assert trainer.step == 2
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in get_model_state_dict(trainer.model).items()
        }
        assert model.keys() == export.keys()
        assert all(torch.equal(model[k], export[k]) for k in model)
        ddp = CheckpointManager(str(runs["ddp"] / "ckpts")).open(2)
        ddp_model = ddp.model_state()
        assert all(torch.allclose(model[k], ddp_model[k], rtol=1e-3, atol=1e-5) for k in model)
        ddp_optimizer = optimizer_state_by_name(trainer.model, trainer.optimizer, ddp.state("optimizer.safetensors"))[
            "state"
        ]
        optimizer = get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"]
        assert optimizer.keys() == ddp_optimizer.keys()
        for name, state in optimizer.items():
            for key, value in state.items():
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                assert torch.allclose(value, ddp_optimizer[name][key], rtol=1e-3, atol=1e-6), f"{name}.{key}"
    finally:
        trainer.close()


def test_fsdp_configuration_errors_name_the_fix(tiny_data_root, tmp_path):
    with pytest.raises(ConfigError, match="verify_replicas.*set distributed.verify_replicas=false"):
        load_config("train/dvgt1/demo.yaml", ["distributed.strategy=fsdp", "distributed.verify_replicas=true"])
    with pytest.raises(ConfigError, match="distributed.fsdp.mode must be zero2 or zero3"):
        load_config("train/dvgt1/demo.yaml", ["distributed.strategy=fsdp", "distributed.fsdp.mode=zero1"])
    with pytest.raises(ConfigError, match="it is called 'distributed.strategy' here"):
        load_config("train/dvgt1/demo.yaml", ["train.strategy=fsdp"])


def test_a_ddp_optimizer_state_of_another_parameter_set_is_refused(runs, tiny_data_root, tmp_path):
    trainer = Trainer(
        load_config(
            "train/dvgt1/demo.yaml",
            tiny_overrides(tiny_data_root, tmp_path, **{"optim.frozen_module_names": "[aggregator.patch_embed.*]"}),
        )
    )
    try:
        saved = CheckpointManager(str(runs["ddp"] / "ckpts")).open(2).state("optimizer.safetensors")
        with pytest.raises(CorruptCheckpointError, match="did optim.frozen_module_names change"):
            optimizer_state_by_name(trainer.model, trainer.optimizer, saved)
    finally:
        trainer.close()


def test_a_corrupt_shard_falls_back_to_the_previous_checkpoint(runs, tiny_data_root, tmp_path, capsys):
    """resume=auto: a shard is verified only when DCP reads it, after the checkpoint was picked; the
    load fails on every rank and all fall back to the previous committed checkpoint together.
    (One process with FSDP over a group of one; the 2-rank checkpoints of zero2 reshard to it.)"""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(runs["zero2"] / "ckpts", ckpts)
    shard = ckpts / "step_00000004" / "dcp" / "rank_00001.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the size still matches
    shard.write_bytes(bytes(data))
    overrides = {**RUN, "distributed.strategy": "fsdp", "checkpoint.uri": ckpts}
    capsys.readouterr()
    trainer = Trainer(
        load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, tmp_path / "run", **overrides))
    )
    try:
        out = capsys.readouterr().out
        assert re.search(
            r"warning: .*step_00000004: object 'dcp/rank_00001.distcp' does not match.*falling back", out
        ), out
        assert trainer.step == 2 and "Resumed from" in out and "step_00000002" in out
    finally:
        trainer.close()
    explicit = {**overrides, "checkpoint.resume_checkpoint_path": ckpts / "step_00000004"}
    with pytest.raises(CorruptCheckpointError, match="'dcp/rank_00001.distcp' does not match its manifest"):
        Trainer(load_config("train/dvgt1/demo.yaml", tiny_overrides(tiny_data_root, tmp_path / "run2", **explicit)))

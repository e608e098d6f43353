"""The faster paths of dvgt/train/speedups.py against the eager model on a tiny DVGT-1 (CPU): regional
torch.compile (inductor, gcc) and each SDPA backend give the same outputs and gradients within float32
tolerance; the attention report names the kernel each call gets."""

from __future__ import annotations

import copy

import pytest
import torch

from dvgt.models.dvgt1 import DVGT1, DVGT1Size
from dvgt.train.speedups import attention_context, attention_report, compile_blocks

# One backbone block and one aggregator step: the fewest graphs to compile
SMALLEST = DVGT1Size(32, 2, 1, 1, 16, (8, 16, 32, 32), (0, 0, 0, 0), 1)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32; kernels differ in summation order only


def outputs_and_gradients(model: torch.nn.Module, images: torch.Tensor) -> tuple[dict, dict]:
    torch.manual_seed(3)  # DINOv3 RoPE draws a random coordinate rescale in train mode
    out = model(images)
    loss = out["points"].square().mean() + sum(p.square().mean() for p in out["absolute_ego_pose_enc_list"])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"points": out["points"].detach(), "pose": out["absolute_ego_pose_enc"].detach()}, grads


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for key in a[0]:
        torch.testing.assert_close(a[0][key], b[0][key], **TOLERANCE, msg=key)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    model = DVGT1(SMALLEST, activation_checkpointing="none").train()
    images = torch.rand(1, 2, 2, 3, 32, 32)
    return model, images, outputs_and_gradients(copy.deepcopy(model), images)


def test_compiled_blocks_match_eager(eager):
    model, images, expected = eager
    compiled = copy.deepcopy(model)
    assert compile_blocks(compiled) == 1 + 3 + 1  # backbone block, 3 aggregator blocks, pose-head trunk block
    assert list(compiled.state_dict()) == list(model.state_dict())  # checkpoints keep their keys
    assert_same(outputs_and_gradients(compiled, images), expected)


@pytest.mark.parametrize("setting", ["flash", "math", "efficient"])
def test_each_attention_backend_matches_eager(eager, setting):
    model, images, expected = eager
    order, line = attention_report(
        setting, torch.device("cpu"), 16, {"aggregator": (torch.float32, False), "masked": (torch.float32, True)}
    )
    # the efficient kernel needs CUDA: on a CPU its calls fall back to math, and the report says so
    kernel = "math" if setting == "efficient" else setting
    assert line.endswith(f"aggregator (float32) -> {kernel}; masked (float32, masked) -> {kernel}")
    with attention_context(order):
        assert_same(outputs_and_gradients(copy.deepcopy(model), images), expected)


def test_the_trainer_reports_the_kernel_of_each_kind_of_attention_call():
    """The start-of-run line: DVGT-2's frame-causal (masked) calls are listed beside the unmasked ones."""
    from dvgt.config import ModelConfig
    from dvgt.families import build_model
    from dvgt.train.speedups import training_attention

    with torch.device("meta"):
        model = build_model(ModelConfig(name="dvgt2", size="tiny"))
    order, line = training_attention(model, "auto", torch.device("cpu"), torch.float32)
    assert order == ("flash", "math")
    assert line == (
        "Attention (model.attention_backend=auto, order flash, math): "
        "aggregator (float32) -> flash; frame-causal (float32, masked) -> flash"
    )

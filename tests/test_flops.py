"""MFU accounting: the analytic model FLOPs of every family (dvgt/train/flops.py) against torch's own
counter (torch.utils.flop_counter.FlopCounterMode) on tiny models, forward and a whole training step;
the peak table's lookup."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dvgt.config import ModelConfig
from dvgt.families import build_model
from dvgt.train.flops import StepFlops, device_peak_flops, peak_tflops
from dvgt.train.optim import freeze_modules
from dvgt.train.speedups import attention_context


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_loss(outputs: dict) -> torch.Tensor:
    """A loss reaching every output that carries a gradient (as training's losses do)."""
    tensors = [v for v in outputs.values() if torch.is_tensor(v)]
    tensors += [t for v in outputs.values() if isinstance(v, list) for t in v]
    return sum(t.float().mean() for t in tensors if t.requires_grad)


# (model, frozen parameter globs): every family, and frozen parts before and after trainable ones
CASES = [
    ("dvgt1", []),
    ("dvgt2", []),
    ("dvgt2_pretrain", []),
    ("vggt", []),
    ("dvgt2", ["aggregator.*"]),  # frozen backbone and aggregator (no backward at all), trainable heads
]


@pytest.mark.parametrize("name, frozen_globs", CASES)
def test_analytic_flops_equal_torch_flop_counter(name, frozen_globs):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, size="tiny", activation_checkpointing="none")).train()
    frozen = freeze_modules(model, frozen_globs)
    p = model.patch_size
    shape = (1, 2, 3, 2 * p, 3 * p)  # B, T, V, H, W: 6 images of 2 x 3 patches
    images = torch.rand(*shape[:3], 3, *shape[3:])
    analytic = StepFlops(model, frozen)

    with attention_context(("math",)):  # attention as matmuls, which the counter sees on a CPU
        outputs = {}
        forward = counted(lambda: outputs.update(model(images)))
        backward = counted(lambda: training_loss(outputs).backward())

    assert analytic.forward(*shape) == pytest.approx(forward, rel=0.02)
    assert analytic(*shape) == pytest.approx(forward + backward, rel=0.02)
    if frozen_globs:  # a frozen part's weights get no gradient: fewer FLOPs than training everything
        assert analytic(*shape) < StepFlops(model)(*shape)


def test_step_flops_add_up_over_the_batch_and_are_cached():
    model = build_model(ModelConfig(name="dvgt1", size="tiny"))
    flops = StepFlops(model)
    one, four = flops(1, 2, 3, 32, 48), flops(4, 2, 3, 32, 48)
    assert four == pytest.approx(4 * one)  # accumulation chunks add up to the whole batch
    assert flops(1, 2, 3, 32, 48) == one and flops._count.cache_info().hits == 1


def test_peak_table_matches_device_names_most_specific_first():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0  # not the H20's
    assert peak_tflops("NVIDIA H20") == 148.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu, None)[0] is None  # no MFU on a CPU ...
    assert device_peak_flops(cpu, 2.5)[0] == 2.5e12  # ... unless a peak is configured

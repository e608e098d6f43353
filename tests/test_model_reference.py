"""Full-size DVGT-1 against the reference fixtures (official code, weights rule refweights-v1, seed 1234).

See /work/shared/reference/README.md (copied fixtures in tests/data). The 7 GB model is built once
per module: on the meta device, materialised with `to_empty`, then filled in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvgt.config import ModelConfig
from dvgt.models import build_model
from dvgt.models.reference_weights import fill_reference_weights, weights_digest

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
WEIGHTS_SHA256 = "7a0b2cbb6578137bc78bb9e426bc9c785198c891434c975831e80e73b00a44e0"
TOLERANCE = 1e-4  # max|cand - ref| <= TOLERANCE * max|ref|, per key


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="dvgt1", size="full"))
    model.to_empty(device="cpu")
    fill_reference_weights(model, seed=1234)
    return model.eval()


def test_reference_weights_digest(full_model):
    assert weights_digest(full_model.state_dict()) == WEIGHTS_SHA256


def test_persistent_buffers_match_reference(full_model):
    reference = load_file(str(DATA / "dvgt1_buffers_seed1234.safetensors"))
    state = full_model.state_dict()
    params = {name for name, _ in full_model.named_parameters()}
    assert {k for k in state if k not in params} == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def run_protocol(model, images):
    """The fixture's run protocol, with forward hooks capturing the backbone tokens and the aggregator list."""
    captures = {}
    hooks = [
        model.aggregator.patch_embed.register_forward_hook(
            lambda module, args, tokens: captures.__setitem__("capture.backbone_patch_tokens", tokens.clone())
        ),
        model.aggregator.register_forward_hook(
            lambda module, args, output: captures.update(
                {f"capture.aggregator.{i}": tokens.clone() for i, tokens in enumerate(output[0])}
            )
        ),
    ]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.inference_mode():
            torch.manual_seed(1234)
            out = model(images)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for hook in hooks:
            hook.remove()
    flat = {k: v for k, v in out.items() if k != "absolute_ego_pose_enc_list"}
    flat.update({f"absolute_ego_pose_enc_list.{i}": pose for i, pose in enumerate(out["absolute_ego_pose_enc_list"])})
    flat.update(captures)
    return flat


def test_forward_matches_reference_fixture(full_model):
    reference = load_file(str(DATA / "dvgt1_seed1234.safetensors"))
    reference.update(load_file(str(DATA / "dvgt1_seed1234_intermediates.safetensors")))
    generator = torch.Generator("cpu").manual_seed(7)
    images = torch.rand([1, 2, 2, 3, 64, 128], generator=generator, dtype=torch.float32)
    assert torch.equal(images, reference.pop("input"))

    candidate = run_protocol(full_model, images)

    ratios = {}
    for key, expected in reference.items():
        assert key in candidate, f"no output or capture for fixture key {key}"
        got = candidate[key]
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        assert torch.isfinite(got).all(), key
        ratios[key] = ((got - expected).abs().max() / expected.abs().max()).item()
    report = "\n".join(f"  {key}: {ratio:.2e}" for key, ratio in sorted(ratios.items()))
    print(f"\nmax|cand - ref| / max|ref| per key:\n{report}")
    assert {"points", "points_conf", "absolute_ego_pose_enc", "capture.aggregator.0", "capture.backbone_patch_tokens"} <= set(ratios)
    assert ratios["images"] == 0.0
    assert all(ratio <= TOLERANCE for ratio in ratios.values()), f"outside tolerance {TOLERANCE}:\n{report}"

"""Full-size models against the reference fixtures (official code, weights rule refweights-v1, seed 1234).

See /work/shared/reference/README.md (copied fixtures in tests/data). Each full model (DVGT-1 7 GB,
VGGT 4.6 GB) is built once, on the meta device, materialised with `to_empty`, then filled in place;
pytest runs one model's tests before building the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Tuple

import pytest
import torch
from safetensors.torch import load_file

from dvgt.config import ModelConfig
from dvgt.models import build_model
from dvgt.models.reference_weights import fill_reference_weights, weights_digest

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-4  # max|cand - ref| <= TOLERANCE * max|ref|, per key


class Reference(NamedTuple):
    name: str  # model.name, also the fixture file prefix
    weights_sha256: str
    input_shape: Tuple[int, ...]
    key_outputs: Tuple[str, ...]  # outputs that must be among the compared keys


REFERENCES = {
    "dvgt1": Reference("dvgt1", "7a0b2cbb6578137bc78bb9e426bc9c785198c891434c975831e80e73b00a44e0",
                       (1, 2, 2, 3, 64, 128), ("points", "points_conf", "absolute_ego_pose_enc")),
    "vggt": Reference("vggt", "aef41b5abec0e0620440cd1c0ce4f3a9134261ff73e2b002d512189de45ec1b8",
                      (1, 2, 2, 3, 56, 112), ("points", "points_conf", "cam_pose_enc", "cam_pose_enc_list.0")),
}


@pytest.fixture(scope="module", params=list(REFERENCES))
def full_model(request):
    reference = REFERENCES[request.param]
    with torch.device("meta"):
        model = build_model(ModelConfig(name=reference.name, size="full"))
    model.to_empty(device="cpu")
    fill_reference_weights(model, seed=1234)
    yield reference, model.eval()
    del model


def test_reference_weights_digest(full_model):
    reference, model = full_model
    assert weights_digest(model.state_dict()) == reference.weights_sha256


def test_persistent_buffers_match_reference(full_model):
    reference, model = full_model
    buffers_file = DATA / f"{reference.name}_buffers_seed1234.safetensors"
    expected = load_file(str(buffers_file)) if buffers_file.exists() else {}  # VGGT has no persistent buffers
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    assert {k for k in state if k not in params} == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def run_protocol(model, images):
    """The fixture's run protocol, with forward hooks capturing the backbone tokens and the aggregator list.

    Returns outputs and captures flattened as in the fixtures (a list output `name` becomes `name.i`).
    """
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
    flat = {}
    for key, value in out.items():
        if isinstance(value, list):
            flat.update({f"{key}.{i}": item for i, item in enumerate(value)})
        else:
            flat[key] = value
    flat.update(captures)
    return flat


def test_forward_matches_reference_fixture(full_model):
    reference_info, model = full_model
    reference = load_file(str(DATA / f"{reference_info.name}_seed1234.safetensors"))
    reference.update(load_file(str(DATA / f"{reference_info.name}_seed1234_intermediates.safetensors")))
    generator = torch.Generator("cpu").manual_seed(7)
    images = torch.rand(list(reference_info.input_shape), generator=generator, dtype=torch.float32)
    assert torch.equal(images, reference.pop("input"))

    candidate = run_protocol(model, images)

    ratios = {}
    for key, expected in reference.items():
        assert key in candidate, f"no output or capture for fixture key {key}"
        got = candidate[key]
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        assert torch.isfinite(got).all(), key
        ratios[key] = ((got - expected).abs().max() / expected.abs().max()).item()
    report = "\n".join(f"  {key}: {ratio:.2e}" for key, ratio in sorted(ratios.items()))
    print(f"\n{reference_info.name}: max|cand - ref| / max|ref| per key:\n{report}")
    expected_keys = {*reference_info.key_outputs, "capture.aggregator.0", "capture.backbone_patch_tokens"}
    assert expected_keys <= set(ratios)
    assert ratios["images"] == 0.0
    assert all(ratio <= TOLERANCE for ratio in ratios.values()), f"outside tolerance {TOLERANCE}:\n{report}"

"""Full-size DVGT-1, DVGT-2, DVGT-2 pretrain and VGGT against the reference fixtures (official code, weights
rule refweights-v1, seed 1234).

See /work/shared/reference/README.md (copied fixtures in tests/data). Each model (DVGT 7 GB, VGGT 4.6 GB)
is built once per class, one at a time: on the meta device, materialised with `to_empty`, then filled in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvgt.config import ModelConfig
from dvgt.families import build_model
from dvgt.models.reference_weights import fill_reference_weights, weights_digest

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
WEIGHTS_SHA256 = {
    "dvgt1": "7a0b2cbb6578137bc78bb9e426bc9c785198c891434c975831e80e73b00a44e0",
    "dvgt2": "081b35cf211da33591ed01f7a05fc14ea82ceefcb705fb5eedd5e128fc532486",
    "dvgt2_pretrain": "f9536d7e8452117b17d984df062b66994f3f7961d80632578add6f337f6f1f51",
    "vggt": "aef41b5abec0e0620440cd1c0ce4f3a9134261ff73e2b002d512189de45ec1b8",
}
TOLERANCE = 1e-4  # max|cand - ref| <= TOLERANCE * max|ref|, per key


class ReferenceChecks:
    """The checks every model gets; a subclass per model (so each 7 GB model is built once, one at a time)."""

    name: str

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        with torch.device("meta"):
            model = build_model(ModelConfig(name=cls.name, size="full"))
        model.to_empty(device="cpu")
        fill_reference_weights(model, seed=1234)
        return model.eval()

    def test_reference_weights_digest(self, model):
        assert weights_digest(model.state_dict()) == WEIGHTS_SHA256[self.name]

    def test_persistent_buffers_match_reference(self, model):
        buffers_file = DATA / f"{self.name}_buffers_seed1234.safetensors"
        reference = load_file(str(buffers_file)) if buffers_file.exists() else {}  # VGGT has no persistent buffers
        state = model.state_dict()
        params = {key for key, _ in model.named_parameters()}
        assert {k for k in state if k not in params} == set(reference)
        for key, value in reference.items():
            assert torch.equal(state[key], value), key

    def test_forward_matches_reference_fixture(self, model):
        check_fixture(model, f"{self.name}_seed1234", "forward")


class TestDVGT1(ReferenceChecks):
    name = "dvgt1"


class TestDVGT2(ReferenceChecks):
    name = "dvgt2"

    def test_streaming_inference_matches_reference_fixture(self, model):
        check_fixture(model, "dvgt2_stream_seed1234", "inference")  # infer_window=2, 3 frames


class TestDVGT2Pretrain(ReferenceChecks):
    name = "dvgt2_pretrain"


class TestVGGT(ReferenceChecks):
    name = "vggt"


def flatten(outputs: dict) -> dict:
    """Lists become `name.i`, as in the fixture files."""
    flat = {}
    for key, value in outputs.items():
        if isinstance(value, list):
            flat.update({f"{key}.{i}": item for i, item in enumerate(value)})
        else:
            flat[key] = value
    return flat


def run_protocol(model, images, call: str) -> dict:
    """The fixture's run protocol, with hooks capturing the backbone tokens, the aggregator list and (streaming)
    the ego head's input per step before its temporal embedding."""
    captures, head_inputs = {}, []
    hooks = (
        []
        if call == "forward"
        else [
            model.ego_pose_head.register_forward_pre_hook(
                lambda head, args: head_inputs.append(args[0] - head.temporal_pos_embed[:, : args[0].shape[1]])
            )
        ]
    )
    hooks += [
        model.aggregator.patch_embed.register_forward_hook(
            lambda module, args, tokens: captures.__setitem__("capture.backbone_patch_tokens", tokens.clone())
        ),
        model.aggregator.register_forward_hook(  # in streaming, the last call (step 2) is kept
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
            out = model(images) if call == "forward" else model.inference(images, infer_window=2)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for hook in hooks:
            hook.remove()
    flat = flatten(out)
    flat.update(captures)
    if call == "inference":
        flat["capture.aggregator.23.step2"] = captures["capture.aggregator.23"]
        flat.update({f"capture.ego_head_input.step{i}": tokens for i, tokens in enumerate(head_inputs)})
    return flat


def check_fixture(model, fixture: str, call: str) -> None:
    """Run `call` ("forward" or "inference") by the fixture's protocol and compare every stored output and capture."""
    reference = load_file(str(DATA / f"{fixture}.safetensors"))
    if (DATA / f"{fixture}_intermediates.safetensors").exists():
        reference.update(load_file(str(DATA / f"{fixture}_intermediates.safetensors")))
    images = reference.pop("input")
    generator = torch.Generator("cpu").manual_seed(7)
    assert torch.equal(images, torch.rand(images.shape, generator=generator, dtype=torch.float32))

    # DVGT-2's decoder noise: the stored draws are the global generator's first draws after the seed.
    noise = [reference.pop(f"noise.{i}") for i in range(sum(k.startswith("noise.") for k in reference))]
    torch.manual_seed(1234)
    assert all(torch.equal(torch.randn(n.shape), n) for n in noise)

    candidate = run_protocol(model, images, call)

    ratios = {}
    for key, expected in reference.items():
        assert key in candidate, f"no output or capture for fixture key {key}"
        got = candidate[key]
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        assert torch.isfinite(got).all(), key
        ratios[key] = ((got - expected).abs().max() / expected.abs().max()).item()
    report = "\n".join(f"  {key}: {ratio:.2e}" for key, ratio in sorted(ratios.items()))
    print(f"\n{fixture}: max|cand - ref| / max|ref| per key:\n{report}")
    assert {"points", "points_conf", "capture.aggregator.23" + (".step2" if call == "inference" else "")} <= set(ratios)
    assert len(ratios) >= 7
    assert ratios["images"] == 0.0
    assert all(ratio <= TOLERANCE for ratio in ratios.values()), f"outside tolerance {TOLERANCE}:\n{report}"

"""DVGT-1 model: layout of the full model, behaviour of the small presets, weight loading."""

from __future__ import annotations

import copy
import json
import time
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from dvgt.config import ModelConfig
from dvgt.families import build_model, model_layout
from dvgt.models import SIZES, WeightsMismatchError, load_weights
from dvgt.models.reference_weights import fill_reference_weights, reference_state_dict, rule_group, weights_digest

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.torch_threads(2)  # the in-process training runs (the suite ran them with 2)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(size="tiny", **overrides))


def all_outputs_loss(out: dict) -> torch.Tensor:
    """A loss touching every output, like training does (every pose iteration is supervised)."""
    poses = sum(p.square().mean() for p in out["absolute_ego_pose_enc_list"])
    return poses + out["points"].square().mean() + out["points_conf"].log().mean()


# ---------------------------------------------------------------------------------------------
# Full-size layout (built on the meta device: no weights are allocated)
# ---------------------------------------------------------------------------------------------


# model name: (parameters, state_dict entries, parameters per rule group a/b/c/d) of the reference README
FULL_MODELS = {
    "dvgt1": (1_732_105_522, 1798, {"a": 348, "b": 437, "c": 7, "d": 981}),
    "dvgt2": (1_709_991_782, 1951, {"a": 366, "b": 489, "c": 6, "d": 1059}),
    "dvgt2_pretrain": (1_703_853_355, 1793, {"a": 348, "b": 435, "c": 6, "d": 979}),
}


@pytest.mark.parametrize("name", list(FULL_MODELS))
def test_full_layout_matches_reference_json(name):
    reference = json.loads((DATA / f"{name}_state_dict.json").read_text())
    start = time.perf_counter()
    layout = model_layout(ModelConfig(name=name, size="full"))
    elapsed = time.perf_counter() - start

    assert list(layout["state_dict"].items()) == list(reference["state_dict"].items())  # keys, order, shapes
    assert layout["num_parameters"] == reference["num_parameters"] == FULL_MODELS[name][0]
    assert len(layout["state_dict"]) == FULL_MODELS[name][1]
    assert elapsed < 15, f"model_layout took {elapsed:.1f}s; it should build on meta in about 2s"


@pytest.mark.parametrize("name", list(FULL_MODELS))
def test_reference_rule_groups_of_full_model(name):
    layout = json.loads((DATA / f"{name}_state_dict.json").read_text())
    buffers = set(layout["persistent_buffers"])
    groups = [rule_group(k, shape) for k, (shape, _) in layout["state_dict"].items() if k not in buffers]
    assert {g: groups.count(g) for g in "abcd"} == FULL_MODELS[name][2]


def test_build_model_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = build_model(ModelConfig(size="full"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.aggregator.patch_embed.mask_token.requires_grad is False


# ---------------------------------------------------------------------------------------------
# Construction and initialisation
# ---------------------------------------------------------------------------------------------


def test_size_presets_are_consistent():
    for name, size in SIZES.items():
        assert size.embed_dim % (4 * size.num_heads) == 0, name  # 2D RoPE and DINOv3 RoPE need head_dim % 4 == 0
        assert max(size.dpt_layers) < size.depth, name


@pytest.mark.parametrize("config", [ModelConfig(size="tiny"), OmegaConf.structured(ModelConfig(size="tiny"))])
def test_build_model_accepts_dataclass_and_omegaconf(config):
    model = build_model(config)
    assert model.aggregator.temporal_pos_embed.shape == (1, 48, 64)


def test_unknown_model_name_or_size():
    with pytest.raises(ValueError, match="model.name 'dvgt3' is not one of"):
        build_model(ModelConfig(name="dvgt3"))
    with pytest.raises(ValueError, match="model.size 'huge' is not one of full, small, tiny"):
        build_model(ModelConfig(size="huge"))


def test_from_scratch_initialisation():
    model = tiny()
    backbone = model.aggregator.patch_embed
    mask = backbone.blocks[0].attn.qkv.bias_mask
    assert mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64  # K third masked
    head_dim = 64 // 2
    expected_periods = 100 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    assert torch.equal(backbone.rope_embed.periods, expected_periods)
    assert torch.all(backbone.blocks[0].ls1.gamma == 1e-5)
    assert torch.all(model.aggregator.intra_view_blocks[0].ls1.gamma == 0.01)
    assert torch.all(model.ego_pose_head.trunk[0].ls2.gamma == 0.01)
    assert model.aggregator.ego_pose_token.abs().max() < 1e-4  # N(0, 1e-6)
    assert 0.01 < backbone.cls_token.std() < 0.04  # N(0, 0.02)
    assert torch.all(backbone.mask_token == 0) and not backbone.mask_token.requires_grad
    # the three attention stacks start as copies of one another
    aggregator = model.aggregator
    assert torch.equal(aggregator.intra_view_blocks[1].mlp.fc1.weight, aggregator.cross_frame_blocks[1].mlp.fc1.weight)


# ---------------------------------------------------------------------------------------------
# Forward / backward on the small presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_forward_shapes_and_finite(size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=size)).eval()
    images = torch.rand(3, 2, 3, 32, 48)  # [T, V, 3, H, W]: a batch dim is added
    with torch.no_grad():
        out = model(images)
    assert out["absolute_ego_pose_enc"].shape == (1, 3, 7)
    assert [p.shape for p in out["absolute_ego_pose_enc_list"]] == [(1, 3, 7)] * 4
    assert out["absolute_ego_pose_enc"] is out["absolute_ego_pose_enc_list"][-1]
    assert out["points"].shape == (1, 3, 2, 32, 48, 3)
    assert out["points_conf"].shape == (1, 3, 2, 32, 48)
    assert torch.equal(out["images"], images[None])
    for key in ("absolute_ego_pose_enc", "points", "points_conf"):
        assert torch.isfinite(out[key]).all(), key
    assert (out["points_conf"] > 1).all()  # 1 + exp(c)

    model.train()
    assert "images" not in model(images)


def test_backward_reaches_every_trainable_parameter():
    model = tiny().train()
    all_outputs_loss(model(torch.rand(1, 2, 2, 3, 32, 32))).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert name == "aggregator.patch_embed.mask_token"
            continue
        assert param.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def checkpointed_backward(mode: str) -> dict:
    """The tiny model's loss, gradients, backward FLOPs (torch's counter) and the calls of its first
    intra-view and cross-view blocks in one training step under model.activation_checkpointing=`mode`."""
    model = tiny(activation_checkpointing=mode).train()
    calls = {}
    for kind, block in (
        ("intra", model.aggregator.intra_view_blocks[0]),
        ("view", model.aggregator.cross_view_blocks[0]),
    ):
        calls[kind] = 0

        def counted_forward(*args, kind=kind, forward=block.forward, **kwargs):
            calls[kind] += 1
            return forward(*args, **kwargs)

        block.forward = counted_forward
    torch.manual_seed(3)  # DINOv3 RoPE draws a random coordinate rescale in train mode
    loss = all_outputs_loss(model(torch.rand(1, 2, 2, 3, 32, 32)))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "flops": counter.get_total_flops(), "calls": calls}


@pytest.fixture
def without_checkpointing():
    """The reference run, under the same torch threads as the test (a module fixture would run before the
    test's threads are set, and a different reduction order moves gradients by more than the tolerance)."""
    return checkpointed_backward("none")


@pytest.mark.parametrize(
    "mode, recomputed",
    [
        ("full", {"intra": 2, "view": 2}),
        ("selective", {"intra": 2, "view": 2}),
        ("every_other", {"intra": 2, "view": 1}),
    ],
)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode, recomputed, without_checkpointing):
    """Each model.activation_checkpointing mode against none: its blocks run again in backward (every_other:
    the even block calls only), selective without redoing a matmul (torch's FLOP counter sees the backward of
    none), and the gradients are the same."""
    plain, checkpointed = without_checkpointing, checkpointed_backward(mode)
    assert plain["calls"] == {"intra": 1, "view": 1} and checkpointed["calls"] == recomputed
    if mode == "selective":
        assert checkpointed["flops"] == plain["flops"]
    else:
        assert checkpointed["flops"] > plain["flops"]
    torch.testing.assert_close(checkpointed["loss"], plain["loss"], rtol=0, atol=0)
    assert checkpointed["grads"].keys() == plain["grads"].keys()
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frames_chunk_size_gives_same_points():
    model = tiny().eval()
    chunked = copy.deepcopy(model)
    chunked.frames_chunk_size = 1
    images = torch.rand(1, 3, 2, 3, 32, 32)
    with torch.no_grad():
        full, parts = model(images), chunked(images)
    torch.testing.assert_close(parts["points"], full["points"])
    torch.testing.assert_close(parts["points_conf"], full["points_conf"])


def test_image_size_must_be_a_multiple_of_the_patch_size():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"multiples of the patch size 16, got 40x64.*e\.g\. to 32x64"):
        model(torch.rand(1, 1, 1, 3, 40, 64))


def test_too_many_frames_is_a_clear_error():
    model = tiny(max_frames=2).eval()
    with pytest.raises(ValueError, match=r"3 frames.*at most 2.*model\.max_frames"):
        model(torch.rand(1, 3, 1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Reference weights (the fixture's rule), checked on the tiny preset
# ---------------------------------------------------------------------------------------------


def test_reference_state_dict_matches_in_place_fill():
    model = tiny()
    expected = reference_state_dict(model, seed=5)
    fill_reference_weights(model, seed=5)
    state = model.state_dict()
    assert list(state) == list(expected)
    for key in state:
        assert torch.equal(state[key], expected[key]), key
    assert weights_digest(state) == weights_digest(expected)

    layout = model_layout(ModelConfig(size="tiny"))
    buffers = dict(model.named_buffers())
    from_layout = reference_state_dict(layout, seed=5, buffers={k: v for k, v in buffers.items() if k in state})
    assert weights_digest(from_layout) == weights_digest(state)
    assert weights_digest(reference_state_dict(model, seed=6)) != weights_digest(state)


def test_reference_rule_values():
    ln = reference_state_dict({"x.norm.weight": [[8], "float32"]})["x.norm.weight"]
    z = torch.randn(8, generator=torch.Generator().manual_seed(1234 + zlib.crc32(b"x.norm.weight")))
    assert torch.equal(ln, z * 0.1 + 1)
    kernel = reference_state_dict({"a.weight": [[4, 3, 2, 2], "float32"]})["a.weight"]
    assert abs(kernel.std().item() - 1 / 12**0.5) < 0.15


# ---------------------------------------------------------------------------------------------
# DINOv3 weights through the config
# ---------------------------------------------------------------------------------------------


def test_dino_weights_are_loaded_from_the_config(tmp_path):
    source = tiny().aggregator.patch_embed
    for param in source.parameters():
        param.data.normal_()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "dino.pth")
    save_file(state, str(tmp_path / "dino.safetensors"))

    for name in ("dino.pth", "dino.safetensors"):
        model = build_model(ModelConfig(size="tiny", dino_v3_weight_path=str(tmp_path / name)))
        for key, value in model.aggregator.patch_embed.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_dino_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.dino_v3_weight_path.*nowhere\.pth"):
        build_model(ModelConfig(size="tiny", dino_v3_weight_path=str(tmp_path / "nowhere.pth")))

    state = tiny().aggregator.patch_embed.state_dict()
    state["extra.weight"] = state.pop("norm.weight")
    torch.save(state, tmp_path / "bad.pth")
    expected = r"(?s)model\.dino_v3_weight_path.*missing.*norm\.weight.*unexpected.*extra\.weight"
    with pytest.raises(WeightsMismatchError, match=expected):
        build_model(ModelConfig(size="tiny", dino_v3_weight_path=str(tmp_path / "bad.pth")))


# ---------------------------------------------------------------------------------------------
# load_weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def source_state():
    model = tiny()
    for param in model.parameters():
        param.data.uniform_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_loaded(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("form", ["bare", "model_key", "ddp_prefix", "safetensors"])
def test_load_weights_formats(tmp_path, source_state, form):
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(source_state, str(path))
    else:
        path = tmp_path / "w.pt"
        payload = {
            "bare": source_state,
            "model_key": {"model": source_state, "optimizer": {}, "prev_epoch": 3},
            "ddp_prefix": {f"module.{k}": v for k, v in source_state.items()},
        }[form]
        torch.save(payload, path)
    model = tiny()
    report = load_weights(model, path, strict=True)
    assert report.ok and len(report.loaded) == len(source_state)
    assert_loaded(model, source_state)
    n = len(source_state)
    assert f"loaded {n} of {n} model entries; 0 missing, 0 unexpected, 0 shape mismatched" in report.summary()


def test_load_weights_strict_mismatch_names_the_keys(tmp_path, source_state):
    state = dict(source_state)
    del state["point_head.norm.weight"]
    state["point_head.unknown.bias"] = torch.zeros(3)
    state["ego_pose_head.embed_pose.weight"] = torch.zeros(5, 7)
    torch.save(state, tmp_path / "w.pt")

    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(model, tmp_path / "w.pt", strict=True)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "1 missing, 1 unexpected, 1 shape mismatched" in message
    assert "point_head.norm.weight" in message and "point_head.unknown.bias" in message
    assert "ego_pose_head.embed_pose.weight: [5, 7] vs [192, 7]" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded

    report = load_weights(model, tmp_path / "w.pt", strict=False)
    assert report.missing == ["point_head.norm.weight"]
    assert report.unexpected == ["point_head.unknown.bias"]
    assert [k for k, _, _ in report.mismatched] == ["ego_pose_head.embed_pose.weight"]
    state_after = model.state_dict()
    assert torch.equal(state_after["ego_pose_head.embed_pose.weight"], before["ego_pose_head.embed_pose.weight"])
    assert torch.equal(state_after["point_head.norm.bias"], source_state["point_head.norm.bias"])


def test_load_weights_summary_groups_many_keys(tmp_path, source_state):
    state = {k: v for k, v in source_state.items() if not k.startswith("aggregator.")}
    torch.save(state, tmp_path / "heads_only.pt")
    report = load_weights(tiny(), tmp_path / "heads_only.pt", strict=False)
    assert len(report.missing) > 10
    missing_line = next(line for line in report.summary().splitlines() if "missing (" in line)
    assert "aggregator.patch_embed.* (" in missing_line and "aggregator.intra_view_blocks.* (" in missing_line
    assert len(missing_line.split(", ")) <= 10


def test_load_weights_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_weights(tiny(), tmp_path / "absent.pt", strict=True)

    for name, content in (("corrupt.pt", b"not a checkpoint"), ("corrupt.safetensors", b"\x00\x01garbage")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a valid checkpoint"):
            load_weights(tiny(), tmp_path / name, strict=False)


def test_load_weights_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Path("/tmp")}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="objects.pt is not a valid checkpoint"):
        load_weights(tiny(), tmp_path / "objects.pt", strict=False)

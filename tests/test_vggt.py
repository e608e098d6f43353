"""VGGT model: layout of the full model (and of `dvgt model-info`), behaviour of the small presets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvgt.config import ModelConfig
from dvgt.families import build_model, model_layout
from dvgt.models.reference_weights import rule_group

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "vggt_state_dict.json").read_text())
pytestmark = pytest.mark.torch_threads(2)


def tiny_vggt(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="vggt", size="tiny", **overrides))


def test_full_layout_matches_reference_json():
    layout = model_layout(ModelConfig(name="vggt", size="full"))
    assert list(layout["state_dict"].items()) == list(REFERENCE["state_dict"].items())  # keys, order, shapes
    assert layout["num_parameters"] == REFERENCE["num_parameters"] == 1_157_941_558


def test_model_info_cli_prints_the_reference_layout():
    command = [sys.executable, "-m", "dvgt", "model-info", "--config", "train/vggt/default.yaml", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["model"], info["size"], info["num_parameters"]) == ("vggt", "full", 1_157_941_558)
    assert list(info["state_dict"].items()) == list(REFERENCE["state_dict"].items())


def test_reference_rule_groups_of_full_model():
    groups = [rule_group(k, shape) for k, (shape, _) in REFERENCE["state_dict"].items()]
    assert {g: groups.count(g) for g in "abcd"} == {"a": 252, "b": 341, "c": 7, "d": 741}


def test_trainable_parameters_at_init():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="vggt", size="full"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == REFERENCE["num_trainable_parameters_at_init"]  # DINOv2's mask token is frozen


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_forward_shapes_and_finite(size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vggt", size=size)).eval()
    images = torch.rand(3, 2, 3, 28, 42)  # [T, V, 3, H, W]: a batch dim is added
    with torch.no_grad():
        out = model(images)
    assert out["cam_pose_enc"].shape == (1, 3, 2, 9)
    assert [p.shape for p in out["cam_pose_enc_list"]] == [(1, 3, 2, 9)] * 4
    assert out["cam_pose_enc"] is out["cam_pose_enc_list"][-1]
    assert out["points"].shape == (1, 3, 2, 28, 42, 3)
    assert out["points_conf"].shape == (1, 3, 2, 28, 42)
    assert torch.equal(out["images"], images[None])
    for key in ("cam_pose_enc", "points", "points_conf"):
        assert torch.isfinite(out[key]).all(), key
    assert (out["cam_pose_enc"][..., 7:] >= 0).all()  # ReLU on the field of view
    model.train()
    assert "images" not in model(images)


def test_only_the_first_image_gets_the_first_token_variant():
    """Image 0 (frame 0, view 0) differs from the other images of frame 0 only through its special tokens."""
    model = tiny_vggt().eval()
    with torch.no_grad():
        model.aggregator.camera_token[:, 1].normal_()  # make the two variants clearly different
        images = torch.rand(1, 1, 1, 3, 28, 28).expand(1, 2, 2, 3, 28, 28)  # 4 identical images
        tokens = model.aggregator(images)[0][0]  # [B, S, N, 2C]
    frame_half = tokens[0, :, :, : tokens.shape[-1] // 2]  # frame attention only sees its own image
    assert not torch.allclose(frame_half[0], frame_half[1])
    torch.testing.assert_close(frame_half[1], frame_half[2])
    torch.testing.assert_close(frame_half[1], frame_half[3])


def test_backward_reaches_every_trainable_parameter():
    model = tiny_vggt().train()
    out = model(torch.rand(1, 2, 2, 3, 28, 28))
    loss = sum(p.square().mean() for p in out["cam_pose_enc_list"]) + out["points"].square().mean()
    (loss + out["points_conf"].log().mean()).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert name == "aggregator.patch_embed.mask_token"
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} received no gradient"


def test_position_embedding_is_resized_to_the_patch_grid():
    backbone = tiny_vggt().aggregator.patch_embed
    full = backbone.position_embedding(37, 37, torch.float32)
    assert torch.equal(full, backbone.pos_embed)  # the 518 px grid is used as stored
    resized = backbone.position_embedding(4, 8, torch.float32)
    assert resized.shape == (1, 1 + 32, backbone.pos_embed.shape[-1])
    assert torch.equal(resized[:, 0], backbone.pos_embed[:, 0])  # the CLS entry is not resized


def test_image_size_must_be_a_multiple_of_14():
    with pytest.raises(ValueError, match=r"multiples of the patch size 14, got 32x64.*e\.g\. to 28x56"):
        tiny_vggt().eval()(torch.rand(1, 1, 1, 3, 32, 64))


def test_dino_v3_weights_do_not_apply_to_vggt(tmp_path):
    with pytest.raises(ValueError, match="dino_v3_weight_path is for DVGT models.*direct_load_pretrained_weights_path"):
        build_model(ModelConfig(name="vggt", size="tiny", dino_v3_weight_path=str(tmp_path / "w.pth")))

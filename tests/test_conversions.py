"""Weight conversions (dvgt/models/conversions.py): VGGT-1B -> DVGT-1 / DVGT-2, DVGT-2 stage 1 -> 2.

Full-size checks run on meta tensors (no RAM): every converted key must exist in the target's
reference layout with the same shape. Value checks use the tiny presets, whose blocks have the
structure of the full ones: each target tensor is compared with its source, and tensors the mapping
does not touch must keep their initialisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dvgt.config import ModelConfig
from dvgt.families import build_model, convert_for, initialise_from_pretrained
from dvgt.models import load_weights
from dvgt.models.conversions import (
    DVGT2_STAGE1,
    VGGT,
    detect_source,
    dvgt2_stage1_to_stage2,
    vggt_to_dvgt1,
    vggt_to_dvgt2,
)

DATA = Path(__file__).parent / "data"


def reference_layout(name: str) -> dict:
    """{key: shape} of the official full-size model `name` (a reference JSON in tests/data).

    DVGT-2 is not built here yet; once it is, `model_layout(ModelConfig(name=name))["state_dict"]`
    gives the same layout (a test compares the two), and this helper can use it instead.
    """
    layout = json.loads((DATA / f"{name}_state_dict.json").read_text())["state_dict"]
    return {k: tuple(shape) for k, (shape, _) in layout.items()}


def meta_state(layout: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


def mapped_key(key: str) -> tuple:
    """Where the reference README's rules send a VGGT key in DVGT: (DVGT-1 targets, DVGT-2 targets)."""
    block = re.match(r"aggregator\.(frame|global)_blocks\.(.*)", key)
    if block:
        stacks = ["intra_view"] if block.group(1) == "frame" else ["cross_view", "cross_frame"]
        targets = [f"aggregator.{s}_blocks.{block.group(2)}" for s in stacks]
        return targets, targets
    tokens = {
        "aggregator.camera_token": "aggregator.ego_pose_token",
        "aggregator.register_token": "aggregator.register_token",
    }
    return ([tokens[key]] if key in tokens else []), []


@pytest.fixture(scope="module")
def vggt_full_meta():
    return meta_state(reference_layout("vggt"))


# ---------------------------------------------------------------------------------------------
# Full-size layouts (meta tensors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, convert, rules",
    [("dvgt1", vggt_to_dvgt1, 0), ("dvgt2", vggt_to_dvgt2, 1), ("dvgt2_pretrain", vggt_to_dvgt2, 1)],
)
def test_vggt_full_layout_maps_onto_the_target_layout(vggt_full_meta, target, convert, rules):
    layout = reference_layout(target)
    conversion = convert(vggt_full_meta)
    expected = {t: k for k in vggt_full_meta for t in mapped_key(k)[rules]}
    assert set(conversion.state) == set(expected)
    for key, value in conversion.state.items():
        assert layout.get(key) == tuple(value.shape), key
    assert set(conversion.dropped) == {k for k in vggt_full_meta if not mapped_key(k)[rules]}
    # every attention block of the target is initialised: 24 x 3 stacks
    blocks = {k for k in layout if re.match(r"aggregator\.(intra_view|cross_view|cross_frame)_blocks\.", k)}
    assert blocks <= set(conversion.state) and len({k.split(".")[2] for k in blocks}) == 24


def test_dvgt2_stage1_full_layout_maps_onto_stage2():
    stage1, stage2 = reference_layout("dvgt2_pretrain"), reference_layout("dvgt2")
    conversion = dvgt2_stage1_to_stage2(meta_state(stage1))
    assert conversion.state["aggregator.ego_pose_token"].shape == (1, 9, 1024)
    assert conversion.dropped == [k for k in stage1 if k.startswith("ego_pose_head.")]
    for key, value in conversion.state.items():
        assert stage2.get(key) == tuple(value.shape), key
    # what stage 2 does not get from stage 1 is its new ego head (trajectory/pose decoder)
    assert {k.split(".")[0] for k in set(stage2) - set(conversion.state)} == {"ego_pose_head"}


def test_source_layouts_are_detected(vggt_full_meta):
    assert detect_source(vggt_full_meta) == VGGT
    assert detect_source(meta_state(reference_layout("dvgt2_pretrain"))) == DVGT2_STAGE1
    for name in ("dvgt1", "dvgt2"):  # same-architecture weights are not a conversion source
        with pytest.raises(ValueError, match="neither VGGT-1B.*nor a DVGT-2 stage-1.*direct_load_pretrained"):
            detect_source(meta_state(reference_layout(name)))
    with pytest.raises(ValueError, match="DVGT-2 stage 1 weights cannot initialise model 'dvgt1'.*dvgt2"):
        convert_for("dvgt1", meta_state(reference_layout("dvgt2_pretrain")))
    with pytest.raises(ValueError, match="VGGT-1B weights cannot initialise model 'vggt'"):
        convert_for("vggt", vggt_full_meta)


# ---------------------------------------------------------------------------------------------
# Values, on the tiny presets
# ---------------------------------------------------------------------------------------------


def random_tiny_vggt_state() -> dict:
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="vggt", size="tiny"))
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def test_vggt_weights_initialise_dvgt1_exactly_per_the_mapping(tmp_path):
    source = random_tiny_vggt_state()
    path = tmp_path / "model.safetensors"
    save_file(source, str(path))
    torch.manual_seed(2)
    model = build_model(ModelConfig(name="dvgt1", size="tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report, conversion = initialise_from_pretrained(model, "dvgt1", path)

    after = model.state_dict()
    origin = {t: k for k in source for t in mapped_key(k)[0]}  # DVGT-1 key -> VGGT key
    assert set(report.loaded) == set(origin) and not report.unexpected and not report.mismatched
    for key, value in after.items():
        if key in origin:
            assert torch.equal(value, source[origin[key]]), key
        else:
            assert torch.equal(value, before[key]), f"{key} should keep its initialisation"
    assert torch.equal(
        after["aggregator.cross_view_blocks.2.attn.qkv.weight"],
        after["aggregator.cross_frame_blocks.2.attn.qkv.weight"],
    )
    summary = report.summary()
    assert "frame blocks -> intra-view" in conversion.description
    assert f"loaded {len(origin)} of {len(after)} model entries" in summary
    assert re.search(
        r"ignored \(not used by VGGT-1B -> dvgt1\): aggregator\.\* \(\d+\), camera_head\.\* \(\d+\), "
        r"point_head\.\* \(\d+\)",
        summary,
    )
    assert {k for k in conversion.dropped if k.startswith("aggregator.")} == {
        k for k in source if k.startswith("aggregator.patch_embed.")
    }  # DINOv2 is not DVGT-1's backbone
    assert re.search(r"missing \(in the model, not in the file\): .*ego_pose_head\.\* \(", summary)


def test_vggt_weights_convert_for_dvgt2_blocks_only():
    source = random_tiny_vggt_state()
    conversion = convert_for("dvgt2", source)
    assert "aggregator.ego_pose_token" not in conversion.state and "aggregator.register_token" not in conversion.state
    origin = {t: k for k in source for t in mapped_key(k)[1]}
    assert set(conversion.state) == set(origin)
    for key, value in conversion.state.items():
        assert torch.equal(value, source[origin[key]]), key


def test_dvgt2_stage1_to_stage2_values():
    stage1 = {
        "aggregator.ego_pose_token": torch.randn(1, 1, 16),
        "aggregator.register_token": torch.randn(1, 4, 16),
        "aggregator.cross_frame_blocks.0.attn.qkv.weight": torch.randn(48, 16),
        "ego_pose_head.pose_branch.fc2.weight": torch.randn(7, 8),
        "point_head.norm.weight": torch.randn(48),
    }
    torch.manual_seed(0)
    conversion = convert_for("dvgt2", stage1)
    state = conversion.state
    assert conversion.source == DVGT2_STAGE1 and conversion.dropped == ["ego_pose_head.pose_branch.fc2.weight"]
    assert set(state) == set(stage1) - {"ego_pose_head.pose_branch.fc2.weight"}
    token = state["aggregator.ego_pose_token"]
    assert token.shape == (1, 9, 16)
    assert torch.equal(token[:, :1], stage1["aggregator.ego_pose_token"])
    future = token[:, 1:]
    assert 0 < future.abs().max() < 1e-5 and 0.5e-6 < future.std() < 2e-6  # N(0, 1e-6)
    for key in set(stage1) - {"aggregator.ego_pose_token", "ego_pose_head.pose_branch.fc2.weight"}:
        assert torch.equal(state[key], stage1[key]), key


# ---------------------------------------------------------------------------------------------
# VGGT-1B loaded directly into VGGT: disabled heads are ignored, not unexpected
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_vggt_checkpoint_with_depth_and_track_heads_loads_into_vggt(tmp_path, strict):
    source = random_tiny_vggt_state()
    extra = {"depth_head.norm.weight": torch.ones(128), "track_head.fnet.conv.weight": torch.ones(4, 4)}
    path = tmp_path / "model.safetensors"
    save_file({**source, **extra}, str(path))
    model = build_model(ModelConfig(name="vggt", size="tiny"))

    report = load_weights(model, path, strict=strict)

    assert report.ok and set(report.loaded) == set(source)
    assert report.ignored == {"head disabled": list(extra)}
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    lines = report.summary().splitlines()
    assert lines[0].endswith("0 missing, 0 unexpected, 0 shape mismatched, 2 ignored")
    assert lines[1] == "  ignored (head disabled): depth_head.norm.weight, track_head.fnet.conv.weight"


# ---------------------------------------------------------------------------------------------
# The trainer: checkpoint.load_pretrained_weights_path
# ---------------------------------------------------------------------------------------------


def test_trainer_initialises_dvgt1_from_vggt_weights(tiny_data_root, tmp_path, capsys):
    from conftest import tiny_overrides

    from dvgt.config import load_config
    from dvgt.train.loop import Trainer

    source = random_tiny_vggt_state()
    path = tmp_path / "model.safetensors"
    save_file(source, str(path))
    cfg = load_config(
        "train/dvgt1/demo.yaml",
        tiny_overrides(
            tiny_data_root,
            tmp_path / "run",
            **{"checkpoint.load_pretrained_weights_path": path, "limit_val_batches": 0},
        ),
    )
    trainer = Trainer(cfg)
    try:
        state = trainer.model.state_dict()
        assert torch.equal(state["aggregator.ego_pose_token"], source["aggregator.camera_token"])
        assert torch.equal(
            state["aggregator.cross_frame_blocks.3.mlp.fc2.bias"], source["aggregator.global_blocks.3.mlp.fc2.bias"]
        )
    finally:
        trainer.close()
    printed = capsys.readouterr().out
    assert f"Initialised from {path} (VGGT-1B -> DVGT-1:" in printed
    mapped = {t for k in source for t in mapped_key(k)[0]}
    assert f"loaded {len(mapped)} of {len(state)} model entries" in printed
    assert "ignored (not used by VGGT-1B -> dvgt1)" in printed

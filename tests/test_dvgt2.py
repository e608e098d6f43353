"""DVGT-2 and its pretrain variant at tiny size: streaming vs causal batch, sliding window, noise, anchors, ego status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dvgt.cli import main
from dvgt.config import ModelConfig
from dvgt.families import build_model, model_layout
from dvgt.models.layers import KVCache
from dvgt.models.reference_weights import fill_reference_weights

DATA = Path(__file__).parent / "data"
STREAM_TOLERANCE = 1e-5  # streaming vs causal batch: max|diff| <= STREAM_TOLERANCE * max|batch|, per output


def tiny(name: str = "dvgt2", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, size="tiny", **overrides)).eval()


def clip(T: int = 4, V: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, T, V, 3, 32, 64, generator=torch.Generator().manual_seed(seed))


def batch_noise(T: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 20, 8, 2, generator=g), torch.randn(T, 20, 3, generator=g)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_streaming_equals_one_causal_forward():
    """Frame by frame with a window covering the clip gives the causal batch forward's outputs.

    Upstream's streaming head re-adds the temporal embedding to cached ego tokens (reproduced on purpose,
    see DVGT2.inference); with a zero embedding both paths must agree, so it is zeroed here. The decoder
    gets the same noise per frame.
    """
    model, images, T = tiny(), clip(T=4), 4
    with torch.no_grad():
        model.ego_pose_head.temporal_pos_embed.zero_()
    traj_noise, pose_noise = batch_noise(T)
    with torch.no_grad():
        batch = model(images, noise=(traj_noise, pose_noise))
        stream = model.inference(
            images, infer_window=T, noise=[(traj_noise[: t + 1], pose_noise[: t + 1]) for t in range(T)]
        )
    assert set(stream) == set(batch)
    for key, expected in batch.items():
        for got, want in zip(stream[key], expected) if isinstance(expected, list) else [(stream[key], expected)]:
            assert got.shape == want.shape, key
            assert relative_error(got, want) <= STREAM_TOLERANCE, (key, relative_error(got, want))


def test_streaming_points_do_not_depend_on_the_temporal_embedding_quirk():
    """Points come from the aggregator alone: streaming equals batch whatever the head's embedding."""
    model, images = tiny(), clip(T=3)
    with torch.no_grad():
        model.ego_pose_head.temporal_pos_embed.normal_()
        batch, stream = model(images), model.inference(images, infer_window=3)
    assert relative_error(stream["points"], batch["points"]) <= STREAM_TOLERANCE
    assert relative_error(stream["points_conf"], batch["points_conf"]) <= STREAM_TOLERANCE


def test_sliding_window_bounds_the_cache_and_changes_only_later_frames():
    model, images = fill_reference_weights(tiny()), clip(T=4)  # O(1) weights: attention over frames matters
    full = model.inference(images, infer_window=4)
    windowed = model.inference(images, infer_window=2)
    # frames 0 and 1 see the same history with either window; frames 2 and 3 lose frame 0 (resp. 0 and 1)
    assert torch.equal(windowed["points"][:, :2], full["points"][:, :2])
    assert relative_error(windowed["points"][:, 2:], full["points"][:, 2:]) > 1e-3

    caches = [KVCache() for _ in model.aggregator.cross_frame_blocks]
    ego_cache = None
    tokens_per_image = model.aggregator.patch_start_idx + 2 * 4  # special tokens + (32/16) x (64/16) patches
    for t in range(4):
        _, ego_cache = model.step(images[:, t], t, caches, ego_cache, infer_window=2)
        frames = min(t + 1, 2)
        assert all(c.keys.shape[2] == frames * tokens_per_image for c in caches)
        assert ego_cache.shape[1] == frames


def test_causal_cross_frame_attention_and_pretrain_without_mask():
    """DVGT-2's frame 0 ignores later frames; the pretrain variant (no causal mask) does not."""
    images = clip(T=2)
    changed = images.clone()
    changed[:, 1] = torch.rand_like(changed[:, 1])
    for name, causal in (("dvgt2", True), ("dvgt2_pretrain", False)):
        model = tiny(name)
        torch.manual_seed(3)
        before = model(images)
        torch.manual_seed(3)
        after = model(changed)
        assert torch.equal(before["points"][:, 0], after["points"][:, 0]) == causal, name
        if causal:
            assert torch.allclose(before["diff_traj_reg_list"][-1][:, 0], after["diff_traj_reg_list"][-1][:, 0])
        else:
            assert not torch.allclose(before["relative_ego_pose_enc"][:, 0], after["relative_ego_pose_enc"][:, 0])


def test_outputs_are_deterministic_given_a_seed_or_the_noise():
    model, images = tiny(), clip(T=2)
    torch.manual_seed(7)
    first = model(images)
    torch.manual_seed(7)
    again = model(images)
    torch.manual_seed(8)
    other = model(images)
    torch.manual_seed(7)
    injected = model(images, noise=(torch.randn(2, 20, 8, 2), torch.randn(2, 20, 3)))
    for key in ("diff_traj_reg_list", "diff_traj_cls_list", "diff_poses_reg_list", "diff_poses_cls_list"):
        assert torch.equal(first[key][-1], again[key][-1]), key
        assert torch.equal(first[key][-1], injected[key][-1]), key
    assert not torch.allclose(first["diff_poses_reg_list"][-1], other["diff_poses_reg_list"][-1])
    assert torch.equal(first["points"], other["points"])  # noise only enters the planning decoder


def test_output_layout_and_trajectory_form():
    model, images = tiny(), clip(T=3)
    out = model(images)
    assert [list(x.shape) for x in out["diff_traj_reg_list"]] == [[1, 3, 20, 8, 3]] * 2
    assert [list(x.shape) for x in out["diff_traj_cls_list"]] == [[1, 3, 20]] * 2
    assert [list(x.shape) for x in out["diff_poses_reg_list"]] == [[1, 3, 20, 7]] * 2
    assert list(out["points"].shape) == [1, 3, 2, 32, 64, 3] and list(out["points_conf"].shape) == [1, 3, 2, 32, 64]
    assert out["diff_traj_reg_list"][-1][..., 2].abs().max() <= torch.pi  # heading = tanh * pi
    assert (out["points_conf"] > 1).all()
    pretrain = tiny("dvgt2_pretrain")(images)
    assert (
        list(pretrain["relative_ego_pose_enc"].shape) == [1, 3, 7] and len(pretrain["relative_ego_pose_enc_list"]) == 1
    )


@pytest.mark.parametrize("name", ["dvgt2", "dvgt2_pretrain"])
def test_training_step_reaches_every_parameter(name):
    model = tiny(name).train()
    out = model(clip(T=3), ego_status=None)
    loss = out["points"].square().mean() + out["points_conf"].log().mean()
    for _key, value in out.items():
        if isinstance(value, list):
            loss = loss + sum(v.square().mean() for v in value)
    loss.backward()
    missing = [
        k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())
    ]
    assert missing == []


def test_anchors_load_from_the_official_anchor_files(tmp_path):
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.uniform(-1, 4, size=(20, 8, 2)), axis=1)  # metres, float64 as the official files
    pose = rng.uniform(-1, 1, size=(20, 3))
    np.savez(tmp_path / "future_anchors_20_rdf.npz", centers=trajectory)
    np.savez(tmp_path / "past_anchors_20_rdf.npz", centers=pose)

    model = tiny(anchor_dir=str(tmp_path))
    decoder = model.ego_pose_head.traj_pose_decoder
    fresh = tiny().ego_pose_head.traj_pose_decoder
    assert torch.unique(fresh.norm_traj_anchor[0], dim=0).shape[0] == 1  # without a file all anchors are equal
    back = decoder.denormalize(decoder.norm_traj_anchor[0], decoder.traj_min, decoder.traj_max) / 0.1
    assert torch.allclose(back, torch.from_numpy(trajectory).float(), atol=1e-4)
    back = (
        decoder.denormalize(
            decoder.norm_pose_translation_anchor[0], decoder.pose_translation_min, decoder.pose_translation_max
        )
        / 0.1
    )
    assert torch.allclose(back, torch.from_numpy(pose).float(), atol=1e-5)
    assert "ego_pose_head.traj_pose_decoder.norm_traj_anchor" in model.state_dict()  # travels with checkpoints

    with pytest.raises(FileNotFoundError, match="anchor file .*future_anchors_20_rdf.npz' does not exist"):
        tiny(anchor_dir=str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "future_anchors_20_rdf.npz", centers=trajectory[:10])
    np.savez(tmp_path / "bad" / "past_anchors_20_rdf.npz", centers=pose)
    with pytest.raises(ValueError, match=r"'trajectory' has shape \[10, 8, 2\], expected \[20, 8, 2\]"):
        tiny(anchor_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"model.anchor_dir needs a planning model \(model.name=dvgt2\)"):
        tiny("dvgt2_pretrain", anchor_dir=str(tmp_path))
    assert model_layout(ModelConfig(name="dvgt2", size="tiny", anchor_dir=str(tmp_path / "missing")))  # no files read


def test_ego_status_conditions_the_trajectories_only():
    model = tiny(enable_ego_status=True)
    assert list(model.state_dict()["ego_pose_head.traj_pose_decoder.hist_encoding.weight"].shape) == [256 // 4, 8]
    images = clip(T=2)
    with pytest.raises(ValueError, match="pass ego_status"):
        model(images)
    status = torch.zeros(1, 2, 8)
    status[..., 4 + 1] = 1  # command: straight
    torch.manual_seed(0)
    straight = model(images, ego_status=status)
    status[..., 0] = 5.0  # faster
    torch.manual_seed(0)
    faster = model(images, ego_status=status)
    assert not torch.allclose(straight["diff_traj_reg_list"][-1], faster["diff_traj_reg_list"][-1])
    assert torch.equal(straight["diff_poses_reg_list"][-1], faster["diff_poses_reg_list"][-1])
    torch.manual_seed(0)
    streamed = model.inference(images, ego_status=status, infer_window=2)
    assert list(streamed["diff_traj_reg_list"][-1].shape) == [1, 2, 20, 8, 3]


@pytest.mark.parametrize(
    "config, name", [("train/dvgt2/default.yaml", "dvgt2"), ("train/dvgt2/pretrain.yaml", "dvgt2_pretrain")]
)
def test_model_info_cli_layout_equals_reference(config, name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["model-info", f"--config={config}", "--json"])
    assert done.value.code == 0
    info = json.loads(capsys.readouterr().out)
    reference = json.loads((DATA / f"{name}_state_dict.json").read_text())
    assert info["model"] == name and info["num_parameters"] == reference["num_parameters"]
    assert list(info["state_dict"].items()) == list(reference["state_dict"].items())

"""Evaluation metrics on synthetic clips with known answers, and the result figure."""

import math

import pytest
import torch
from PIL import Image

from dvgt.data.geometry import absT_quaR_to_pose, quaternion_to_rotation
from dvgt.train.evaluation import (EvalAccumulator, depth_in_gt_cameras, evaluate_clip, nearest_neighbour_distances,
                                   point_metrics)
from dvgt.viz import render_result_figure, render_training_curves

SCALE = 0.1


def yaw_quaternion(angle):
    """Rotation by `angle` (radians) about the ego y axis (down), as x, y, z, w."""
    return torch.tensor([0.0, math.sin(angle / 2), 0.0, math.cos(angle / 2)])


def make_clip(batch_size=2, frames=3, views=2, height=12, width=16, depth=None, identity=False, seed=0):
    """A consistent synthetic batch: depths unprojected through intrinsics, camera rig and ego motion."""
    g = torch.Generator().manual_seed(seed)
    ego_pose = torch.zeros(batch_size, frames, 7)
    cam_to_ego = torch.eye(4).repeat(batch_size, frames, views, 1, 1)
    for t in range(frames):
        ego_pose[:, t, 3:] = yaw_quaternion(0.0 if identity else 0.05 * t)
        if not identity:
            ego_pose[:, t, :3] = torch.tensor([0.3 * t, 0.0, 4.0 * t])
    for v in range(views):
        if not identity:
            cam_to_ego[:, :, v, :3, :3] = quaternion_to_rotation(yaw_quaternion(v * math.pi / 3))
            cam_to_ego[:, :, v, :3, 3] = torch.tensor([0.5 * v, -1.5, 1.0])
    ego_to_first = absT_quaR_to_pose(ego_pose)
    intrinsics = torch.tensor([[width, 0.0, width / 2], [0.0, width, height / 2], [0.0, 0.0, 1.0]])
    shape = (batch_size, frames, views, height, width)
    depths = torch.full(shape, float(depth)) if depth else 3 + 40 * torch.rand(shape, generator=g)
    vs, us = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    rays = torch.stack([us, vs, torch.ones_like(us)], dim=-1) @ torch.linalg.inv(intrinsics).T  # [H,W,3]
    cam_points = torch.cat([rays * depths[..., None], torch.ones(*shape, 1)], dim=-1)  # [B,T,V,H,W,4]
    first_from_cam = ego_to_first[:, :, None] @ cam_to_ego  # [B,T,V,4,4]
    points = (cam_points @ first_from_cam[:, :, :, None].transpose(-1, -2))[..., :3]
    masks = torch.ones(shape, dtype=torch.bool) if depth else torch.rand(shape, generator=g) < 0.9
    return {"images": torch.rand(batch_size, frames, views, 3, height, width, generator=g), "points": points,
            "point_masks": masks, "depths": depths, "intrinsics": intrinsics.expand(*shape[:3], 3, 3),
            "cam_to_ego": cam_to_ego, "ego_to_first": ego_to_first, "ego_pose": ego_pose}


def predictions_for(clip, point_offset=(0.0, 0.0, 0.0)):
    """Perfect predictions in network units (metres * SCALE), optionally shifted by point_offset metres."""
    pose = clip["ego_pose"].clone()
    pose[..., :3] *= SCALE
    points = (clip["points"] + torch.tensor(point_offset)) * SCALE
    return {"points": points, "points_conf": torch.ones(points.shape[:-1]) * 2, "absolute_ego_pose_enc": pose,
            "absolute_ego_pose_enc_list": [pose]}


def test_synthetic_clip_is_consistent_with_the_depth_projection():
    clip = make_clip()
    depth = depth_in_gt_cameras(clip["points"], clip["cam_to_ego"], clip["ego_to_first"])
    assert torch.allclose(depth, clip["depths"], atol=1e-4)


def test_perfect_predictions_score_perfectly():
    clip = make_clip()
    metrics = evaluate_clip(predictions_for(clip), clip, SCALE)
    for key in ("point_error", "accuracy", "completeness", "chamfer", "depth_abs_rel", "ego_trans_error"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-4), key
    assert metrics["depth_delta_1_25"] == 1.0
    assert metrics["pose_auc_30"] == 1.0


@pytest.mark.parametrize("offset, abs_rel, delta", [(0.5, 0.05, 1.0), (5.0, 0.5, 0.0)])
def test_known_offset_gives_the_expected_errors(offset, abs_rel, delta):
    # One camera looking down +z at a wall 10 m away; predictions pushed `offset` metres further.
    clip = make_clip(batch_size=1, frames=1, views=1, depth=10.0, identity=True)
    metrics = evaluate_clip(predictions_for(clip, (0.0, 0.0, offset)), clip, SCALE)
    for key in ("point_error", "accuracy", "completeness", "chamfer"):
        assert metrics[key] == pytest.approx(offset, rel=1e-5), key
    assert metrics["depth_abs_rel"] == pytest.approx(abs_rel, rel=1e-5)
    assert metrics["depth_delta_1_25"] == delta
    assert math.isnan(metrics["pose_auc_30"])  # one frame: no pair to judge


def test_pose_perturbation_lowers_the_auc_and_shows_in_the_translation_error():
    clip = make_clip(batch_size=1, frames=3)
    predictions = predictions_for(clip)
    predictions["absolute_ego_pose_enc"][0, 2, 3:] = yaw_quaternion(0.1 + math.radians(10.5))  # frame 2: +10.5 deg
    metrics = evaluate_clip(predictions, clip, SCALE)
    # Pairs (0,2) and (1,2) err by 10.5 deg (below 20 of the 30 thresholds), pair (0,1) is exact.
    assert metrics["pose_auc_30"] == pytest.approx((1 + 2 * 20 / 30) / 3, abs=1e-6)
    predictions = predictions_for(clip)
    predictions["absolute_ego_pose_enc"][0, 1:, 0] += 1.0 * SCALE  # 1 m sideways from frame 1 on
    metrics = evaluate_clip(predictions, clip, SCALE)
    assert metrics["ego_trans_error"] == pytest.approx(1.0, rel=1e-5)
    assert metrics["pose_auc_30"] < 1.0  # the translation directions changed


def test_nearest_neighbours_match_brute_force_and_subsampling_is_deterministic():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=g), torch.randn(40, 3, generator=g)
    a_to_b, b_to_a = nearest_neighbour_distances(a, b, chunk=7)
    full = torch.cdist(a.double(), b.double())
    assert torch.allclose(a_to_b, full.min(1).values) and torch.allclose(b_to_a, full.min(0).values)
    pred, gt = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    assert point_metrics(pred, gt, max_points=100) == point_metrics(pred, gt, max_points=100)
    assert point_metrics(pred, gt, max_points=100) != point_metrics(pred, gt, max_points=500)


def test_accumulator_weights_and_skips_undefined_values():
    accumulator = EvalAccumulator()
    accumulator.add({"chamfer": 1.0, "pose_auc_30": math.nan})
    accumulator.add({"chamfer": 4.0, "pose_auc_30": 0.5}, weight=2.0)
    accumulator.add({"objective": 7.0})
    assert accumulator.mean() == {"chamfer": 3.0, "pose_auc_30": 0.5, "objective": 7.0}


def history(eval_entries=True):
    records = []
    for step in range(1, 41, 4):
        records.append({"kind": "train", "step": step, "loss/objective": 2.0 / step - 0.1, "lr": 1e-4,
                        "loss/loss_conf_point": 1.0 / step, "loss/loss_ego_pose": 0.5 / step, "loss/loss_R": None})
        if eval_entries and step % 12 == 1:
            records.append({"kind": "eval", "step": step, "val/point_error": 3.0 / step, "val/chamfer": 1.0 / step})
    return records


def assert_png(path, min_size=(800, 300)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    assert path.stat().st_size > 20_000


@pytest.mark.parametrize("records", [history(), history(eval_entries=False), history()[:1], []],
                         ids=["full", "no-eval", "one-entry", "empty"])
def test_result_figure_is_written(tmp_path, records):
    clip = make_clip(batch_size=1, frames=3, views=2, height=24, width=40)
    predictions = predictions_for(clip, (0.3, 0.0, 1.0))
    predictions["absolute_ego_pose_enc"][0, 1:, 0] += 0.05
    out = render_result_figure(records, clip, predictions, tmp_path / "figs" / "result.png", gt_scale_factor=SCALE)
    assert_png(out, min_size=(1500, 1000))


def test_training_curves_are_written(tmp_path):
    assert_png(render_training_curves(history(), tmp_path / "curves.png"))

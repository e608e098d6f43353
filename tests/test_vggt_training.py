"""VGGT training: targets derived from the DVGT batch, camera loss, camera metrics, a tiny run that learns."""

import math

import pytest
import torch

from conftest import tiny_overrides
from dvgt.config import LossConfig, load_config
from dvgt.data.geometry import (absT_quaR_to_pose, pose_to_absT_quaR, project_points, quaternion_to_rotation,
                                transform_points)
from dvgt.train.evaluation import evaluate_clip
from dvgt.train.logger import read_log
from dvgt.train.losses import camera_loss, compute_loss, vggt_targets
from dvgt.train.loop import train
from test_evaluation import make_clip

SCALE = 1.0  # vggt/default's gt_scale_factor


def perfect_vggt_predictions(clip, scale=SCALE, iterations=4):
    points, pose = vggt_targets(clip)
    pose = torch.cat([pose[..., :3] * scale, pose[..., 3:]], dim=-1)
    return {"points": points * scale, "points_conf": torch.full(points.shape[:-1], 2.0), "cam_pose_enc": pose,
            "cam_pose_enc_list": [pose.clone() for _ in range(iterations)]}


def test_targets_are_in_the_first_camera_frame_and_reproject_into_every_camera():
    clip = make_clip(batch_size=2, frames=3, views=2)
    points, encoding = vggt_targets(clip)
    B, T, V, H, W = clip["depths"].shape
    assert points.shape == (B, T, V, H, W, 3) and encoding.shape == (B, T, V, 9)
    fov_h, fov_w = 2 * math.atan(H / 2 / W), 2 * math.atan(W / 2 / W)  # make_clip: fx = fy = W
    identity = torch.tensor([0, 0, 0, 0, 0, 0, 1, fov_h, fov_w])
    torch.testing.assert_close(encoding[:, 0, 0], identity.expand(B, 9), atol=1e-6, rtol=0)
    torch.testing.assert_close(encoding[..., 7:], torch.tensor([fov_h, fov_w]).expand(B, T, V, 2))
    assert encoding[:, 1:, :, :3].norm(dim=-1).min() > 1.0  # the other cameras moved

    vs, us = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")  # make_clip's pixels
    for t in range(T):
        for v in range(V):
            first_to_cam = absT_quaR_to_pose(encoding[:, t, v, :7].double()).float()  # [B,4,4]
            in_camera = transform_points(first_to_cam, points[:, t, v])  # [B,H,W,3]
            pixels, depth = project_points(in_camera.reshape(B, -1, 3), clip["intrinsics"][:, t, v])
            torch.testing.assert_close(depth.view(B, H, W), clip["depths"][:, t, v], atol=2e-3, rtol=1e-4)
            torch.testing.assert_close(pixels.view(B, H, W, 2), torch.stack([us, vs], -1).expand(B, H, W, 2),
                                       atol=2e-3, rtol=0)


def test_camera_loss_weighs_iterations_and_skips_invalid_clips():
    gt = torch.randn(2, 2, 3, 9)
    offset = torch.tensor([0.3, -0.3, 0.3, 0.1, 0.1, -0.1, 0.1, 0.2, -0.2])
    preds = [gt + offset * (i + 1) for i in range(4)]  # iteration i is off by (i + 1) * offset
    preds[0] = preds[0].clone()
    preds[0][1] += 100.0  # clip 1 is invalid: its error must not count
    losses = camera_loss(preds, gt, torch.tensor([True, False]), gamma=0.5, weight_trans=1.0, weight_rot=2.0,
                         weight_focal=0.5)
    weights = [0.5 ** (4 - i - 1) * (i + 1) for i in range(4)]  # gamma ** (n - i - 1) * error size
    mean_weight = sum(weights) / 4
    assert losses["loss_T"].item() == pytest.approx(0.3 * mean_weight)
    assert losses["loss_R"].item() == pytest.approx(0.1 * mean_weight)
    assert losses["loss_FL"].item() == pytest.approx(0.2 * mean_weight)
    assert losses["loss_camera"].item() == pytest.approx((0.3 + 2 * 0.1 + 0.5 * 0.2) * mean_weight)
    none_valid = camera_loss([p.requires_grad_() for p in preds], gt, torch.tensor([False, False]))
    assert none_valid["loss_camera"].item() == 0.0 and none_valid["loss_camera"].requires_grad  # keeps the graph


def test_compute_loss_dispatches_vggt_predictions_to_the_camera_loss():
    clip = make_clip(batch_size=1, frames=2, views=2, height=16, width=24, depth=None)
    cfg = LossConfig(gt_scale_factor=SCALE)
    predictions = perfect_vggt_predictions(clip)
    perfect = compute_loss(predictions, clip, cfg)
    assert perfect["loss_camera"].item() == pytest.approx(0.0, abs=1e-6)
    assert perfect["loss_reg_point"].item() == pytest.approx(0.0, abs=1e-4)
    assert "loss_ego_pose" not in perfect

    for pose in predictions["cam_pose_enc_list"]:
        pose[..., 7:] += 0.1  # 0.1 rad off on both fields of view, every iteration
    off = compute_loss(predictions, clip, cfg)
    mean_weight = sum(cfg.camera.gamma ** k for k in range(4)) / 4
    assert off["loss_FL"].item() == pytest.approx(0.1 * mean_weight, rel=1e-4)
    assert off["loss_camera"].item() == pytest.approx(cfg.camera.weight_focal * 0.1 * mean_weight, rel=1e-4)
    point_total = off["loss_conf_point"] + off["loss_reg_point"] + off["loss_grad_point"]
    expected = cfg.point.weight * point_total + cfg.camera.weight * off["loss_camera"]
    assert off["objective"].item() == pytest.approx(expected.item())


def test_camera_metrics_of_perfect_and_rotated_predictions():
    clip = make_clip(batch_size=2, frames=3, views=2)
    perfect = evaluate_clip(perfect_vggt_predictions(clip, scale=0.5), clip, 0.5)
    for key in ("point_error", "chamfer", "depth_abs_rel", "cam_trans_error", "fov_error_deg"):
        assert perfect[key] == pytest.approx(0.0, abs=1e-3), key
    assert perfect["pose_auc_30"] == 1.0 and perfect["depth_delta_1_25"] == 1.0
    assert "ego_trans_error" not in perfect

    predictions = perfect_vggt_predictions(clip)
    extrinsics = absT_quaR_to_pose(predictions["cam_pose_enc"][:, 1:, :, :7])  # frames 1.. turn by 40 degrees
    turn = torch.eye(4)
    half_angle = math.radians(20)
    turn[:3, :3] = quaternion_to_rotation(torch.tensor([0.0, math.sin(half_angle), 0.0, math.cos(half_angle)]))
    predictions["cam_pose_enc"][:, 1:, :, :7] = pose_to_absT_quaR(turn @ extrinsics)
    predictions["cam_pose_enc"][..., 7:] += math.radians(2.0)
    rotated = evaluate_clip(predictions, clip, SCALE)
    assert rotated["pose_auc_30"] < 0.2  # only the pair of frame-0 cameras is right
    assert rotated["fov_error_deg"] == pytest.approx(2.0, abs=1e-3)
    assert rotated["point_error"] == pytest.approx(0.0, abs=1e-3)  # the point maps did not change


def test_vggt_stage_learns_at_tiny_size(tiny_data_root, tmp_path):
    """train/vggt/default.yaml with the tiny model, the synthetic data set instead of the driving mixture,
    one small clip shape (2 frames x 2 views at 28 x 56, a multiple of 14) and a learning rate for a
    tiny model: within 10 steps the loss on the same held-out clip must drop clearly."""
    run = tmp_path / "vggt"
    shape = {f"data.{split}.{key}": value for split in ("train", "val") for key, value in (
        ("img_width", 56), ("views", "[2,2]"), ("frames", "[2,2]"), ("aspect_ratio", "[2.0,2.0]"))}
    cfg = load_config("train/vggt/default.yaml", tiny_overrides(tiny_data_root, run, **shape, **{
        "max_epochs": 2, "limit_train_batches": 5, "max_img_per_gpu": 4, "optim.lr": 2e-3,
        "optim.warmup_fraction": 0.0,
        "data.train.datasets": f"[{{name: synthetic, root: '{tiny_data_root}', split: train}}]"}))
    assert cfg.model.name == "vggt" and cfg.loss.gt_scale_factor == 1.0
    result = train(cfg)
    log = read_log(run / "train_log.jsonl")
    losses = [r["loss/objective"] for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    print(losses, [e["val/objective"] for e in evals])
    assert result["step"] == 10 and len(losses) == 10
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
    assert evals[-1]["val/objective"] < 0.8 * evals[0]["val/objective"]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert {"val/pose_auc_30", "val/cam_trans_error", "val/fov_error_deg", "val/point_error"} <= set(evals[-1])

"""VGGT training: camera targets from the official sample, camera loss, camera metrics, a tiny run that learns."""

import math

import pytest
import torch
from conftest import tiny_overrides
from omegaconf import OmegaConf

from dvgt.config import DataConfig, DatasetEntry, EvalConfig, LossConfig, load_config
from dvgt.data.geometry import (
    absT_quaR_to_pose,
    pose_to_absT_quaR,
    project_points,
    quaternion_to_rotation,
    transform_points,
)
from dvgt.data.loader import load_clip, open_datasets
from dvgt.data.scene_dataset import ALL_TARGETS
from dvgt.families import get
from dvgt.families.vggt import camera_targets, vggt_loss
from dvgt.train.evaluation import evaluate_batch
from dvgt.train.logger import read_log
from dvgt.train.loop import train
from dvgt.train.losses import camera_loss

SCALE = 1.0  # vggt/default's gt_scale_factor
pytestmark = pytest.mark.torch_threads(2)  # the in-process training runs (the suite ran them with 2)


@pytest.fixture(scope="module")
def clip(tiny_data_root):
    """An evaluation batch of the synthetic tree: 2 frames x 8 cameras at 28 x 56 (VGGT's patch 14)."""
    cfg = OmegaConf.structured(DataConfig(root=str(tiny_data_root)))
    cfg.val.datasets = [DatasetEntry(dataset="demo", split="val")]
    cfg.val.clip_split, cfg.val.fixed_num_frames, cfg.val.fixed_aspect_ratio, cfg.val.img_width = "DVGT1", 2, 2.0, 56
    return load_clip(open_datasets(cfg, "val", patch_size=14, gt_scale_factor=SCALE, targets=ALL_TARGETS)[0], 0)


def perfect_vggt_predictions(clip, iterations=4):
    pose = camera_targets(clip)
    points = clip["points_in_cam_first"]
    return {
        "points": points.clone(),
        "points_conf": torch.full(points.shape[:-1], 2.0),
        "cam_pose_enc": pose,
        "cam_pose_enc_list": [pose.clone() for _ in range(iterations)],
    }


def test_camera_targets_put_the_first_camera_at_the_origin_and_reproject_into_every_camera(clip):
    encoding = camera_targets(clip)
    B, T, V, H, W = clip["point_masks"].shape
    assert encoding.shape == (B, T, V, 9)
    torch.testing.assert_close(
        encoding[:, 0, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]).expand(B, 7), atol=1e-5, rtol=0
    )
    fx, fy = clip["intrinsics"][..., 0, 0], clip["intrinsics"][..., 1, 1]
    torch.testing.assert_close(encoding[..., 7], 2 * torch.atan(H / 2 / fy))
    torch.testing.assert_close(encoding[..., 8], 2 * torch.atan(W / 2 / fx))
    assert encoding[:, 1:, :, :3].norm(dim=-1).min() > 1.0  # the next frame's cameras moved metres
    vs, us = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for t, v in ((0, 3), (1, 0), (1, 6)):
        mask = clip["point_masks"][0, t, v]
        first_to_cam = absT_quaR_to_pose(encoding[0, t, v, :7].double())
        in_camera = transform_points(first_to_cam, clip["points_in_cam_first"][0, t, v].double())[mask]
        pixels, depth = project_points(in_camera, clip["intrinsics"][0, t, v].double())
        torch.testing.assert_close(depth.float(), clip["depths"][0, t, v][mask], atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(pixels.float(), torch.stack([us, vs], -1)[mask], atol=2e-3, rtol=0)


def test_camera_loss_weighs_iterations_and_skips_invalid_clips():
    gt = torch.randn(2, 2, 3, 9)
    offset = torch.tensor([0.3, -0.3, 0.3, 0.1, 0.1, -0.1, 0.1, 0.2, -0.2])
    preds = [gt + offset * (i + 1) for i in range(4)]  # iteration i is off by (i + 1) * offset
    preds[0] = preds[0].clone()
    preds[0][1] += 100.0  # clip 1 is invalid: its error must not count
    losses = camera_loss(
        preds, gt, torch.tensor([True, False]), gamma=0.5, weight_trans=1.0, weight_rot=2.0, weight_focal=0.5
    )
    weights = [0.5 ** (4 - i - 1) * (i + 1) for i in range(4)]  # gamma ** (n - i - 1) * error size
    mean_weight = sum(weights) / 4
    assert losses["loss_T"].item() == pytest.approx(0.3 * mean_weight)
    assert losses["loss_R"].item() == pytest.approx(0.1 * mean_weight)
    assert losses["loss_FL"].item() == pytest.approx(0.2 * mean_weight)
    assert losses["loss_camera"].item() == pytest.approx((0.3 + 2 * 0.1 + 0.5 * 0.2) * mean_weight)
    none_valid = camera_loss([p.requires_grad_() for p in preds], gt, torch.tensor([False, False]))
    assert none_valid["loss_camera"].item() == 0.0 and none_valid["loss_camera"].requires_grad  # keeps the graph


def test_vggt_loss_adds_the_camera_loss_to_the_point_loss(clip):
    cfg = LossConfig()
    predictions = perfect_vggt_predictions(clip)
    perfect = vggt_loss(predictions, clip, cfg)
    assert perfect["loss_camera"].item() == pytest.approx(0.0, abs=1e-6)
    assert perfect["loss_reg_point"].item() == pytest.approx(0.0, abs=1e-4)
    assert "loss_ego_pose" not in perfect

    for pose in predictions["cam_pose_enc_list"]:
        pose[..., 7:] += 0.1  # 0.1 rad off on both fields of view, every iteration
    off = vggt_loss(predictions, clip, cfg)
    mean_weight = sum(cfg.camera.gamma**k for k in range(4)) / 4
    assert off["loss_FL"].item() == pytest.approx(0.1 * mean_weight, rel=1e-4)
    assert off["loss_camera"].item() == pytest.approx(cfg.camera.weight_focal * 0.1 * mean_weight, rel=1e-4)
    point_total = off["loss_conf_point"] + off["loss_reg_point"] + off["loss_grad_point"]
    expected = cfg.point.weight * point_total + cfg.camera.weight * off["loss_camera"]
    assert off["objective"].item() == pytest.approx(expected.item())


def test_rotated_camera_predictions_lower_the_pose_auc(clip):
    predictions = perfect_vggt_predictions(clip)
    extrinsics = absT_quaR_to_pose(predictions["cam_pose_enc"][:, 1:, :, :7])  # frame 1's cameras turn by 40 degrees
    turn = torch.eye(4)
    half_angle = math.radians(20)
    turn[:3, :3] = quaternion_to_rotation(torch.tensor([0.0, math.sin(half_angle), 0.0, math.cos(half_angle)]))
    predictions["cam_pose_enc"][:, 1:, :, :7] = pose_to_absT_quaR(turn @ extrinsics)
    metrics = evaluate_batch(get("vggt"), predictions, clip, SCALE, EvalConfig())
    assert metrics["ego_n_to_ego_first_AUC@30"][0] == 0.0  # the one pair of frames is 40 degrees off
    assert metrics["ego_first_chamfer"][0] == pytest.approx(0.0, abs=1e-3)  # the point maps did not change


def test_vggt_stage_learns_at_tiny_size(tiny_data_root, tmp_path):
    """train/vggt/default.yaml with the tiny model, the synthetic data set instead of the driving mixture,
    one small clip shape (2 frames x 2 views at 28 x 56, a multiple of 14) and a learning rate for a
    tiny model: within 10 steps the loss on the same held-out clip must drop clearly."""
    run = tmp_path / "vggt"
    cfg = load_config(
        "train/vggt/default.yaml",
        tiny_overrides(
            tiny_data_root,
            run,
            **{
                "max_epochs": 2,
                "limit_train_batches": 5,
                "max_img_per_gpu": 4,
                "optim.lr": 2e-3,
                "optim.warmup_fraction": 0.0,
                "data.train.img_width": 56,
                "data.val.img_width": 56,
                "data.train.aspect_ratio": "[2.0,2.0]",
                "data.val.fixed_aspect_ratio": 2.0,
                "data.train.datasets": "[{dataset: demo, split: train}]",
                "data.val.datasets": "[{dataset: demo, split: val}]",
            },
        ),
    )
    assert cfg.model.name == "vggt" and cfg.gt_scale_factor == 1.0
    result = train(cfg)
    log = read_log(run / "train_log.jsonl")
    losses = [r["loss/objective"] for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    assert result["step"] == 10 and len(losses) == 10
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
    assert evals[-1]["val/loss/objective"] < 0.8 * evals[0]["val/loss/objective"]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert {"val/demo/ego_n_to_ego_first_AUC@30", "val/demo/ego_first_chamfer", "val/demo/ego_n_Abs Rel"} <= set(
        evals[-1]
    )

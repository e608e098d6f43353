"""Evaluation: each model family's predictions brought into the official metrics' frames and units
(perfect predictions score perfectly; known errors give the expected numbers; the official metric
definitions' invariances hold), the per-dataset accumulation, and the result figure."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dvgt.config import DataConfig, DatasetEntry, EvalConfig
from dvgt.data.geometry import camera_pose_encoding, pose_to_absT_quaR, pose_to_trajectory_rdf, quaternion_to_rotation
from dvgt.data.loader import load_clip, open_datasets
from dvgt.data.scene_dataset import ALL_TARGETS
from dvgt.families import get
from dvgt.train.evaluation import EvalAccumulator, evaluate_batch, umeyama
from dvgt.viz import render_result_figure, render_training_curves

SCALE = 0.1
ALL = EvalConfig()


@pytest.fixture(scope="module")
def clip(tiny_data_root):
    """A real evaluation batch of one clip: 3 frames (+ 8 future) x 8 cameras of the synthetic tree, scaled by 0.1."""
    cfg = OmegaConf.structured(DataConfig(root=str(tiny_data_root)))
    cfg.val.datasets = [DatasetEntry(dataset="demo", split="val")]
    cfg.val.clip_split, cfg.val.fixed_num_frames, cfg.val.future_frames = "DVGT2", 3, 8
    cfg.val.fixed_aspect_ratio, cfg.val.img_width = 2.0, 64
    return load_clip(open_datasets(cfg, "val", patch_size=16, gt_scale_factor=SCALE, targets=ALL_TARGETS)[0], 0)


def dvgt1_predictions(clip, point_offset=(0.0, 0.0, 0.0)):
    """Perfect DVGT-1 predictions (network units), optionally shifted by point_offset metres."""
    pose = pose_to_absT_quaR(clip["ego_n_to_ego_first"])
    points = clip["points_in_ego_first"] + torch.tensor(point_offset) * SCALE
    return {
        "points": points,
        "points_conf": torch.ones(points.shape[:-1]),
        "absolute_ego_pose_enc": pose,
        "absolute_ego_pose_enc_list": [pose],
    }


def assert_perfect(metrics):
    for key in ("ego_first_accuracy", "ego_first_completeness", "ego_first_chamfer", "ego_n_Abs Rel"):
        assert metrics[key][0] == pytest.approx(0.0, abs=1e-4), key
    assert metrics["ego_n_δ < 1.25"][0] == 1.0
    assert metrics["ego_n_to_ego_first_AUC@30"][0] == pytest.approx(100.0)


def test_perfect_dvgt1_predictions_score_perfectly(clip):
    assert_perfect(evaluate_batch(get("dvgt1"), dvgt1_predictions(clip), clip, SCALE, ALL))


def test_perfect_dvgt2_predictions_score_perfectly_after_chaining(clip):
    """Local points and relative poses are chained to the first frame; the planned trajectory of the last
    frame is scored against the 8 future frames (x forward, y left, yaw)."""
    B, T = clip["images"].shape[:2]
    relative = pose_to_absT_quaR(clip["ego_past_to_ego_curr"])
    trajectory = pose_to_trajectory_rdf(clip["future_ego_n_to_ego_curr"])  # [B,T,8,3]
    scores = torch.zeros(B, T, 20)
    scores[..., 5] = 1.0  # mode 5 scores best: it holds the truth
    traj_modes = torch.zeros(B, T, 20, 8, 3)
    traj_modes[:, :, 5] = trajectory
    pose_modes = torch.zeros(B, T, 20, 7)
    pose_modes[:, :, 5] = relative
    predictions = {
        "points": clip["points_in_ego_n"],
        "points_conf": torch.ones(clip["point_masks"].shape),
        "diff_traj_reg_list": [traj_modes],
        "diff_traj_cls_list": [scores],
        "diff_poses_reg_list": [pose_modes],
        "diff_poses_cls_list": [scores],
    }
    metrics = evaluate_batch(get("dvgt2"), predictions, clip, SCALE, ALL)
    assert_perfect(metrics)
    for t in range(8):
        assert metrics[f"{t}_xy_l2"][0] == pytest.approx(0.0, abs=1e-5)
        assert metrics[f"{t}_theta_l1"][0] == pytest.approx(0.0, abs=1e-5)
    traj_modes[:, -1, 5, :, 1] += 1.0 * SCALE  # the last frame's plan: 1 m further forward at every step
    shifted = evaluate_batch(get("dvgt2"), predictions, clip, SCALE, EvalConfig(points_and_poses=False))
    assert all(shifted[f"{t}_xy_l2"][0] == pytest.approx(1.0, rel=1e-4) for t in range(8))
    assert "ego_first_chamfer" not in shifted  # eval.points_and_poses=false: planning only


@pytest.mark.parametrize("umeyama_per_scene", [False, True])
def test_perfect_vggt_predictions_score_perfectly_through_the_rig(clip, umeyama_per_scene):
    """VGGT predicts cameras and points relative to the first camera; the GT rig moves them into the ego
    frames (with the optional per-clip similarity alignment, which a scaled prediction then survives)."""
    H, W = clip["images"].shape[-2:]
    cameras = camera_pose_encoding(clip["cam_first_to_cam_n"].double(), clip["intrinsics"].double(), H, W).float()
    predictions = {
        "points": clip["points_in_cam_first"],
        "points_conf": torch.ones(clip["point_masks"].shape),
        "cam_pose_enc": cameras,
        "cam_pose_enc_list": [cameras],
    }
    assert_perfect(
        evaluate_batch(get("vggt"), predictions, clip, SCALE, EvalConfig(umeyama_per_scene=umeyama_per_scene))
    )
    if umeyama_per_scene:
        scaled = dict(predictions, points=clip["points_in_cam_first"] * 2.0)
        scaled["cam_pose_enc"] = cameras.clone()
        scaled["cam_pose_enc"][..., :3] *= 2.0
        assert_perfect(evaluate_batch(get("vggt"), scaled, clip, SCALE, EvalConfig(umeyama_per_scene=True)))


def test_known_offset_gives_the_expected_errors():
    """One camera at the origin looking down +z at a wall 10 m away; predictions pushed `offset` further:
    accuracy = completeness = offset, chamfer (their sum) = 2 x offset; ray depth grows accordingly."""
    H, W = 8, 12
    depth = torch.full((1, 1, 1, H, W), 10.0)
    vs, us = torch.meshgrid(torch.arange(H) - H / 2, torch.arange(W) - W / 2, indexing="ij")
    points = torch.stack([us * 0.5, vs * 0.5, torch.full_like(us, 10.0, dtype=torch.float32)], -1)[None, None, None]
    identity = torch.eye(4)[None, None]
    clip = {
        "images": torch.zeros(1, 1, 1, 3, H, W),
        "points_in_ego_first": points * SCALE,
        "ray_depth": points.norm(dim=-1) * SCALE,
        "point_masks": depth > 0,
        "ego_n_to_ego_first": identity,
    }
    metrics = evaluate_batch(get("dvgt1"), dvgt1_predictions(clip, (0.0, 0.0, 0.5)), clip, SCALE, ALL)
    assert metrics["ego_first_accuracy"][0] == pytest.approx(0.5, rel=1e-5)
    assert metrics["ego_first_completeness"][0] == pytest.approx(0.5, rel=1e-5)
    assert metrics["ego_first_chamfer"][0] == pytest.approx(1.0, rel=1e-5)
    ray = points.norm(dim=-1)
    shifted = (points + torch.tensor([0, 0, 0.5])).norm(dim=-1)
    assert metrics["ego_n_Abs Rel"][0] == pytest.approx(((shifted - ray) / ray).mean().item(), rel=1e-5)
    assert metrics["ego_n_δ < 1.25"][0] == 1.0
    assert math.isnan(metrics["ego_n_to_ego_first_AUC@30"][0])  # one frame: no pair to judge


def test_pose_auc_follows_the_official_definition(clip):
    """Directions only: scaling every translation keeps AUC 100, and so does reversing them (the official
    error is sign-ambiguous); a 10.5 degree yaw error on the last frame lowers AUC@5 and AUC@10."""
    pose = clip["ego_n_to_ego_first"]

    def auc(predicted):
        predictions = dvgt1_predictions(clip)
        predictions["absolute_ego_pose_enc"] = pose_to_absT_quaR(predicted)
        return evaluate_batch(get("dvgt1"), predictions, clip, SCALE, ALL)

    for factor in (3.0, -1.0):
        scaled = pose.clone()
        scaled[..., :3, 3] *= factor
        assert auc(scaled)["ego_n_to_ego_first_AUC@30"][0] == pytest.approx(100.0)
    turned = pose.clone()
    yaw = quaternion_to_rotation(torch.tensor([0.0, math.sin(math.radians(5.25)), 0.0, math.cos(math.radians(5.25))]))
    turned[:, -1, :3, :3] = yaw @ turned[:, -1, :3, :3]
    metrics = auc(turned)
    assert metrics["ego_n_to_ego_first_AUC@5"][0] < 100 and metrics["ego_n_to_ego_first_AUC@10"][0] < 100
    assert metrics["ego_n_to_ego_first_AUC@30"][0] > metrics["ego_n_to_ego_first_AUC@10"][0]


def test_umeyama_recovers_a_similarity():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(50, 3, generator=g, dtype=torch.float64)
    rotation = quaternion_to_rotation(torch.randn(4, generator=g, dtype=torch.float64))
    target = 2.5 * source @ rotation.T + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    scale, R, t = umeyama(source, target)
    assert scale.item() == pytest.approx(2.5) and torch.allclose(R, rotation, atol=1e-8)
    assert torch.allclose(t, torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), atol=1e-8)


def test_accumulator_averages_per_dataset_and_skips_undefined_values():
    accumulator = EvalAccumulator()
    accumulator.add("nuscene", {"ego_first_chamfer": [1.0, 4.0], "ego_n_to_ego_first_AUC@30": [math.nan, 50.0]})
    accumulator.add("kitti", {"ego_first_chamfer": [2.0]})
    accumulator.add("loss", {"objective": [7.0]})
    assert accumulator.reduce(torch.device("cpu")) == {
        "kitti/ego_first_chamfer": 2.0,
        "loss/objective": 7.0,
        "nuscene/ego_first_chamfer": 2.5,
        "nuscene/ego_n_to_ego_first_AUC@30": 50.0,
    }


# --------------------------------------------------------------------------------------------
# Result figure
# --------------------------------------------------------------------------------------------


def history(eval_entries=True):
    records = []
    for step in range(1, 41, 4):
        records.append(
            {
                "kind": "train",
                "step": step,
                "loss/objective": 2.0 / step - 0.1,
                "lr": 1e-4,
                "loss/loss_conf_point": 1.0 / step,
                "loss/loss_ego_pose": 0.5 / step,
                "loss/loss_R": None,
            }
        )
        if eval_entries and step % 12 == 1:
            records.append(
                {
                    "kind": "eval",
                    "step": step,
                    "val/demo/ego_first_chamfer": 3.0 / step,
                    "val/demo/ego_first_accuracy": 1.0 / step,
                }
            )
    return records


def assert_png(path, min_size=(800, 300)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    assert path.stat().st_size > 20_000


@pytest.mark.parametrize(
    "records",
    [history(), history(eval_entries=False), history()[:1], []],
    ids=["full", "no-eval", "one-entry", "empty"],
)
def test_result_figure_is_written(tmp_path, clip, records):
    predictions = dvgt1_predictions(clip, (0.3, 0.0, 1.0))
    predictions["absolute_ego_pose_enc"][0, 1:, 0] += 0.05
    out = render_result_figure(
        records, clip, predictions, tmp_path / "figs" / "result.png", family=get("dvgt1"), gt_scale_factor=SCALE
    )
    assert_png(out, min_size=(1500, 1000))


def test_training_curves_are_written(tmp_path):
    assert_png(render_training_curves(history(), tmp_path / "curves.png"))

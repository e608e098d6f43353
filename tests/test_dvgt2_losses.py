"""DVGT-2 losses and metrics on synthetic predictions: nearest-anchor targets, perfect predictions,
masks, gradients, the best-mode metrics and the model-anchor read-out."""

import math

import pytest
import torch
from torch import nn

import dvgt

from dvgt.config import LossConfig
from dvgt.data.geometry import absT_quaR_to_pose, chain_relative_poses, pose_to_absT_quaR
from dvgt.train.dvgt2_evaluation import best_mode, evaluate_dvgt2_clip, planning_metrics
from dvgt.train.dvgt2_losses import (PlanningAnchors, anchor_mode_loss, anchors_from_model, nearest_anchor,
                                     sigmoid_focal_loss)
from dvgt.train.losses import compute_loss
from dvgt.train.evaluation import evaluate_clip

torch.set_num_threads(2)
B, T, V, H, W, K, S = 2, 3, 2, 16, 20, 5, 8
SCALE = LossConfig().gt_scale_factor


def make_anchors() -> PlanningAnchors:
    """K straight-ish trajectory anchors fanning out, K past translations behind the ego (model units)."""
    steps = torch.arange(1, S + 1, dtype=torch.float32)
    lateral = torch.linspace(-2, 2, K)[:, None] * steps / S  # metres
    trajectory = torch.stack([lateral, steps[None].expand(K, S) * torch.linspace(1, 3, K)[:, None]], -1)
    translation = torch.stack([torch.linspace(-0.2, 0.2, K), torch.zeros(K), -torch.linspace(1, 6, K)], -1)
    return PlanningAnchors(trajectory * SCALE, translation * SCALE)


def make_batch(anchors: PlanningAnchors, targets=(1, 3), seed=0):
    """Ground truth near chosen anchors: trajectory of every frame near anchor targets[0], past
    translation near anchor targets[1]; points: a surface in each frame's ego frame."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-2, 2, H), torch.linspace(-3, 3, W), indexing="ij")
    depth = 10 + torch.rand(B, T, V, H, W, generator=g) * 0.5 + ys
    points = torch.stack([xs.expand_as(depth) * depth / 5, ys.expand_as(depth) * depth / 5, depth], dim=-1)
    trajectory = torch.zeros(B, T, S, 3)
    trajectory[..., :2] = anchors.trajectory[targets[0]] / SCALE + 0.05 * torch.randn(B, T, S, 2, generator=g)
    trajectory[..., 2] = 0.01 * torch.randn(B, T, S, generator=g)
    valid = torch.ones(B, T, S, dtype=torch.bool)
    valid[:, -1, 5:] = False  # the end of the scene
    relative = torch.zeros(B, T, 7)
    relative[..., :3] = anchors.pose_translation[targets[1]] / SCALE + 0.02 * torch.randn(B, T, 3, generator=g)
    relative[..., 6] = 1.0
    relative[:, 0] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0])
    ego_to_first = chain_relative_poses(absT_quaR_to_pose(relative.double())).float()
    return {"points_local": points, "point_masks": torch.rand(B, T, V, H, W, generator=g) < 0.9,
            "future_trajectory": trajectory, "future_valid": valid, "relative_pose": relative,
            "ego_pose": pose_to_absT_quaR(ego_to_first), "ego_to_first": ego_to_first,
            "depths": depth, "cam_to_ego": torch.eye(4).expand(B, T, V, 4, 4).clone()}


def perfect_predictions(batch, targets=(1, 3), layers=2, seed=1):
    """Random modes with the target mode exact and scored highest, per decoder layer."""
    g = torch.Generator().manual_seed(seed)
    traj_gt = torch.cat([batch["future_trajectory"][..., :2] * SCALE, batch["future_trajectory"][..., 2:]], -1)
    pose_gt = torch.cat([batch["relative_pose"][..., :3] * SCALE, batch["relative_pose"][..., 3:]], -1)
    out = {"points": batch["points_local"] * SCALE, "points_conf": torch.full(batch["point_masks"].shape, 2.0)}
    for name, gt, target in (("traj", traj_gt, targets[0]), ("poses", pose_gt, targets[1])):
        regs, scores = [], []
        for _ in range(layers):
            reg = torch.randn(B, T, K, *gt.shape[2:], generator=g)
            reg[:, :, target] = gt
            score = torch.full((B, T, K), -8.0)
            score[:, :, target] = 8.0
            regs.append(reg)
            scores.append(score)
        out[f"diff_{name}_reg_list"], out[f"diff_{name}_cls_list"] = regs, scores
    return out


def test_nearest_anchor_uses_only_valid_steps():
    anchors = make_anchors().trajectory
    gt = anchors[[2, 4]].clone() + 0.001
    valid = torch.ones(2, S, dtype=torch.bool)
    assert nearest_anchor(gt, valid, anchors).tolist() == [2, 4]
    gt[0, 4:] = anchors[0, 4:]  # the invalid tail of sample 0 looks like anchor 0 ...
    valid[0, 4:] = False
    assert nearest_anchor(gt, valid, anchors)[0] == 2  # ... and is ignored
    valid[0, 4:] = True
    gt[0, :4] = anchors[0, :4]
    assert nearest_anchor(gt, valid, anchors)[0] == 0


def test_perfect_predictions_give_zero_regression_and_small_classification():
    anchors, cfg = make_anchors(), LossConfig()
    batch = make_batch(anchors)
    losses = compute_loss(perfect_predictions(batch), batch, cfg, anchors)
    for key in ("loss_traj_reg", "loss_pose_reg", "loss_T", "loss_R", "loss_reg_point"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6), key
    assert 0 < losses["loss_traj_cls"].item() < 1e-4 and 0 < losses["loss_pose_cls"].item() < 1e-4
    wrong = perfect_predictions(batch, targets=(2, 0))  # the right values under the wrong anchors
    worse = compute_loss(wrong, batch, cfg, anchors)
    assert worse["loss_traj_cls"] > 100 * losses["loss_traj_cls"] and worse["loss_traj_reg"] > 0.1
    assert worse["loss_pose_cls"] > 100 * losses["loss_pose_cls"] and worse["loss_pose_reg"] > 0.1
    assert set(losses) >= {"objective", "loss_conf_point", "loss_grad_point"}


def test_masks_frame_zero_and_layers():
    anchors, cfg = make_anchors(), LossConfig()
    batch = make_batch(anchors)
    predictions = perfect_predictions(batch)
    base = compute_loss(predictions, batch, cfg, anchors)
    changed = {k: [v.clone() for v in vs] if isinstance(vs, list) else vs.clone() for k, vs in predictions.items()}
    for reg in changed["diff_traj_reg_list"]:
        reg[:, -1, :, 5:] += 3.0  # only steps past the end of the scene
    for reg in changed["diff_poses_reg_list"]:
        reg[:, 0] += 3.0  # only frame 0, which has no previous frame
    again = compute_loss(changed, batch, cfg, anchors)
    assert again["loss_traj_reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert again["loss_pose_reg"].item() == pytest.approx(0.0, abs=1e-6)
    changed["diff_traj_reg_list"][0][:, 1] += 1.0  # a valid frame of the first decoder layer counts
    assert compute_loss(changed, batch, cfg, anchors)["loss_traj_reg"] > 0.1
    assert base["objective"].item() == pytest.approx(again["objective"].item(), rel=1e-6)
    empty = dict(batch, future_valid=torch.zeros(B, T, S, dtype=torch.bool))
    none = compute_loss(predictions, empty, cfg, anchors)
    assert none["loss_traj_cls"].item() == 0 and none["loss_traj_reg"].item() == 0


def test_layers_are_summed_and_weights_enter_the_objective():
    anchors = make_anchors()
    batch = make_batch(anchors)
    reg = [torch.zeros(B, T, K, S, 3), torch.ones(B, T, K, S, 3)]
    cls = [torch.zeros(B, T, K)] * 2
    gt = torch.zeros(B, T, S, 3)
    valid = torch.ones(B, T, S, dtype=torch.bool)
    cls_loss, reg_loss = anchor_mode_loss(reg, cls, gt, valid, anchors.trajectory, LossConfig().planning)
    assert reg_loss.tolist() == pytest.approx([1.0, 1.0, 1.0])  # layer 0 adds 0, layer 1 adds 1 per component
    expected = 2 * sigmoid_focal_loss(torch.zeros(1, K), torch.eye(K)[:1]).mean()
    assert cls_loss.item() == pytest.approx(expected.item())
    cfg = LossConfig()
    predictions = perfect_predictions(batch)
    for reg in predictions["diff_traj_reg_list"]:
        reg += 0.5
    base = compute_loss(predictions, batch, cfg, anchors)
    cfg.planning.reg_weight *= 2
    doubled = compute_loss(predictions, batch, cfg, anchors)
    extra = cfg.planning.weight * cfg.planning.reg_weight / 2 * base["loss_traj_reg"]
    assert doubled["objective"].item() == pytest.approx((base["objective"] + extra).item(), rel=1e-5)


def test_focal_loss_matches_its_definition():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack([-0.25 * (1 - p[0]) ** 2 * torch.log(p[0]), -0.75 * p[1] ** 2 * torch.log(1 - p[1]),
                            -0.75 * p[2] ** 2 * torch.log(1 - p[2])])
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.25, 2.0), expected)


def test_gradients_reach_every_prediction():
    anchors = make_anchors()
    batch = make_batch(anchors)
    predictions = perfect_predictions(batch)
    leaves = []
    for key, value in predictions.items():
        values = value if isinstance(value, list) else [value]
        values = [(v + 0.1).requires_grad_() for v in values]
        leaves += values
        predictions[key] = values if isinstance(value, list) else values[0]
    compute_loss(predictions, batch, LossConfig(), anchors)["objective"].backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_stage1_relative_pose_loss_and_missing_anchors():
    anchors = make_anchors()
    batch = make_batch(anchors)
    pose = torch.cat([batch["relative_pose"][..., :3] * SCALE, batch["relative_pose"][..., 3:]], -1)
    predictions = {"points": batch["points_local"] * SCALE, "points_conf": torch.full(batch["point_masks"].shape, 2.0),
                   "relative_ego_pose_enc": pose, "relative_ego_pose_enc_list": [pose.clone()]}
    losses = compute_loss(predictions, batch, LossConfig())
    assert losses["loss_T"].item() == pytest.approx(0, abs=1e-7) and losses["loss_R"].item() == pytest.approx(0, abs=1e-7)
    predictions["relative_ego_pose_enc_list"][0][:, 0] += 1.0  # frame 0 is not supervised
    assert compute_loss(predictions, batch, LossConfig())["loss_T"].item() == pytest.approx(0, abs=1e-7)
    predictions["relative_ego_pose_enc_list"][0][:, 1, 2] += 0.3
    assert compute_loss(predictions, batch, LossConfig())["loss_T"].item() > 0.01
    with pytest.raises(ValueError, match="anchors"):
        compute_loss(perfect_predictions(batch), batch, LossConfig())


def test_anchors_are_read_from_the_model_buffers():
    g = torch.Generator().manual_seed(0)
    anchors = PlanningAnchors(torch.randn(20, S, 2, generator=g), 0.1 * torch.randn(20, 3, generator=g))  # 20: the model's
    model = dvgt.build_model("train/dvgt2/demo.yaml", ["model.size=tiny", "model.anchor_path=null"])
    model.get_submodule("ego_pose_head.traj_pose_decoder").set_anchors(anchors.trajectory / SCALE,
                                                                       anchors.pose_translation / SCALE)
    read = anchors_from_model(model)
    torch.testing.assert_close(read.trajectory, anchors.trajectory, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(read.pose_translation, anchors.pose_translation, atol=1e-6, rtol=1e-5)
    assert anchors_from_model(dvgt.build_model("train/dvgt2/pretrain.yaml", ["model.size=tiny"])) is None
    assert anchors_from_model(nn.Linear(2, 2)) is None


def test_planning_metrics_at_each_horizon():
    gt = torch.cumsum(torch.ones(T, S, 2), dim=1)
    pred = gt + torch.tensor([3.0, 4.0]) * torch.arange(1, S + 1)[None, :, None] / S  # error grows to 5 m
    valid = torch.ones(T, S, dtype=torch.bool)
    valid[2, 3:] = False
    pred[2, 3:] += 100  # invalid steps are ignored
    metrics = planning_metrics(pred, gt, valid)
    assert metrics["plan_l2_1s"] == pytest.approx(5 * 2 / S)  # 1 s is waypoint 2 of 8
    assert metrics["plan_l2_2s"] == pytest.approx(5 * 4 / S) and metrics["plan_l2_3s"] == pytest.approx(5 * 6 / S)
    assert metrics["plan_fde"] == pytest.approx(5.0)
    errors = [5 * (s + 1) / S for s in range(S)]
    assert metrics["plan_ade"] == pytest.approx((2 * sum(errors) + sum(errors[:3])) / (2 * S + 3))
    assert math.isnan(planning_metrics(pred, gt, torch.zeros(T, S, dtype=torch.bool))["plan_fde"])


def test_dvgt2_evaluation_takes_the_best_scoring_modes():
    anchors = make_anchors()
    batch = make_batch(anchors)
    predictions = perfect_predictions(batch)
    metrics = evaluate_clip(predictions, batch, SCALE)
    assert metrics["point_error"] == pytest.approx(0, abs=1e-5) and metrics["depth_abs_rel"] == pytest.approx(0, abs=1e-6)
    assert metrics["pose_auc_30"] == pytest.approx(1.0) and metrics["ego_trans_error"] == pytest.approx(0, abs=1e-4)
    for key in ("plan_l2_1s", "plan_l2_2s", "plan_l2_3s", "plan_ade", "plan_fde"):
        assert metrics[key] == pytest.approx(0, abs=1e-5), key
    for scores in predictions["diff_traj_cls_list"][-1:] + predictions["diff_poses_cls_list"][-1:]:
        scores[..., 0] = 20.0  # the last layer now prefers a random mode
    worse = evaluate_dvgt2_clip(predictions, batch, SCALE, max_points=1000)
    assert worse["plan_ade"] > 1.0 and worse["ego_trans_error"] > 1.0 and worse["point_error"] < 1e-5
    pretrain = {"points": predictions["points"], "points_conf": predictions["points_conf"],
                "relative_ego_pose_enc_list": [best_mode(perfect_predictions(batch)["diff_poses_reg_list"],
                                                         perfect_predictions(batch)["diff_poses_cls_list"])]}
    stage1 = evaluate_clip(pretrain, batch, SCALE)
    assert stage1["pose_auc_30"] == pytest.approx(1.0) and "plan_ade" not in stage1

"""DVGT-2 losses on synthetic predictions: nearest-anchor targets, perfect predictions, masks,
gradients, the best mode and the model-anchor read-out."""

import pytest
import torch

import dvgt
from dvgt.config import LossConfig
from dvgt.data.geometry import absT_quaR_to_pose, pose_to_absT_quaR, pose_to_trajectory_rdf
from dvgt.families import get
from dvgt.families.dvgt2 import (
    PlanningAnchors,
    anchor_mode_loss,
    anchors_from_model,
    best_mode,
    dvgt2_loss,
    nearest_anchor,
    sigmoid_focal_loss,
)
from dvgt.families.dvgt2_pretrain import dvgt2_pretrain_loss

pytestmark = pytest.mark.torch_threads(2)
B, T, V, H, W, K, S = 2, 3, 2, 16, 20, 5, 8
SCALE = 0.1  # gt_scale_factor: the data multiplies the ground truth by it


def make_anchors() -> PlanningAnchors:
    """K straight-ish trajectory anchors fanning out, K past translations behind the ego (model units)."""
    steps = torch.arange(1, S + 1, dtype=torch.float32)
    lateral = torch.linspace(-2, 2, K)[:, None] * steps / S  # metres
    trajectory = torch.stack([lateral, steps[None].expand(K, S) * torch.linspace(1, 3, K)[:, None]], -1)
    translation = torch.stack([torch.linspace(-0.2, 0.2, K), torch.zeros(K), -torch.linspace(1, 6, K)], -1)
    return PlanningAnchors(trajectory * SCALE, translation * SCALE)


def trajectory_poses(trajectory):
    """(right, forward, heading) [..., 3] -> poses [..., 4, 4]: yaw about the down axis, the inverse of
    pose_to_trajectory_rdf."""
    c, s_ = torch.cos(trajectory[..., 2]), torch.sin(trajectory[..., 2])
    pose = torch.zeros(*trajectory.shape[:-1], 4, 4)
    pose[..., 0, 0], pose[..., 0, 2], pose[..., 1, 1], pose[..., 2, 0], pose[..., 2, 2] = c, s_, 1, -s_, c
    pose[..., 0, 3], pose[..., 2, 3], pose[..., 3, 3] = trajectory[..., 0], trajectory[..., 1], 1
    return pose


def make_batch(anchors: PlanningAnchors, targets=(1, 3), seed=0):
    """Ground truth (official keys, scaled as the data gives it) near chosen anchors: the future of every
    frame near anchor targets[0], the past translation near anchor targets[1]; points: a surface in each
    frame's ego frame."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-2, 2, H), torch.linspace(-3, 3, W), indexing="ij")
    depth = 10 + torch.rand(B, T, V, H, W, generator=g) * 0.5 + ys
    points = torch.stack([xs.expand_as(depth) * depth / 5, ys.expand_as(depth) * depth / 5, depth], dim=-1) * SCALE
    trajectory = torch.zeros(B, T, S, 3)
    trajectory[..., :2] = anchors.trajectory[targets[0]] + 0.005 * torch.randn(B, T, S, 2, generator=g)
    trajectory[..., 2] = 0.01 * torch.randn(B, T, S, generator=g)
    relative = torch.zeros(B, T, 7)
    relative[..., :3] = anchors.pose_translation[targets[1]] + 0.002 * torch.randn(B, T, 3, generator=g)
    relative[..., 6] = 1.0
    relative[:, 0] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0])
    return {
        "images": torch.zeros(B, T, V, 3, H, W),
        "points_in_ego_n": points,
        "point_masks": torch.rand(B, T, V, H, W, generator=g) < 0.9,
        "future_ego_n_to_ego_curr": trajectory_poses(trajectory),
        "ego_past_to_ego_curr": absT_quaR_to_pose(relative),
    }


def perfect_predictions(batch, targets=(1, 3), layers=2, seed=1):
    """Random modes with the target mode exact and scored highest, per decoder layer."""
    g = torch.Generator().manual_seed(seed)
    traj_gt = pose_to_trajectory_rdf(batch["future_ego_n_to_ego_curr"])
    pose_gt = pose_to_absT_quaR(batch["ego_past_to_ego_curr"])
    out = {"points": batch["points_in_ego_n"].clone(), "points_conf": torch.full(batch["point_masks"].shape, 2.0)}
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
    losses = dvgt2_loss(perfect_predictions(batch), batch, cfg, anchors)
    for key in ("loss_traj_reg", "loss_pose_reg", "loss_T", "loss_R", "loss_reg_point"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6), key
    assert 0 < losses["loss_traj_cls"].item() < 1e-4 and 0 < losses["loss_pose_cls"].item() < 1e-4
    wrong = perfect_predictions(batch, targets=(2, 0))  # the right values under the wrong anchors
    worse = dvgt2_loss(wrong, batch, cfg, anchors)
    assert worse["loss_traj_cls"] > 100 * losses["loss_traj_cls"] and worse["loss_traj_reg"] > 0.1
    assert worse["loss_pose_cls"] > 100 * losses["loss_pose_cls"] and worse["loss_pose_reg"] > 0.1
    assert set(losses) >= {"objective", "loss_conf_point", "loss_grad_point"}


def test_masks_frame_zero_and_missing_future_steps():
    """Frame 0's relative pose is not supervised; a clip with fewer future frames than the horizon (the
    nuScenes planning evaluation has 6 of 8) supervises the known steps only; no future: no planning loss."""
    anchors, cfg = make_anchors(), LossConfig()
    batch = make_batch(anchors)
    short = dict(batch, future_ego_n_to_ego_curr=batch["future_ego_n_to_ego_curr"][:, :, :6])
    predictions = perfect_predictions(batch)
    base = dvgt2_loss(predictions, short, cfg, anchors)
    changed = {k: [v.clone() for v in vs] if isinstance(vs, list) else vs.clone() for k, vs in predictions.items()}
    for reg in changed["diff_traj_reg_list"]:
        reg[:, :, :, 6:] += 3.0  # only the steps the short clip does not know
    for reg in changed["diff_poses_reg_list"]:
        reg[:, 0] += 3.0  # only frame 0, which has no previous frame
    again = dvgt2_loss(changed, short, cfg, anchors)
    assert again["loss_traj_reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert again["loss_pose_reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert base["objective"].item() == pytest.approx(again["objective"].item(), rel=1e-6)
    changed["diff_traj_reg_list"][0][:, 1, :, :6] += 1.0  # a known step of the first decoder layer counts
    assert dvgt2_loss(changed, short, cfg, anchors)["loss_traj_reg"] > 0.1
    none = dvgt2_loss(predictions, {k: v for k, v in batch.items() if k != "future_ego_n_to_ego_curr"}, cfg, anchors)
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
    base = dvgt2_loss(predictions, batch, cfg, anchors)
    cfg.planning.reg_weight *= 2
    doubled = dvgt2_loss(predictions, batch, cfg, anchors)
    extra = cfg.planning.weight * cfg.planning.reg_weight / 2 * base["loss_traj_reg"]
    assert doubled["objective"].item() == pytest.approx((base["objective"] + extra).item(), rel=1e-5)


def test_focal_loss_matches_its_definition():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = torch.stack(
        [
            -0.25 * (1 - p[0]) ** 2 * torch.log(p[0]),
            -0.75 * p[1] ** 2 * torch.log(1 - p[1]),
            -0.75 * p[2] ** 2 * torch.log(1 - p[2]),
        ]
    )
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
    dvgt2_loss(predictions, batch, LossConfig(), anchors)["objective"].backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_stage1_relative_pose_loss_and_missing_anchors():
    anchors = make_anchors()
    batch = make_batch(anchors)
    pose = pose_to_absT_quaR(batch["ego_past_to_ego_curr"])
    predictions = {
        "points": batch["points_in_ego_n"],
        "points_conf": torch.full(batch["point_masks"].shape, 2.0),
        "relative_ego_pose_enc": pose,
        "relative_ego_pose_enc_list": [pose.clone()],
    }
    losses = dvgt2_pretrain_loss(predictions, batch, LossConfig())
    assert losses["loss_T"].item() == pytest.approx(0, abs=1e-7) and losses["loss_R"].item() == pytest.approx(
        0, abs=1e-7
    )
    predictions["relative_ego_pose_enc_list"][0][:, 0] += 1.0  # frame 0 is not supervised
    assert dvgt2_pretrain_loss(predictions, batch, LossConfig())["loss_T"].item() == pytest.approx(0, abs=1e-7)
    predictions["relative_ego_pose_enc_list"][0][:, 1, 2] += 0.3
    assert dvgt2_pretrain_loss(predictions, batch, LossConfig())["loss_T"].item() > 0.01
    model = dvgt.build_model("train/dvgt2/demo.yaml", ["model.size=tiny", "model.anchor_dir=null"])
    with pytest.raises(ValueError, match="anchors are all identical: set model.anchor_dir"):
        get("dvgt2").loss(model, LossConfig())  # stage 2 needs distinct anchors


def test_anchors_are_read_from_the_model_buffers():
    g = torch.Generator().manual_seed(0)
    anchors = PlanningAnchors(
        torch.randn(20, S, 2, generator=g), 0.1 * torch.randn(20, 3, generator=g)
    )  # 20: the model's
    model = dvgt.build_model("train/dvgt2/demo.yaml", ["model.size=tiny", "model.anchor_dir=null"])
    model.get_submodule("ego_pose_head.traj_pose_decoder").set_anchors(
        anchors.trajectory / SCALE, anchors.pose_translation / SCALE
    )
    read = anchors_from_model(model)
    torch.testing.assert_close(read.trajectory, anchors.trajectory, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(read.pose_translation, anchors.pose_translation, atol=1e-6, rtol=1e-5)


def test_best_mode_takes_the_top_scoring_mode_of_the_last_layer():
    anchors = make_anchors()
    predictions = perfect_predictions(make_batch(anchors))
    chosen = best_mode(predictions["diff_traj_reg_list"], predictions["diff_traj_cls_list"])
    assert torch.equal(chosen, predictions["diff_traj_reg_list"][-1][:, :, 1])
    predictions["diff_traj_cls_list"][-1][..., 0] = 20.0
    assert torch.equal(
        best_mode(predictions["diff_traj_reg_list"], predictions["diff_traj_cls_list"]),
        predictions["diff_traj_reg_list"][-1][:, :, 0],
    )

"""DVGT-2 losses: local points, relative ego poses, planning and past poses.

Both DVGT-2 stages predict points in each frame's own ego frame (``points_in_ego_n`` targets, the same
confidence-aware point loss as DVGT-1) and the relative pose ego_{t-1} -> ego_t (``ego_past_to_ego_curr``
targets, frame 0 unsupervised):

* stage 1 (``dvgt2_pretrain``) regresses it directly: ``relative_ego_pose_enc_list``, the DVGT-1
  ego-pose loss (``loss.ego_pose``);
* stage 2 (``dvgt2``) has a truncated-diffusion decoder with K anchors per output, in the style of
  DiffusionDrive: each of its layers gives K modes and a score per mode. The target mode is the one
  whose anchor lies nearest to the ground truth; the scores learn it with a sigmoid focal loss and the
  target mode's regression an L1 loss. Summed over decoder layers, for the planned trajectory
  (``diff_traj_*``, anchors of 8 future [right, forward] positions, ``loss.planning``; targets from
  ``future_ego_n_to_ego_curr``, the poses of the frames after each input frame) and for the relative
  pose (``diff_poses_*``, anchors of the past translation, ``loss.past_pose``).

Ground truth arrives scaled by gt_scale_factor (the data does it; headings and quaternions are not
scaled). Everything is computed in float32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvgt.data.geometry import pose_to_absT_quaR, pose_to_trajectory_rdf
from dvgt.train.losses import ego_pose_loss, point_loss

DECODER = "ego_pose_head.traj_pose_decoder"  # the DVGT-2 module that holds the anchors


@dataclass
class PlanningAnchors:
    """The decoder's anchors in model units (metres x gt_scale_factor), as the losses compare them."""

    trajectory: Tensor  # [K, 8, 2] future [right, forward] positions
    pose_translation: Tensor  # [K, 3] translation of ego_{t-1} -> ego_t


def anchors_from_model(model: nn.Module) -> PlanningAnchors | None:
    """The anchors a DVGT-2 model holds, in model units (None for models without a planning decoder).

    The decoder stores them normalised to [-1, 1] over fixed ranges; its ``denormalize`` undoes that.
    """
    try:
        decoder = model.get_submodule(DECODER)
    except AttributeError:
        return None
    return PlanningAnchors(
        decoder.denormalize(decoder.norm_traj_anchor[0], decoder.traj_min, decoder.traj_max),
        decoder.denormalize(
            decoder.norm_pose_translation_anchor[0], decoder.pose_translation_min, decoder.pose_translation_max
        ),
    )


def require_distinct_anchors(anchors: PlanningAnchors) -> None:
    """Planning needs distinct anchors: with identical ones (a model built without model.anchor_dir
    whose weights brought none) every target would be mode 0."""
    if torch.allclose(anchors.trajectory, anchors.trajectory[:1]):
        raise ValueError(
            "DVGT-2's 20 trajectory anchors are all identical: set model.anchor_dir to the anchors of "
            "the training data (the release's data_annotation/anchors/train_total_20, or `dvgt anchors --config <stage>`), or load weights "
            "that carry anchors"
        )


def dvgt2_loss(
    predictions: dict[str, object], batch: dict[str, Tensor], loss_cfg, anchors: PlanningAnchors | None = None
) -> dict[str, Tensor]:
    """All losses of one DVGT-2 (stage 1 or 2) batch; ``objective`` is the one to backpropagate.

    anchors: the model's, in model units (``anchors_from_model``); needed for stage 2 only. Stage 1: objective = point.weight * points + ego_pose.weight * loss_ego_pose.
    Stage 2: objective = point.weight * points + planning.weight * (cls_weight * loss_traj_cls +
    reg_weight * loss_traj_reg) + past_pose.weight * (cls_weight * loss_pose_cls + reg_weight * loss_pose_reg).
    """
    pred_points = predictions["points"]
    with torch.autocast(device_type=pred_points.device.type, enabled=False):
        point_cfg = loss_cfg.point
        losses = point_loss(
            pred_points.float(),
            predictions["points_conf"].float(),
            batch["points_in_ego_n"].float(),
            batch["point_masks"].bool(),
            gamma=point_cfg.gamma,
            alpha=point_cfg.alpha,
            gradient_loss_fn=point_cfg.gradient_loss_fn,
            valid_range=point_cfg.valid_range,
        )
        objective = point_cfg.weight * (
            losses["loss_conf_point"] + losses["loss_reg_point"] + losses["loss_grad_point"]
        )
        gt_pose = pose_to_absT_quaR(batch["ego_past_to_ego_curr"].float())  # [B,T,7]

        if "relative_ego_pose_enc_list" in predictions:  # stage 1
            pose_cfg = loss_cfg.ego_pose
            losses.update(
                ego_pose_loss(
                    [pose.float() for pose in predictions["relative_ego_pose_enc_list"]],
                    gt_pose,
                    gamma=pose_cfg.gamma,
                    loss_type=pose_cfg.loss_type,
                    weight_trans=pose_cfg.weight_trans,
                    weight_rot=pose_cfg.weight_rot,
                )
            )
            losses["objective"] = objective + pose_cfg.weight * losses["loss_ego_pose"]
            return losses

        if anchors is None:
            raise ValueError("the DVGT-2 planning and pose losses need the model's anchors (anchors_from_model)")
        trajectory, valid = planning_targets(batch, anchors.trajectory.shape[1])
        traj_cls, traj_reg = anchor_mode_loss(
            predictions["diff_traj_reg_list"],
            predictions["diff_traj_cls_list"],
            trajectory,
            valid,
            anchors.trajectory.float(),
            loss_cfg.planning,
        )
        frames = gt_pose.shape[1]
        pose_valid = (torch.arange(frames, device=gt_pose.device) > 0).expand(gt_pose.shape[0], frames)  # frame 0: none
        pose_cls, pose_reg = anchor_mode_loss(
            [reg[..., None, :] for reg in predictions["diff_poses_reg_list"]],
            predictions["diff_poses_cls_list"],
            gt_pose[..., None, :],
            pose_valid[..., None],
            anchors.pose_translation.float()[:, None],
            loss_cfg.past_pose,
        )
        losses.update(
            loss_traj_cls=traj_cls,
            loss_traj_reg=traj_reg.mean(),
            loss_pose_cls=pose_cls,
            loss_pose_reg=pose_reg.mean(),
            loss_T=pose_reg[:3].mean(),
            loss_R=pose_reg[3:].mean(),
        )
        plan, past = loss_cfg.planning, loss_cfg.past_pose
        losses["objective"] = (
            objective
            + plan.weight * (plan.cls_weight * traj_cls + plan.reg_weight * losses["loss_traj_reg"])
            + past.weight * (past.cls_weight * pose_cls + past.reg_weight * losses["loss_pose_reg"])
        )
    return losses


def planning_targets(batch: dict[str, Tensor], steps: int) -> tuple[Tensor, Tensor]:
    """(right, forward, heading) [B,T,steps,3] of the next ``steps`` frames of every input frame and their
    validity [B,T,steps]: a clip with fewer future frames (nuScenes planning evaluation has 6) leaves the
    later steps invalid; without any future frame nothing is valid."""
    future = batch.get("future_ego_n_to_ego_curr")
    images = batch["images"]
    trajectory = images.new_zeros(*images.shape[:2], steps, 3)
    valid = torch.zeros(*images.shape[:2], steps, dtype=torch.bool, device=images.device)
    if future is not None:
        known = min(future.shape[2], steps)
        trajectory[:, :, :known] = pose_to_trajectory_rdf(future[:, :, :known].float())
        valid[:, :, :known] = True
    return trajectory, valid


def nearest_anchor(gt: Tensor, valid: Tensor, anchors: Tensor) -> Tensor:
    """Index of the anchor nearest to each ground truth: mean Euclidean distance over valid steps.

    gt: [N, S, A] (the anchored components), valid: bool [N, S], anchors: [K, S, A]. Returns [N].
    A row without valid steps gets index 0 (callers mask it out).
    """
    distance = torch.linalg.vector_norm(gt[:, None] - anchors[None], dim=-1)  # [N, K, S]
    weights = valid[:, None].float()
    return ((distance * weights).sum(-1) / weights.sum(-1).clamp(min=1)).argmin(-1)


def anchor_mode_loss(
    reg_list: Sequence[Tensor], cls_list: Sequence[Tensor], gt: Tensor, valid: Tensor, anchors: Tensor, cfg
) -> tuple[Tensor, Tensor]:
    """Focal classification of the nearest anchor + L1 regression of that mode, summed over decoder layers.

    reg_list: per layer [B, T, K, S, D]; cls_list: per layer [B, T, K] (logits); gt: [B, T, S, D];
    valid: bool [B, T, S]; anchors: [K, S, A] anchoring the first A of the D components.
    cfg: focal_alpha, focal_gamma. Returns (classification loss, L1 per component [D]); frames
    without any valid step are left out, and so are invalid steps.
    """
    gt, valid = gt.flatten(0, 1), valid.flatten(0, 1)  # [N, S, D], [N, S]
    frames = valid.any(-1)  # [N]
    if not frames.any():
        zero = 0.0 * sum(reg.float().sum() + cls.float().sum() for reg, cls in zip(reg_list, cls_list))
        return zero, zero.expand(gt.shape[-1])
    gt, valid = gt[frames], valid[frames]
    target = nearest_anchor(gt[..., : anchors.shape[-1]], valid, anchors)  # [M]
    one_hot = F.one_hot(target, anchors.shape[0]).float()  # [M, K]
    steps = valid[..., None].float()  # [M, S, 1]
    cls_total = reg_total = 0.0
    for reg, cls in zip(reg_list, cls_list):
        reg, cls = reg.float().flatten(0, 1)[frames], cls.float().flatten(0, 1)[frames]  # [M, K, S, D], [M, K]
        mode = reg[torch.arange(len(target), device=reg.device), target]  # [M, S, D]
        cls_total = cls_total + sigmoid_focal_loss(cls, one_hot, cfg.focal_alpha, cfg.focal_gamma).mean()
        reg_total = reg_total + ((mode - gt).abs() * steps).sum((0, 1)) / steps.sum()
    return cls_total, reg_total


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of independent sigmoid scores against 0/1 targets."""
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = probability * targets + (1 - probability) * (1 - targets)
    alpha_weight = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_weight * (1 - p_true) ** gamma * cross_entropy

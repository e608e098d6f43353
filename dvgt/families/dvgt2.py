"""DVGT-2 (``dvgt2``, stage 2): stage 1's points and a truncated-diffusion planning decoder.

The decoder has K anchors per output, in the style of DiffusionDrive: each of its layers gives K modes and a
score per mode. The target mode is the one whose anchor lies nearest to the ground truth; the scores learn it
with a sigmoid focal loss and the target mode's regression an L1 loss. Summed over decoder layers, for the
planned trajectory (``diff_traj_*``, anchors of PLANNING_STEPS future [right, forward] positions,
``loss.planning``; targets from ``future_ego_n_to_ego_curr``, the poses of the frames after each input frame)
and for the relative pose ego_{t-1} -> ego_t (``diff_poses_*``, anchors of the past translation,
``loss.past_pose``; frame 0 unsupervised). The points get stage 1's loss.

Evaluation: stage 1's, with the best-scoring pose mode of the last decoder layer as the relative pose; with
``eval.trajectory``, the top-scoring trajectory of the last frame (converted to x forward, y left, yaw) is
scored against the poses of the frames after it, zero-padded to PLANNING_STEPS (the nuScenes protocol has 6).

Ground truth arrives scaled by gt_scale_factor (the data does it; headings and quaternions are not scaled).
Losses are computed in float32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvgt.data.geometry import pose_to_absT_quaR, pose_to_trajectory_rdf, trajectory_rdf_to_flu
from dvgt.families.base import Batch, LossFn, ModelFamily, Predictions, register
from dvgt.families.dvgt1 import AGGREGATOR_CACHE_PARTS
from dvgt.families.dvgt2_pretrain import TRAINING_TARGETS, build_dvgt2, chained_points_and_poses, local_point_losses
from dvgt.models.conversions import DVGT2_STAGE1, VGGT, dvgt2_stage1_to_stage2, vggt_to_dvgt2
from dvgt.models.dvgt2 import DVGT2, EGO_STATUS_FIELDS, PLANNING_STEPS
from dvgt.models.trajectory_decoder import TrajectoryPoseDecoder
from dvgt.train.evaluation import trajectory_in_metres
from dvgt.train.flops import StepFlops

DECODER = "ego_pose_head.traj_pose_decoder"  # the module that holds the anchors


class DVGT2Predictions(TypedDict, total=False):
    points: Tensor  # [B, T, V, H, W, 3] in each frame's own ego frame
    points_conf: Tensor  # [B, T, V, H, W]
    diff_traj_reg_list: list[Tensor]  # per decoder layer [B, T, K, PLANNING_STEPS, 3] (right, forward, heading)
    diff_traj_cls_list: list[Tensor]  # per decoder layer [B, T, K] mode logits
    diff_poses_reg_list: list[Tensor]  # per decoder layer [B, T, K, 7] ego_{t-1} -> ego_t (absT_quaR)
    diff_poses_cls_list: list[Tensor]  # per decoder layer [B, T, K]
    images: Tensor  # eval mode: the input images


def build(model_cfg: Any) -> nn.Module:
    """Stage 2, with the planning anchors of model.anchor_dir if set (else zeros until weights bring them)."""
    model = build_dvgt2(model_cfg, planning=True)
    if model_cfg.anchor_dir:
        from dvgt.data.anchors import read_anchor_dir

        trajectory, pose_translation = read_anchor_dir(model_cfg.anchor_dir)
        cast(TrajectoryPoseDecoder, model.get_submodule(DECODER)).set_anchors(
            torch.from_numpy(trajectory), torch.from_numpy(pose_translation)
        )
    return model


def model_inputs(model_cfg: Any, batch: Batch) -> dict[str, Any]:
    """The ego status [B, T, len(EGO_STATUS_FIELDS)] when the model conditions on it."""
    return {"ego_status": batch["ego_status"]} if model_cfg.enable_ego_status else {}


@dataclass
class PlanningAnchors:
    """The decoder's anchors in model units (metres x gt_scale_factor), as the losses compare them."""

    trajectory: Tensor  # [K, PLANNING_STEPS, 2] future [right, forward] positions
    pose_translation: Tensor  # [K, 3] translation of ego_{t-1} -> ego_t


def anchors_from_model(model: nn.Module) -> PlanningAnchors:
    """The anchors a DVGT-2 model holds, in model units.

    The decoder stores them normalised to [-1, 1] over fixed ranges; its ``denormalize`` undoes that.
    """
    decoder = cast(TrajectoryPoseDecoder, model.get_submodule(DECODER))
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


def loss(model: nn.Module, loss_cfg: Any) -> LossFn:
    """The loss of a model whose weights are final: it reads (and checks) the anchors once."""
    anchors = anchors_from_model(model)
    require_distinct_anchors(anchors)
    return lambda predictions, batch: dvgt2_loss(predictions, batch, loss_cfg, anchors)


def dvgt2_loss(predictions: Predictions, batch: Batch, loss_cfg: Any, anchors: PlanningAnchors) -> dict[str, Tensor]:
    """objective = point.weight * points + planning.weight * (cls_weight * loss_traj_cls + reg_weight *
    loss_traj_reg) + past_pose.weight * (cls_weight * loss_pose_cls + reg_weight * loss_pose_reg)."""
    with torch.autocast(device_type=predictions["points"].device.type, enabled=False):
        losses = local_point_losses(predictions, batch, loss_cfg)
        gt_pose = pose_to_absT_quaR(batch["ego_past_to_ego_curr"].float())  # [B,T,7]
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
            losses["objective"]
            + plan.weight * (plan.cls_weight * traj_cls + plan.reg_weight * losses["loss_traj_reg"])
            + past.weight * (past.cls_weight * pose_cls + past.reg_weight * losses["loss_pose_reg"])
        )
    return losses


def planning_targets(batch: Batch, steps: int) -> tuple[Tensor, Tensor]:
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
    mean_distance: Tensor = (distance * weights).sum(-1) / weights.sum(-1).clamp(min=1)  # [N, K]
    return mean_distance.argmin(-1)


def anchor_mode_loss(
    reg_list: Sequence[Tensor], cls_list: Sequence[Tensor], gt: Tensor, valid: Tensor, anchors: Tensor, cfg: Any
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
        zero = 0.0 * torch.stack([reg.float().sum() + cls.float().sum() for reg, cls in zip(reg_list, cls_list)]).sum()
        return zero, zero.expand(gt.shape[-1])
    gt, valid = gt[frames], valid[frames]
    target = nearest_anchor(gt[..., : anchors.shape[-1]], valid, anchors)  # [M]
    one_hot = F.one_hot(target, anchors.shape[0]).float()  # [M, K]
    steps = valid[..., None].float()  # [M, S, 1]
    cls_total, reg_total = gt.new_zeros(()), gt.new_zeros(gt.shape[-1])
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


def best_mode(reg_list: Sequence[Tensor], cls_list: Sequence[Tensor]) -> Tensor:
    """The best-scoring mode of the last decoder layer: [B, T, K, ...] -> [B, T, ...]."""
    reg, scores = reg_list[-1], cls_list[-1]
    index = scores.argmax(-1)  # [B, T]
    return torch.take_along_dim(reg, index.view(*index.shape, *([1] * (reg.dim() - 2))), dim=2).squeeze(2)


def post_process(
    predictions: Predictions, batch: Batch, gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    s = gt_scale_factor
    pred: dict[str, Tensor] = {}
    gt: dict[str, Tensor] = {}
    if eval_cfg.points_and_poses:
        relative = best_mode(predictions["diff_poses_reg_list"], predictions["diff_poses_cls_list"])
        pred, gt = chained_points_and_poses(relative, predictions, batch, s)
    if eval_cfg.trajectory and "future_ego_n_to_ego_curr" in batch:
        top = best_mode(predictions["diff_traj_reg_list"], predictions["diff_traj_cls_list"])[:, -1].double()
        pred["trajectories"] = trajectory_in_metres(trajectory_rdf_to_flu(top), s)  # [B, PLANNING_STEPS, 3]
        future = batch["future_ego_n_to_ego_curr"][:, -1].double()  # the last input frame's future
        flu = trajectory_rdf_to_flu(pose_to_trajectory_rdf(future))
        padded = flu.new_zeros(flu.shape[0], max(PLANNING_STEPS, flu.shape[1]), 3)
        padded[:, : flu.shape[1]] = flu
        gt["trajectories"] = trajectory_in_metres(padded, s)
    return pred, gt


FAMILY = register(
    ModelFamily(
        name="dvgt2",
        title="DVGT-2",
        build=build,
        predictions=DVGT2Predictions,
        loss=loss,
        post_process=post_process,
        training_targets=TRAINING_TARGETS,
        model_inputs=model_inputs,
        conversions={VGGT: vggt_to_dvgt2, DVGT2_STAGE1: dvgt2_stage1_to_stage2},
        cacheable_parts=AGGREGATOR_CACHE_PARTS,
        flops=StepFlops,
        device_map_parts=DVGT2.device_map_parts,
        streaming_inference=True,
        planning_steps=PLANNING_STEPS,
        ego_status_fields=EGO_STATUS_FIELDS,
    )
)

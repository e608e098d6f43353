"""DVGT-1: a clip of multi-view images -> points in the first frame's ego frame and each frame's ego pose.

Loss: the confidence-aware point loss on ``points_in_ego_first`` and the ego-pose loss on
``ego_n_to_ego_first`` (dvgt/train/losses.py). Evaluation: points and poses as they are; ray depth of each
point in its own frame's ego, through the GT poses.
"""

from __future__ import annotations

from functools import partial
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from dvgt.data.geometry import absT_quaR_to_pose
from dvgt.families.base import Batch, LossFn, ModelFamily, Predictions, register
from dvgt.models.conversions import VGGT, vggt_to_dvgt1
from dvgt.models.dvgt1 import DVGT1, SIZES
from dvgt.models.weights import load_dinov3_backbone
from dvgt.train.evaluation import in_metres, ray_depth_in_own_frame
from dvgt.train.flops import StepFlops
from dvgt.train.losses import ego_pose_losses, point_losses

# Feature-cache parts of the DVGT and VGGT architectures: the DINO backbone (per image) or the whole aggregator.
AGGREGATOR_CACHE_PARTS = {"backbone": "aggregator.patch_embed", "aggregator": "aggregator"}


class DVGT1Predictions(TypedDict, total=False):
    points: Tensor  # [B, T, V, H, W, 3] in the first frame's ego frame, units of gt_scale_factor
    points_conf: Tensor  # [B, T, V, H, W]
    absolute_ego_pose_enc: Tensor  # [B, T, 7] ego_t -> ego_0 (absT_quaR), the last iteration
    absolute_ego_pose_enc_list: list[Tensor]  # every pose-head iteration
    images: Tensor  # eval mode: the input images


def build(model_cfg: Any) -> nn.Module:
    model = DVGT1(
        SIZES[model_cfg.size],
        max_frames=model_cfg.max_frames,
        activation_checkpointing=model_cfg.activation_checkpointing,
        frames_chunk_size=model_cfg.frames_chunk_size,
    )
    load_dinov3_backbone(model, model_cfg)
    return model


def loss(model: nn.Module, loss_cfg: Any) -> LossFn:
    return partial(dvgt1_loss, loss_cfg=loss_cfg)


def dvgt1_loss(predictions: Predictions, batch: Batch, loss_cfg: Any) -> dict[str, Tensor]:
    """objective = point.weight * (conf + reg + grad point losses) + ego_pose.weight * loss_ego_pose."""
    with torch.autocast(device_type=predictions["points"].device.type, enabled=False):
        losses = point_losses(predictions, batch["points_in_ego_first"], batch, loss_cfg.point)
        losses.update(ego_pose_losses(pose_iterations(predictions), batch["ego_n_to_ego_first"], loss_cfg.ego_pose))
        losses["objective"] = losses["objective"] + loss_cfg.ego_pose.weight * losses["loss_ego_pose"]
    return losses


def pose_iterations(predictions: Predictions) -> list[Tensor]:
    """The pose head's iterations (a lone ``absolute_ego_pose_enc`` counts as one)."""
    return predictions.get("absolute_ego_pose_enc_list") or [predictions["absolute_ego_pose_enc"]]


def post_process(
    predictions: Predictions, batch: Batch, gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Points and poses in the first frame's ego, ray depth in each frame's own ego; metres."""
    if not eval_cfg.points_and_poses:
        return {}, {}
    pred_poses = absT_quaR_to_pose(predictions["absolute_ego_pose_enc"].double())
    return pose_and_points_in_ego_first(predictions["points"].double(), pred_poses, batch, gt_scale_factor)


def pose_and_points_in_ego_first(
    pred_points: Tensor, pred_poses: Tensor, batch: Batch, s: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(pred, gt) of points [B,T,V,H,W,3] and poses ego_t -> ego_0 [B,T,4,4] given in the first frame's ego."""
    gt_poses = batch["ego_n_to_ego_first"].double()
    pred = {
        "points_in_ego_first": pred_points / s,
        "ray_depth": ray_depth_in_own_frame(pred_points, gt_poses) / s,
        "ego_n_to_ego_first": in_metres(pred_poses, s),
    }
    gt = {
        "points_in_ego_first": batch["points_in_ego_first"].double() / s,
        "ray_depth": batch["ray_depth"].double() / s,
        "ego_n_to_ego_first": in_metres(gt_poses, s),
    }
    return pred, gt


FAMILY = register(
    ModelFamily(
        name="dvgt1",
        title="DVGT-1",
        build=build,
        predictions=DVGT1Predictions,
        loss=loss,
        post_process=post_process,
        training_targets=frozenset({"points_in_ego_first"}),
        conversions={VGGT: vggt_to_dvgt1},
        cacheable_parts=AGGREGATOR_CACHE_PARTS,
        flops=StepFlops,
        device_map_parts=DVGT1.device_map_parts,
    )
)

"""DVGT-2 stage 1 (``dvgt2_pretrain``): points in each frame's own ego frame and the relative pose
ego_{t-1} -> ego_t, regressed directly.

Loss: the point loss on ``points_in_ego_n`` and the DVGT-1 ego-pose loss (``loss.ego_pose``) on
``ego_past_to_ego_curr`` (frame 0 unsupervised). Evaluation: the predicted relative poses (the last
iteration) are chained to the first frame and the local points carried along them; the GT is chained the
same way; ray depth is the norm of the local points. Stage 2 (dvgt/families/dvgt2.py) builds on this.
"""

from __future__ import annotations

from functools import partial
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from dvgt.data.geometry import absT_quaR_to_pose, chain_relative_poses, transform_points
from dvgt.families.base import Batch, LossFn, ModelFamily, Predictions, register
from dvgt.families.dvgt1 import AGGREGATOR_CACHE_PARTS
from dvgt.models.conversions import VGGT, vggt_to_dvgt2
from dvgt.models.dvgt1 import SIZES
from dvgt.models.dvgt2 import DECODER_SIZES, DVGT2
from dvgt.models.weights import load_dinov3_backbone
from dvgt.train.evaluation import in_metres
from dvgt.train.flops import StepFlops
from dvgt.train.losses import ego_pose_losses, point_losses

TRAINING_TARGETS = frozenset({"points_in_ego_n", "ego_past_to_ego_curr"})


class DVGT2PretrainPredictions(TypedDict, total=False):
    points: Tensor  # [B, T, V, H, W, 3] in each frame's own ego frame
    points_conf: Tensor  # [B, T, V, H, W]
    relative_ego_pose_enc: Tensor  # [B, T, 7] ego_{t-1} -> ego_t (absT_quaR)
    relative_ego_pose_enc_list: list[Tensor]  # every pose-head iteration (one)
    images: Tensor  # eval mode: the input images


def build_dvgt2(model_cfg: Any, planning: bool) -> DVGT2:
    """Either DVGT-2 stage, with the DINOv3 backbone of model.dino_v3_weight_path if set."""
    decoder_dim, decoder_heads = DECODER_SIZES[model_cfg.size]
    model = DVGT2(
        SIZES[model_cfg.size],
        planning=planning,
        max_frames=model_cfg.max_frames,
        decoder_dim=decoder_dim,
        decoder_heads=decoder_heads,
        enable_ego_status=model_cfg.enable_ego_status,
        activation_checkpointing=model_cfg.activation_checkpointing,
        frames_chunk_size=model_cfg.frames_chunk_size,
    )
    load_dinov3_backbone(model, model_cfg)
    return model


def build(model_cfg: Any) -> nn.Module:
    return build_dvgt2(model_cfg, planning=False)


def local_point_losses(predictions: Predictions, batch: Batch, loss_cfg: Any) -> dict[str, Tensor]:
    """Both stages' point loss, on points in each frame's own ego (call with autocast off)."""
    return point_losses(predictions, batch["points_in_ego_n"], batch, loss_cfg.point)


def loss(model: nn.Module, loss_cfg: Any) -> LossFn:
    return partial(dvgt2_pretrain_loss, loss_cfg=loss_cfg)


def dvgt2_pretrain_loss(predictions: Predictions, batch: Batch, loss_cfg: Any) -> dict[str, Tensor]:
    """objective = point.weight * (conf + reg + grad point losses) + ego_pose.weight * loss_ego_pose."""
    with torch.autocast(device_type=predictions["points"].device.type, enabled=False):
        losses = local_point_losses(predictions, batch, loss_cfg)
        losses.update(
            ego_pose_losses(predictions["relative_ego_pose_enc_list"], batch["ego_past_to_ego_curr"], loss_cfg.ego_pose)
        )
        losses["objective"] = losses["objective"] + loss_cfg.ego_pose.weight * losses["loss_ego_pose"]
    return losses


def chained_points_and_poses(
    relative: Tensor, predictions: Predictions, batch: Batch, s: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(pred, gt) in metres from predicted relative poses ego_{t-1} -> ego_t [B,T,7] (absT_quaR): poses chained
    to the first frame, local points carried along them, ray depth the norm of the local points."""
    points = predictions["points"].double()
    pred_poses = chain_relative_poses(absT_quaR_to_pose(relative.double()))  # ego_t -> ego_0
    gt_poses = chain_relative_poses(batch["ego_past_to_ego_curr"].double())
    pred = {
        "ego_n_to_ego_first": in_metres(pred_poses, s),
        "points_in_ego_first": transform_points(pred_poses[:, :, None], points) / s,
        "ray_depth": points.norm(dim=-1) / s,
    }
    gt = {
        "ego_n_to_ego_first": in_metres(gt_poses, s),
        "points_in_ego_first": transform_points(gt_poses[:, :, None], batch["points_in_ego_n"].double()) / s,
        "ray_depth": batch["ray_depth"].double() / s,
    }
    return pred, gt


def post_process(
    predictions: Predictions, batch: Batch, gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not eval_cfg.points_and_poses:
        return {}, {}
    relative = predictions["relative_ego_pose_enc_list"][-1]
    return chained_points_and_poses(relative, predictions, batch, gt_scale_factor)


FAMILY = register(
    ModelFamily(
        name="dvgt2_pretrain",
        title="DVGT-2 stage 1",
        build=build,
        predictions=DVGT2PretrainPredictions,
        loss=loss,
        post_process=post_process,
        training_targets=TRAINING_TARGETS,
        conversions={VGGT: vggt_to_dvgt2},
        cacheable_parts=AGGREGATOR_CACHE_PARTS,
        flops=StepFlops,
        device_map_parts=DVGT2.device_map_parts,
        streaming_inference=True,
    )
)

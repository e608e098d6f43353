"""VGGT: images -> points in the first camera's frame and every camera's pose and field of view.

Loss: the point loss on ``points_in_cam_first`` and VGGT's camera loss on the first camera -> each camera
(``cam_first_to_cam_n`` with the images' fields of view), clips whose first image has too few valid pixels
unsupervised. Evaluation: the first camera's predicted pose of each frame and the points are moved into the
ego frames through the GT rig (optionally after a per-clip similarity alignment, ``eval.umeyama_per_scene``),
then scored as DVGT-1.
"""

from __future__ import annotations

from functools import partial
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from dvgt.data.geometry import absT_quaR_to_pose, camera_pose_encoding, inverse_pose, transform_points
from dvgt.families.base import Batch, LossFn, ModelFamily, Predictions, register
from dvgt.families.dvgt1 import AGGREGATOR_CACHE_PARTS, pose_and_points_in_ego_first
from dvgt.models.dvgt1 import SIZES
from dvgt.models.vggt import VGGT
from dvgt.train.evaluation import umeyama
from dvgt.train.flops import StepFlops
from dvgt.train.losses import MIN_VALID_PIXELS, camera_loss, point_losses


class VGGTPredictions(TypedDict, total=False):
    points: Tensor  # [B, T, V, H, W, 3] in the first camera's frame
    points_conf: Tensor  # [B, T, V, H, W]
    cam_pose_enc: Tensor  # [B, T, V, 9] first camera -> each camera (absT_quaR_FoV), the last iteration
    cam_pose_enc_list: list[Tensor]  # every camera-head iteration
    images: Tensor  # eval mode: the input images


def build(model_cfg: Any) -> nn.Module:
    return VGGT(
        SIZES[model_cfg.size],
        activation_checkpointing=model_cfg.activation_checkpointing,
        frames_chunk_size=model_cfg.frames_chunk_size,
    )


def check_config(model_cfg: Any) -> None:
    if model_cfg.dino_v3_weight_path:
        raise ValueError(
            "model.dino_v3_weight_path is for DVGT models; VGGT's DINOv2 backbone comes with the VGGT "
            "weights (checkpoint.direct_load_pretrained_weights_path=.../model.safetensors)"
        )


def camera_targets(batch: Batch) -> Tensor:
    """VGGT's camera targets [B,T,V,9]: absT_quaR_FoV of the first camera -> each camera
    (``cam_first_to_cam_n``, translations scaled by gt_scale_factor) with the images' fields of view."""
    height, width = batch["images"].shape[-2:]
    return camera_pose_encoding(
        batch["cam_first_to_cam_n"].double(), batch["intrinsics"].double(), height, width
    ).float()


def loss(model: nn.Module, loss_cfg: Any) -> LossFn:
    return partial(vggt_loss, loss_cfg=loss_cfg)


def vggt_loss(predictions: Predictions, batch: Batch, loss_cfg: Any) -> dict[str, Tensor]:
    """objective = point.weight * (conf + reg + grad point losses) + camera.weight * loss_camera."""
    with torch.autocast(device_type=predictions["points"].device.type, enabled=False):
        losses = point_losses(predictions, batch["points_in_cam_first"], batch, loss_cfg.point)
        masks = batch["point_masks"].bool()
        valid_clips = masks[:, 0, 0].sum(dim=(-1, -2)) > MIN_VALID_PIXELS  # the first image anchors the frame
        camera_cfg = loss_cfg.camera
        losses.update(
            camera_loss(
                [pose.float() for pose in predictions["cam_pose_enc_list"]],
                camera_targets(batch),
                valid_clips,
                gamma=camera_cfg.gamma,
                loss_type=camera_cfg.loss_type,
                weight_trans=camera_cfg.weight_trans,
                weight_rot=camera_cfg.weight_rot,
                weight_focal=camera_cfg.weight_focal,
            )
        )
        losses["objective"] = losses["objective"] + camera_cfg.weight * losses["loss_camera"]
    return losses


def post_process(
    predictions: Predictions, batch: Batch, gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Cameras and points relative to the first camera, moved into the ego frames through the GT rig."""
    if not eval_cfg.points_and_poses:
        return {}, {}
    gt_poses = batch["ego_n_to_ego_first"].double()
    cam0_to_ego0 = inverse_pose(batch["ego_first_to_cam_n"][:, 0, 0].double())  # [B,4,4]
    pred_points_cam = predictions["points"].double()
    pred_cam0_to_cam = absT_quaR_to_pose(predictions["cam_pose_enc"][:, :, 0, :7].double())  # [B,T,4,4]
    if eval_cfg.umeyama_per_scene:
        pred_points_cam, pred_cam0_to_cam = umeyama_align(pred_points_cam, pred_cam0_to_cam, batch)
    # ego_t -> ego_0 = (ego_0 <- cam_t) (cam_t <- cam_0) (cam_0 <- ego_t), with the GT rig
    ego0_to_cam_t = batch["ego_first_to_cam_n"][:, :, 0].double()  # [B,T,4,4]
    ego_t_to_cam0 = batch["ego_first_to_cam_n"][:, :1, 0].double() @ gt_poses
    pred_poses = inverse_pose(ego0_to_cam_t) @ pred_cam0_to_cam @ ego_t_to_cam0
    pred_points = transform_points(cam0_to_ego0[:, None, None], pred_points_cam)
    return pose_and_points_in_ego_first(pred_points, pred_poses, batch, gt_scale_factor)


def umeyama_align(points: Tensor, cam0_to_cam: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per clip, similarity-align the predicted points to ``points_in_cam_first`` over valid pixels and the
    predicted camera centres to the GT ones (evaluation/utils/geometry.py:umeyama_alignment)."""
    points, cam0_to_cam = points.clone(), cam0_to_cam.clone()
    masks = batch["point_masks"].bool()
    for b in range(points.shape[0]):
        mask = masks[b]
        if mask.any():
            s, R, t = umeyama(points[b][mask], batch["points_in_cam_first"][b][mask].double())
            points[b][mask] = s * points[b][mask] @ R.T + t
        s, R, t = umeyama(cam0_to_cam[b, :, :3, 3], batch["cam_first_to_cam_n"][b, :, 0, :3, 3].double())
        cam0_to_cam[b, :, :3, 3] = s * cam0_to_cam[b, :, :3, 3] @ R.T + t
    return points, cam0_to_cam


FAMILY = register(
    ModelFamily(
        name="vggt",
        title="VGGT",
        build=build,
        predictions=VGGTPredictions,
        loss=loss,
        post_process=post_process,
        training_targets=frozenset({"points_in_ego_first", "cam"}),
        check_config=check_config,
        cacheable_parts=AGGREGATOR_CACHE_PARTS,
        flops=StepFlops,
        device_map_parts=VGGT.device_map_parts,
    )
)

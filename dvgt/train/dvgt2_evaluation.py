"""Held-out metrics for DVGT-2 (both stages); metres and degrees, like dvgt/train/evaluation.py.

Points are predicted in each frame's own ego frame and compared with ``points_local`` (the same point
and depth metrics as DVGT-1). Relative poses ego_{t-1} -> ego_t (stage 2: the best-scoring mode of the
last decoder layer) are chained to the first frame and scored with DVGT-1's pose metrics
(pose_auc_30, ego_trans_error). Stage 2 adds planning, from the best-scoring trajectory mode (top-1)
of the last decoder layer, over the frames whose ground-truth future is known at that horizon:

  plan_l2_1s, plan_l2_2s, plan_l2_3s   distance between the planned and the true position 1, 2, 3 s ahead.
  plan_ade                             mean distance over the valid waypoints (0.5 .. 4 s).
  plan_fde                             distance at the last waypoint (4 s).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
from torch import Tensor

from dvgt.data.ego_motion import FUTURE_DT
from dvgt.data.geometry import absT_quaR_to_pose, chain_relative_poses, pose_to_absT_quaR
from dvgt.train.evaluation import _nanmean, depth_in_gt_cameras, depth_metrics, point_metrics, pose_metrics

PLANNING_HORIZONS_S = (1, 2, 3)


def best_mode(reg_list, cls_list) -> Tensor:
    """The best-scoring mode of the last decoder layer: [B, T, K, ...] -> [B, T, ...]."""
    reg, scores = reg_list[-1], cls_list[-1]
    index = scores.argmax(-1)  # [B, T]
    return torch.take_along_dim(reg, index.view(*index.shape, *([1] * (reg.dim() - 2))), dim=2).squeeze(2)


@torch.no_grad()
def evaluate_dvgt2_clip(predictions: Mapping[str, Tensor], batch: Mapping[str, Tensor], gt_scale_factor: float,
                        max_points: int) -> Dict[str, float]:
    """Metrics of one batch of clips (module docstring), averaged over its clips (NaN-skipping)."""
    pred_points = predictions["points"].float() / gt_scale_factor  # [B,T,V,H,W,3] local, metres
    identity = torch.eye(4, device=pred_points.device).expand(*pred_points.shape[:2], 4, 4)
    pred_depths = depth_in_gt_cameras(pred_points, batch["cam_to_ego"], identity)
    if "relative_ego_pose_enc_list" in predictions:
        relative = predictions["relative_ego_pose_enc_list"][-1].float()  # [B,T,7]
    else:
        relative = best_mode(predictions["diff_poses_reg_list"], predictions["diff_poses_cls_list"]).float()
    relative = torch.cat([relative[..., :3] / gt_scale_factor, relative[..., 3:]], dim=-1)
    pred_pose = pose_to_absT_quaR(chain_relative_poses(absT_quaR_to_pose(relative.double()))).float()  # ego_t -> ego_0
    trajectory = None
    if "diff_traj_reg_list" in predictions:
        trajectory = best_mode(predictions["diff_traj_reg_list"], predictions["diff_traj_cls_list"]).float()
        trajectory = trajectory[..., :2] / gt_scale_factor  # [B,T,8,2] metres
    masks = batch["point_masks"].bool()
    per_clip = []
    for b in range(pred_points.shape[0]):
        metrics = point_metrics(pred_points[b][masks[b]], batch["points_local"][b].float()[masks[b]], max_points)
        metrics.update(depth_metrics(pred_depths[b], batch["depths"][b].float(), masks[b]))
        metrics.update(pose_metrics(pred_pose[b], batch["ego_pose"][b].float()))
        if trajectory is not None:
            metrics.update(planning_metrics(trajectory[b], batch["future_trajectory"][b, ..., :2].float(),
                                            batch["future_valid"][b].bool()))
        per_clip.append(metrics)
    return {key: _nanmean([m[key] for m in per_clip]) for key in per_clip[0]}


def planning_metrics(pred: Tensor, gt: Tensor, valid: Tensor, dt: float = FUTURE_DT) -> Dict[str, float]:
    """plan_l2_{1,2,3}s, plan_ade, plan_fde of one clip. pred, gt: [T, S, 2] metres; valid: bool [T, S]."""
    error = torch.linalg.vector_norm(pred - gt, dim=-1)  # [T, S]
    steps = valid.shape[-1]

    def mean_at(step: int) -> float:
        return error[:, step][valid[:, step]].mean().item() if 0 <= step < steps and valid[:, step].any() else math.nan

    metrics = {f"plan_l2_{h}s": mean_at(round(h / dt) - 1) for h in PLANNING_HORIZONS_S}
    metrics["plan_ade"] = error[valid].mean().item() if valid.any() else math.nan
    metrics["plan_fde"] = mean_at(steps - 1)
    return metrics

"""Held-out evaluation as the official code does it: each model's predictions brought into the frames
and units the official metrics expect (the models' ``post_process_for_eval`` in wzzheng/DVGT), scored
with the official metric definitions (dvgt/train/eval_metrics.py), averaged per dataset over the clips
of every rank.

What each model family is scored on (everything in metres, predictions divided by gt_scale_factor):

- DVGT-1: predicted points (first frame's ego frame) against ``points_in_ego_first``; ray depth of each
  point in its own frame's ego (through the GT poses) against ``ray_depth``; the poses decoded from
  ``absolute_ego_pose_enc`` against ``ego_n_to_ego_first``.
- DVGT-2 (both stages): the predicted relative poses ego_{t-1} -> ego_t (pretrain: the last iteration;
  planning model: the best-scoring mode of the last decoder layer) are chained to the first frame, and
  the predicted local points carried along them; the GT is chained the same way from
  ``ego_past_to_ego_curr`` and ``points_in_ego_n``; ray depth is the norm of the local points. With a
  planning head, the top-scoring trajectory of the last frame (converted to x forward, y left, yaw) is
  scored against the poses of the frames after it, zero-padded to 8 steps (the nuScenes protocol has 6).
- VGGT: the first camera's predicted pose of each frame and the points in the first camera's frame are
  moved into the ego frames through the GT rig (optionally after a per-clip similarity alignment,
  ``eval.umeyama_per_scene``), then scored as DVGT-1.

Per-clip values are summed per (dataset, metric) over the clips a rank evaluated, the sums and counts
are all-reduced, and the means are what the trainer logs as ``val/<dataset>/<metric>`` (NaN values,
e.g. a clip without valid pixels, are left out as the official nanmean does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dvgt.data.geometry import (
    absT_quaR_to_pose,
    chain_relative_poses,
    inverse_pose,
    pose_to_trajectory_rdf,
    trajectory_rdf_to_flu,
    transform_points,
)
from dvgt.train import eval_metrics

PLANNING_STEPS = 8  # the trajectory head's horizon (future poses at 2 Hz)


def best_mode(reg_list, cls_list) -> Tensor:
    """The best-scoring mode of the last decoder layer: [B, T, K, ...] -> [B, T, ...]."""
    reg, scores = reg_list[-1], cls_list[-1]
    index = scores.argmax(-1)  # [B, T]
    return torch.take_along_dim(reg, index.view(*index.shape, *([1] * (reg.dim() - 2))), dim=2).squeeze(2)


def _metres(pose: Tensor, scale: float) -> Tensor:
    """Rigid transforms [..., 4, 4] with the translation divided by gt_scale_factor."""
    pose = pose.clone()
    pose[..., :3, 3] /= scale
    return pose


def _ray_depth_in_own_frame(points_first: Tensor, ego_n_to_ego_first: Tensor) -> Tensor:
    """Distance [B,T,V,H,W] of points given in the first frame's ego to their own frame's ego origin."""
    to_own = inverse_pose(ego_n_to_ego_first)[:, :, None]  # [B,T,1,4,4]
    return transform_points(to_own, points_first).norm(dim=-1)


def post_process(
    predictions: Mapping[str, Any], batch: Mapping[str, Any], gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(predictions, ground truth) in the official evaluation's keys and frames, metres (module docstring)."""
    s = gt_scale_factor
    pred: dict[str, Tensor] = {}
    gt: dict[str, Tensor] = {}
    points = predictions["points"].double()
    if "diff_traj_reg_list" in predictions or "relative_ego_pose_enc_list" in predictions:  # DVGT-2
        if eval_cfg.points_and_poses:
            if "relative_ego_pose_enc_list" in predictions:
                relative = predictions["relative_ego_pose_enc_list"][-1]
            else:
                relative = best_mode(predictions["diff_poses_reg_list"], predictions["diff_poses_cls_list"])
            pred_poses = chain_relative_poses(absT_quaR_to_pose(relative.double()))  # ego_t -> ego_0
            gt_poses = chain_relative_poses(batch["ego_past_to_ego_curr"].double())
            pred["ego_n_to_ego_first"], gt["ego_n_to_ego_first"] = _metres(pred_poses, s), _metres(gt_poses, s)
            pred["points_in_ego_first"] = transform_points(pred_poses[:, :, None], points) / s
            gt["points_in_ego_first"] = transform_points(gt_poses[:, :, None], batch["points_in_ego_n"].double()) / s
            pred["ray_depth"] = points.norm(dim=-1) / s
            gt["ray_depth"] = batch["ray_depth"].double() / s
        if eval_cfg.trajectory and "diff_traj_reg_list" in predictions and "future_ego_n_to_ego_curr" in batch:
            top = best_mode(predictions["diff_traj_reg_list"], predictions["diff_traj_cls_list"])[:, -1].double()
            pred["trajectories"] = _trajectory_metres(trajectory_rdf_to_flu(top), s)  # [B, 8, 3]
            future = batch["future_ego_n_to_ego_curr"][:, -1].double()  # the last input frame's future
            flu = trajectory_rdf_to_flu(pose_to_trajectory_rdf(future))
            padded = flu.new_zeros(flu.shape[0], max(PLANNING_STEPS, flu.shape[1]), 3)
            padded[:, : flu.shape[1]] = flu
            gt["trajectories"] = _trajectory_metres(padded, s)
        return pred, gt
    if not eval_cfg.points_and_poses:
        return pred, gt
    gt_poses = batch["ego_n_to_ego_first"].double()
    if "cam_pose_enc" in predictions:  # VGGT: cameras and points relative to the first camera
        cam0_to_ego0 = inverse_pose(batch["ego_first_to_cam_n"][:, 0, 0].double())  # [B,4,4]
        pred_points_cam = points
        pred_cam0_to_cam = absT_quaR_to_pose(predictions["cam_pose_enc"][:, :, 0, :7].double())  # [B,T,4,4]
        if eval_cfg.umeyama_per_scene:
            pred_points_cam, pred_cam0_to_cam = _umeyama_align(pred_points_cam, pred_cam0_to_cam, batch)
        # ego_t -> ego_0 = (ego_0 <- cam_t) (cam_t <- cam_0) (cam_0 <- ego_t), with the GT rig
        ego0_to_cam_t = batch["ego_first_to_cam_n"][:, :, 0].double()  # [B,T,4,4]
        ego_t_to_cam0 = batch["ego_first_to_cam_n"][:, :1, 0].double() @ gt_poses
        pred_poses = inverse_pose(ego0_to_cam_t) @ pred_cam0_to_cam @ ego_t_to_cam0
        pred_points = transform_points(cam0_to_ego0[:, None, None], pred_points_cam)
    else:  # DVGT-1: points and poses in the first frame's ego
        pred_poses = absT_quaR_to_pose(predictions["absolute_ego_pose_enc"].double())
        pred_points = points
    pred["points_in_ego_first"] = pred_points / s
    gt["points_in_ego_first"] = batch["points_in_ego_first"].double() / s
    pred["ray_depth"] = _ray_depth_in_own_frame(pred_points, gt_poses) / s
    gt["ray_depth"] = batch["ray_depth"].double() / s
    pred["ego_n_to_ego_first"], gt["ego_n_to_ego_first"] = _metres(pred_poses, s), _metres(gt_poses, s)
    return pred, gt


def _trajectory_metres(trajectory: Tensor, scale: float) -> Tensor:
    return torch.cat([trajectory[..., :2] / scale, trajectory[..., 2:]], dim=-1)


def _umeyama_align(points: Tensor, cam0_to_cam: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
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


def umeyama(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scale, rotation, translation minimising |s R source + t - target|^2 (Umeyama 1991). [N, 3] each."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    src, dst = source - mu_s, target - mu_t
    U, D, Vt = torch.linalg.svd(dst.T @ src / len(source))
    S = torch.eye(3, dtype=source.dtype, device=source.device)
    if torch.linalg.det(U) * torch.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    variance = (src**2).sum() / len(source)
    scale = (D * S.diagonal()).sum() / variance if variance > 0 else source.new_tensor(1.0)
    return scale, R, mu_t - scale * R @ mu_s


@torch.no_grad()
def evaluate_batch(
    predictions: Mapping[str, Any], batch: Mapping[str, Any], gt_scale_factor: float, eval_cfg: Any
) -> dict[str, list[float]]:
    """The official metrics of every clip of a batch: {metric name: [value per clip]}."""
    pred, gt = post_process(predictions, batch, gt_scale_factor, eval_cfg)
    masks = batch["point_masks"].bool()
    metrics: dict[str, list[float]] = {}
    if "points_in_ego_first" in pred:
        metrics.update(eval_metrics.chamfer(pred["points_in_ego_first"], gt["points_in_ego_first"], masks))
    if "ray_depth" in pred:
        metrics.update(eval_metrics.depth(pred["ray_depth"], gt["ray_depth"], masks))
    if "ego_n_to_ego_first" in pred:
        metrics.update(eval_metrics.pose_auc(pred["ego_n_to_ego_first"], gt["ego_n_to_ego_first"], masks))
    if "trajectories" in pred:
        metrics.update(eval_metrics.trajectory(pred["trajectories"], gt["trajectories"]))
    return metrics


class EvalAccumulator:
    """Sums and counts of per-clip values per (group, metric); ``reduce`` adds up every rank's."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, group: str, metrics: Mapping[str, list[float]]) -> None:
        for name, values in metrics.items():
            key = f"{group}/{name}"
            for value in values:
                if math.isfinite(value):
                    self.sums[key] = self.sums.get(key, 0.0) + value
                    self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """The mean of every key over all ranks (a collective when a process group is up)."""
        keys = sorted(self.sums)
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
        totals = torch.tensor(
            [[self.sums.get(k, 0.0), self.counts.get(k, 0)] for k in keys] or np.zeros((0, 2)),
            dtype=torch.float64,
            device=device,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        return {key: (total / count).item() for key, (total, count) in zip(keys, totals) if count > 0}

"""Held-out evaluation as the official code does it: each family brings its predictions into the frames
and units the official metrics expect (its ``post_process``, after the models' ``post_process_for_eval``
in wzzheng/DVGT; dvgt/families/), `evaluate_batch` / `score` apply the official metric definitions
(dvgt/train/eval_metrics.py), and `EvalAccumulator` averages per dataset over the clips of every rank.

Per-clip values are summed per (dataset, metric) over the clips a rank evaluated, the sums and counts
are all-reduced, and the means are what the trainer logs as ``val/<dataset>/<metric>`` (NaN values,
e.g. a clip without valid pixels, are left out as the official nanmean does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dvgt.data.geometry import inverse_pose, transform_points
from dvgt.train import eval_metrics

if TYPE_CHECKING:  # the families build on this module's helpers
    from dvgt.families.base import ModelFamily


def in_metres(pose: Tensor, scale: float) -> Tensor:
    """Rigid transforms [..., 4, 4] with the translation divided by gt_scale_factor."""
    pose = pose.clone()
    pose[..., :3, 3] /= scale
    return pose


def ray_depth_in_own_frame(points_first: Tensor, ego_n_to_ego_first: Tensor) -> Tensor:
    """Distance [B,T,V,H,W] of points given in the first frame's ego to their own frame's ego origin."""
    to_own = inverse_pose(ego_n_to_ego_first)[:, :, None]  # [B,T,1,4,4]
    return transform_points(to_own, points_first).norm(dim=-1)


def trajectory_in_metres(trajectory: Tensor, scale: float) -> Tensor:
    """Trajectories [..., 3] (x, y, yaw) with the positions divided by gt_scale_factor."""
    return torch.cat([trajectory[..., :2] / scale, trajectory[..., 2:]], dim=-1)


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
    family: ModelFamily, predictions: Mapping[str, Any], batch: Mapping[str, Any], gt_scale_factor: float, eval_cfg: Any
) -> dict[str, list[float]]:
    """The official metrics of every clip of a batch: {metric name: [value per clip]}."""
    pred, gt = family.post_process(predictions, batch, gt_scale_factor, eval_cfg)
    return score(pred, gt, batch["point_masks"])


@torch.no_grad()
def score(pred: Mapping[str, Tensor], gt: Mapping[str, Tensor], masks: Tensor) -> dict[str, list[float]]:
    """The official metrics of every clip of a batch from a family's post-processed (pred, gt):
    {metric name: [value per clip]}. masks: the batch's ``point_masks`` [B,T,V,H,W]."""
    masks = masks.bool()
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

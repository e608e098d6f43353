"""The paper's evaluation metrics, as the official code defines them (dvgt/evaluation/metrics of
wzzheng/DVGT), under their official names. Each function takes a batch and returns, per metric, a list
with one value per batch element (NaN where the metric is undefined), like the official functions.

- ``chamfer``: per image (t, v) with valid pixels, accuracy = mean distance from each valid predicted
  point to the nearest valid GT point, completeness the reverse, chamfer = their sum (exact Euclidean
  nearest neighbours); averaged over the images. Keys ``ego_first_accuracy``, ``ego_first_completeness``,
  ``ego_first_chamfer`` (point_cloud_metrics.py:compute_chamfer_distance_single_view).
- ``depth``: over every valid pixel of the sample, prediction and GT clamped at 1e-6, AbsRel and the share
  with max(p/g, g/p) < 1.25 (a fraction). Keys ``ego_n_Abs Rel``, ``ego_n_δ < 1.25``
  (depth_metrics.py:depth_evaluation; evaluation feeds it the ray depth in each frame's ego frame).
- ``pose_auc``: poses ego_n -> ego_first of the frames with more than 100 valid pixels, all pairs i < j,
  error = max(rotation angle, translation direction angle (sign-ambiguous)), AUC@th = mean of the
  cumulative 1-degree histogram over [0, th], x 100. Keys ``ego_n_to_ego_first_AUC@{th}``
  (auc_pose_metrics.py:calculate_pose_auc).
- ``trajectory``: per future index t, ``{t}_xy_l2`` = |Δxy| and ``{t}_theta_l1`` = |wrapped Δyaw|
  (radians); predictions with x == -999 are NaN (trajectory_metrics.py:compute_trajectory_errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from dvgt.data.geometry import inverse_pose, rotation_to_quaternion

Metrics = dict[str, list[float]]
AUC_THRESHOLDS = (5, 10, 30)  # the official summary reports AUC@30; 5 and 10 come for free
MIN_POSE_PIXELS = 100  # a frame takes part in the pose AUC with more valid pixels than this
DELTA = 1.25
MIN_DEPTH = 1e-6
INVALID_TRAJECTORY = -999.0

# Official metric-name prefixes (utils/metric_utils.py:compute_all_metrics)
POINT_PREFIX, DEPTH_PREFIX, POSE_PREFIX = "ego_first_", "ego_n_", "ego_n_to_ego_first_"
ABS_REL, DELTA_125 = f"{DEPTH_PREFIX}Abs Rel", f"{DEPTH_PREFIX}δ < 1.25"
# The columns of the official summary (summarize_and_log), in its order
SUMMARY_METRICS = (
    "1_xy_l2",
    "1_theta_l1",
    "3_xy_l2",
    "3_theta_l1",
    "5_xy_l2",
    "5_theta_l1",
    "7_xy_l2",
    "7_theta_l1",
    f"{POINT_PREFIX}accuracy",
    f"{POINT_PREFIX}completeness",
    f"{POINT_PREFIX}chamfer",
    ABS_REL,
    DELTA_125,
    f"{POSE_PREFIX}AUC@30",
)


def chamfer(pred_points: Tensor, gt_points: Tensor, gt_masks: Tensor) -> Metrics:
    """pred_points, gt_points [B, T, V, H, W, 3] (metres), gt_masks [B, T, V, H, W]."""
    B = pred_points.shape[0]
    pred = pred_points.detach().reshape(B, -1, pred_points.shape[-2] * pred_points.shape[-3], 3).double().cpu().numpy()
    gt = gt_points.detach().reshape(pred.shape).double().cpu().numpy()
    masks = gt_masks.detach().reshape(pred.shape[:3]).bool().cpu().numpy()
    result: Metrics = {f"{POINT_PREFIX}{k}": [] for k in ("accuracy", "completeness", "chamfer")}
    for b in range(B):
        per_image = []
        for i in range(pred.shape[1]):
            mask = masks[b, i]
            if not mask.any():
                continue
            p, g = pred[b, i][mask], gt[b, i][mask]
            accuracy = cKDTree(g).query(p, k=1)[0].mean()
            completeness = cKDTree(p).query(g, k=1)[0].mean()
            per_image.append((accuracy, completeness, accuracy + completeness))
        values = np.mean(per_image, axis=0) if per_image else (math.nan,) * 3
        for key, value in zip(result, values):
            result[key].append(float(value))
    return result


def depth(pred_depth: Tensor, gt_depth: Tensor, gt_mask: Tensor) -> Metrics:
    """pred_depth, gt_depth, gt_mask [B, ...] (any trailing shape)."""
    result: Metrics = {ABS_REL: [], DELTA_125: []}
    for b in range(pred_depth.shape[0]):
        mask = gt_mask[b].bool()
        if not mask.any():
            result[ABS_REL].append(math.nan)
            result[DELTA_125].append(math.nan)
            continue
        pred, gt = pred_depth[b][mask].clamp(min=MIN_DEPTH), gt_depth[b][mask].clamp(min=MIN_DEPTH)
        result[ABS_REL].append(((pred - gt).abs() / gt).mean().item())
        result[DELTA_125].append((torch.maximum(pred / gt, gt / pred) < DELTA).float().mean().item())
    return result


def pose_auc(
    pred_poses: Tensor, gt_poses: Tensor, gt_masks: Tensor, thresholds: Sequence[int] = AUC_THRESHOLDS
) -> Metrics:
    """pred_poses, gt_poses [B, T, 4, 4] ego_n -> ego_first; gt_masks [B, T, V, H, W]."""
    keys = [f"{POSE_PREFIX}AUC@{th}" for th in thresholds]
    result: Metrics = {key: [] for key in keys}
    B, T = pred_poses.shape[:2]
    valid_frames = gt_masks.flatten(2).sum(-1) > MIN_POSE_PIXELS  # [B, T]
    # the official code treats the inverses as world-to-camera poses (VGGT's evaluation)
    pred_w2c, gt_w2c = inverse_pose(pred_poses.detach()), inverse_pose(gt_poses.detach())
    for b in range(B):
        keep = valid_frames[b]
        if T == 1 or int(keep.sum()) < 2:
            for key in keys:
                result[key].append(math.nan)
            continue
        rotation_error, direction_error = _relative_pose_errors(pred_w2c[b][keep], gt_w2c[b][keep])
        worst = torch.maximum(rotation_error, direction_error).cpu().numpy()
        for key, th in zip(keys, thresholds):
            histogram, _ = np.histogram(worst, bins=np.arange(th + 1))
            result[key].append(float(np.mean(np.cumsum(histogram / len(worst))) * 100))
    return result


def _relative_pose_errors(pred: Tensor, gt: Tensor, eps: float = 1e-15) -> tuple[Tensor, Tensor]:
    """Rotation and translation-direction errors (degrees) of P_i P_j^-1 over all pairs i < j."""
    i, j = torch.combinations(torch.arange(len(gt), device=gt.device), 2).unbind(-1)
    rel_pred, rel_gt = pred[i] @ inverse_pose(pred[j]), gt[i] @ inverse_pose(gt[j])
    q_pred, q_gt = rotation_to_quaternion(rel_pred[:, :3, :3]), rotation_to_quaternion(rel_gt[:, :3, :3])
    loss_q = (1 - (q_pred * q_gt).sum(-1) ** 2).clamp(min=eps)
    rotation_error = torch.rad2deg(torch.arccos(1 - 2 * loss_q))
    t_pred, t_gt = rel_pred[:, :3, 3], rel_gt[:, :3, 3]
    t_pred = t_pred / (t_pred.norm(dim=-1, keepdim=True) + eps)
    t_gt = t_gt / (t_gt.norm(dim=-1, keepdim=True) + eps)
    loss_t = (1.0 - (t_pred * t_gt).sum(-1) ** 2).clamp(min=eps)
    direction_error = torch.arccos(torch.sqrt(1 - loss_t))
    direction_error = torch.where(
        torch.isfinite(direction_error), direction_error, torch.full_like(direction_error, 1e6)
    )
    direction_error = torch.rad2deg(direction_error)
    return rotation_error, torch.minimum(direction_error, (180 - direction_error).abs())


def trajectory(pred_trajectory: Tensor, gt_trajectory: Tensor) -> Metrics:
    """pred_trajectory, gt_trajectory [B, N, 3] = (x, y, yaw) (or [B, N, 4] with z): errors per index."""
    invalid = pred_trajectory[..., 0] == INVALID_TRAJECTORY
    xy = (pred_trajectory[..., :-1] - gt_trajectory[..., :-1]).norm(dim=-1)
    yaw = pred_trajectory[..., -1] - gt_trajectory[..., -1]
    yaw = ((yaw + torch.pi) % (2 * torch.pi) - torch.pi).abs()
    xy, yaw = xy.masked_fill(invalid, math.nan), yaw.masked_fill(invalid, math.nan)
    result: Metrics = {}
    for t in range(xy.shape[1]):
        result[f"{t}_xy_l2"] = xy[:, t].tolist()
        result[f"{t}_theta_l1"] = yaw[:, t].tolist()
    return result


# The argument names of each official metric function: a case file holding them is scored by it.
CASE_FUNCTIONS: dict[tuple[str, ...], Callable[..., Metrics]] = {
    ("pred_points", "gt_points", "gt_masks"): chamfer,
    ("pred_depth", "gt_depth", "gt_mask"): depth,
    ("pred_poses", "gt_poses", "gt_masks"): pose_auc,
    ("pred_trajectory", "gt_trajectory"): trajectory,
}


def score_case(arrays: dict[str, np.ndarray]) -> Metrics:
    """Score one metric case (the official function's inputs, by argument name) with our metrics."""
    for names, function in CASE_FUNCTIONS.items():
        if set(names) == set(arrays):
            return function(*(torch.from_numpy(np.asarray(arrays[n])) for n in names))
    known = "; ".join(", ".join(names) for names in CASE_FUNCTIONS)
    raise ValueError(
        f"a metric case holds arrays {sorted(arrays)}; expected the arguments of one official metric function: {known}"
    )

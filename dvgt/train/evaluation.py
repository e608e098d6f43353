"""Held-out metrics for DVGT predictions. All distances are in metres, all angles in degrees.

Predictions are divided by ``gt_scale_factor`` first (the network predicts in scaled units); every
metric is computed per clip, in the first frame's ego frame, and averaged over the clips of a batch.
Only pixels with valid ground truth (``point_masks``) take part.

Point maps
  point_error     mean ||pred - gt|| over valid pixels: the plain "held-out point error".
  accuracy        mean distance from each predicted point to its nearest GT point (precision).
  completeness    mean distance from each GT point to its nearest predicted point (recall).
  chamfer         (accuracy + completeness) / 2.
  The three nearest-neighbour metrics use at most ``max_points`` pixels per clip, drawn with a fixed
  seed (so the numbers are comparable between evaluations); the subsampling makes both sets sparser,
  which adds a small positive bias.

Depth (each predicted point seen from the GT camera of its pixel)
  depth_abs_rel       mean |d_pred - d_gt| / d_gt.
  depth_delta_1_25    share of pixels with max(d_pred / d_gt, d_gt / d_pred) < 1.25 (1 is perfect).

Ego poses (``absolute_ego_pose_enc``: translation and quaternion xyzw of ego_t -> ego_0)
  pose_auc_30       for every frame pair i < j, the error of the relative pose is
                    max(rotation angle error, translation direction angle error); the AUC is the mean
                    over thresholds 1..30 deg of the share of pairs below the threshold (the mAA-style
                    AUC@30 of VGGT / DUSt3R evaluations; 1 is perfect). The translation direction is
                    undefined when the GT ego barely moves between the two frames (< MIN_BASELINE_M):
                    such pairs are judged by their rotation alone.
  ego_trans_error   mean ||t_pred - t_gt|| over frames 1.. (ATE-style, no alignment: poses are metric).

VGGT predictions (``cam_pose_enc``: one camera per image, first camera -> camera, absT_quaR_FoV;
points in the first camera's frame) are moved into the first frame's ego frame with the GT rig, so the
point and depth metrics above apply unchanged. Cameras are scored like ego poses, over the T*V images:
  pose_auc_30       the AUC@30 above, over every pair of images.
  cam_trans_error   mean ||c_pred - c_gt|| of the camera centres in the first camera's frame, images 1...
  fov_error_deg     mean |FoV_pred - FoV_gt| (vertical and horizontal), degrees.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from dvgt.data.geometry import absT_quaR_to_pose, inverse_pose, pose_to_absT_quaR, transform_points
from dvgt.train.losses import vggt_targets

MAX_POINTS = 20_000  # nearest-neighbour metrics: pixels per clip at most
NN_CHUNK = 1024  # rows of the distance matrix computed at once (1024 x 20k float64 = 160 MB)
AUC_MAX_THRESHOLD_DEG = 30
MIN_BASELINE_M = 0.1  # GT relative translations shorter than this have no meaningful direction
DELTA_THRESHOLD = 1.25


@torch.no_grad()
def evaluate_clip(predictions: Mapping[str, Tensor], batch: Mapping[str, Tensor], gt_scale_factor: float,
                  max_points: int = MAX_POINTS) -> Dict[str, float]:
    """The metrics of the module docstring for one batch of clips, averaged over its clips.

    A metric that is undefined for a clip (no valid pixel, a single frame) is NaN for that clip and
    left out of the average (NaN if undefined for all). DVGT-2 predictions (local points, relative
    poses, planning) are scored by dvgt2_evaluation.evaluate_dvgt2_clip.
    """
    if "diff_traj_reg_list" in predictions or "relative_ego_pose_enc_list" in predictions:
        from dvgt.train.dvgt2_evaluation import evaluate_dvgt2_clip  # it builds on this module's metrics

        return evaluate_dvgt2_clip(predictions, batch, gt_scale_factor, max_points)
    pred_points = predictions["points"].float() / gt_scale_factor  # [B,T,V,H,W,3] metres
    if "cam_pose_enc" in predictions:  # VGGT: points in the first camera's frame, one camera per image
        first_cam_to_ego0 = batch["ego_to_first"][:, 0].double() @ batch["cam_to_ego"][:, 0, 0].double()  # [B,4,4]
        pred_points = transform_points(first_cam_to_ego0.float(), pred_points)
        pose_per_clip = camera_metrics(predictions["cam_pose_enc"], batch, gt_scale_factor)
    else:
        pred_pose = predictions["absolute_ego_pose_enc"].float()  # [B,T,7]
        pred_pose = torch.cat([pred_pose[..., :3] / gt_scale_factor, pred_pose[..., 3:]], dim=-1)
        pose_per_clip = [pose_metrics(pred_pose[b], batch["ego_pose"][b].float()) for b in range(len(pred_pose))]
    pred_depths = depth_in_gt_cameras(pred_points, batch["cam_to_ego"], batch["ego_to_first"])  # [B,T,V,H,W]
    masks = batch["point_masks"].bool()
    per_clip = []
    for b in range(pred_points.shape[0]):
        metrics = point_metrics(pred_points[b][masks[b]], batch["points"][b].float()[masks[b]], max_points)
        metrics.update(depth_metrics(pred_depths[b], batch["depths"][b].float(), masks[b]))
        metrics.update(pose_per_clip[b])
        per_clip.append(metrics)
    return {key: _nanmean([m[key] for m in per_clip]) for key in per_clip[0]}


class EvalAccumulator:
    """Averages metric dicts over batches; each key keeps its own count and skips NaN/inf values."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.weights: Dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], weight: float = 1.0) -> None:
        for key, value in metrics.items():
            if math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + weight * value
                self.weights[key] = self.weights.get(key, 0.0) + weight

    def mean(self) -> Dict[str, float]:
        return {key: self.sums[key] / self.weights[key] for key in self.sums}


# --------------------------------------------------------------------------------------------
# Point maps
# --------------------------------------------------------------------------------------------


def point_metrics(pred: Tensor, gt: Tensor, max_points: int = MAX_POINTS) -> Dict[str, float]:
    """point_error, accuracy, completeness, chamfer of one clip. pred, gt: [N,3] metres, row i = pixel i."""
    if len(gt) == 0:
        return dict.fromkeys(("point_error", "accuracy", "completeness", "chamfer"), math.nan)
    point_error = torch.linalg.vector_norm(pred - gt, dim=-1).mean().item()
    if len(gt) > max_points:
        generator = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(gt), generator=generator)[:max_points].to(gt.device)
        pred, gt = pred[keep], gt[keep]
    pred_to_gt, gt_to_pred = nearest_neighbour_distances(pred, gt)
    accuracy, completeness = pred_to_gt.mean().item(), gt_to_pred.mean().item()
    return {"point_error": point_error, "accuracy": accuracy, "completeness": completeness,
            "chamfer": (accuracy + completeness) / 2}


def nearest_neighbour_distances(a: Tensor, b: Tensor, chunk: int = NN_CHUNK) -> Tuple[Tensor, Tensor]:
    """Distance from each point of a [N,3] to its nearest point of b [M,3] ([N]), and from b to a ([M]).

    float64, because cdist expands |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, which in float32 loses ~1 cm
    at driving distances. One pass over row chunks serves both directions.
    """
    a, b = a.double(), b.double()
    a_to_b = []
    b_to_a = torch.full((len(b),), math.inf, dtype=torch.float64, device=b.device)
    for start in range(0, len(a), chunk):
        dist = torch.cdist(a[start:start + chunk], b)  # [chunk, M]
        a_to_b.append(dist.min(dim=1).values)
        b_to_a = torch.minimum(b_to_a, dist.min(dim=0).values)
    return torch.cat(a_to_b), b_to_a


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


def depth_in_gt_cameras(points: Tensor, cam_to_ego: Tensor, ego_to_first: Tensor) -> Tensor:
    """Depth (camera z) of each pixel's point in that pixel's GT camera.

    points: [B,T,V,H,W,3] in the first frame's ego frame; cam_to_ego: [B,T,V,4,4];
    ego_to_first: [B,T,4,4]. Returns [B,T,V,H,W] in the units of ``points``'s frames (metres).
    """
    first_from_cam = ego_to_first[:, :, None].double() @ cam_to_ego.double()  # [B,T,V,4,4]
    z_row = inverse_pose(first_from_cam)[..., 2, :].to(points.dtype)  # [B,T,V,4]: camera z of a point
    z_row = z_row[:, :, :, None, None, :]  # [B,T,V,1,1,4]
    return (points * z_row[..., :3]).sum(-1) + z_row[..., 3]


def depth_metrics(pred_depth: Tensor, gt_depth: Tensor, mask: Tensor) -> Dict[str, float]:
    """depth_abs_rel and depth_delta_1_25 over valid pixels with positive GT depth. All inputs [...] alike."""
    valid = mask & (gt_depth > 0)
    if not valid.any():
        return {"depth_abs_rel": math.nan, "depth_delta_1_25": math.nan}
    pred, gt = pred_depth[valid], gt_depth[valid]
    abs_rel = ((pred - gt).abs() / gt).mean().item()
    pred = pred.clamp(min=1e-6)  # a point behind the camera must fail the ratio test, not pass it
    delta = (torch.maximum(pred / gt, gt / pred) < DELTA_THRESHOLD).float().mean().item()
    return {"depth_abs_rel": abs_rel, "depth_delta_1_25": delta}


# --------------------------------------------------------------------------------------------
# Ego poses
# --------------------------------------------------------------------------------------------


def pose_metrics(pred: Tensor, gt: Tensor) -> Dict[str, float]:
    """pose_auc_30 and ego_trans_error of one clip. pred, gt: [T,7] pose encodings in metres."""
    if len(gt) < 2:
        return {"pose_auc_30": math.nan, "ego_trans_error": math.nan}
    trans_error = torch.linalg.vector_norm(pred[1:, :3] - gt[1:, :3], dim=-1).mean().item()
    rot_err, dir_err = relative_pose_errors(pred, gt)
    return {"pose_auc_30": pose_auc(torch.maximum(rot_err, dir_err)), "ego_trans_error": trans_error}


def relative_pose_errors(pred: Tensor, gt: Tensor, min_baseline: float = MIN_BASELINE_M) -> Tuple[Tensor, Tensor]:
    """Rotation and translation-direction errors (degrees) of the relative pose of every frame pair i < j.

    pred, gt: [T,7] encodings of ego_t -> ego_0 (metres). The relative pose of a pair maps ego_j to
    ego_i: inverse(P_i) @ P_j. Returns two [T*(T-1)/2] tensors; the direction error is 0 for pairs
    whose GT baseline is shorter than min_baseline.
    """
    i, j = torch.triu_indices(len(gt), len(gt), offset=1, device=gt.device)
    pred_abs, gt_abs = absT_quaR_to_pose(pred.double()), absT_quaR_to_pose(gt.double())  # [T,4,4]
    pred_rel = inverse_pose(pred_abs[i]) @ pred_abs[j]  # [P,4,4]
    gt_rel = inverse_pose(gt_abs[i]) @ gt_abs[j]

    rot_diff = pred_rel[:, :3, :3].transpose(-1, -2) @ gt_rel[:, :3, :3]
    cos_rot = ((rot_diff.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    rot_err = torch.rad2deg(torch.acos(cos_rot))

    t_pred, t_gt = pred_rel[:, :3, 3], gt_rel[:, :3, 3]
    baseline = torch.linalg.vector_norm(t_gt, dim=-1)
    cos_dir = (t_pred * t_gt).sum(-1) / (torch.linalg.vector_norm(t_pred, dim=-1) * baseline).clamp(min=1e-12)
    dir_err = torch.rad2deg(torch.acos(cos_dir.clamp(-1, 1)))
    dir_err = torch.where(baseline < min_baseline, torch.zeros_like(dir_err), dir_err)
    return rot_err.float(), dir_err.float()


def pose_auc(errors_deg: Tensor, max_threshold: int = AUC_MAX_THRESHOLD_DEG) -> float:
    """Mean over thresholds 1..max_threshold degrees of the share of errors below the threshold."""
    thresholds = torch.arange(1, max_threshold + 1, device=errors_deg.device, dtype=errors_deg.dtype)
    return (errors_deg[:, None] < thresholds).float().mean().item()


def camera_metrics(pred: Tensor, batch: Mapping[str, Tensor], gt_scale_factor: float) -> List[Dict[str, float]]:
    """pose_auc_30, cam_trans_error and fov_error_deg of each clip. pred: VGGT's cam_pose_enc [B,T,V,9]."""
    pred = pred.float().flatten(1, 2)  # [B,T*V,9]
    pred = torch.cat([pred[..., :3] / gt_scale_factor, pred[..., 3:]], dim=-1)
    gt = vggt_targets(batch)[1].flatten(1, 2)
    per_clip = []
    for b in range(len(pred)):
        # pose_metrics scores poses mapping each image's frame into the first one: invert the extrinsics
        cam_to_first = [pose_to_absT_quaR(inverse_pose(absT_quaR_to_pose(p[b, :, :7].double()))) for p in (pred, gt)]
        metrics = pose_metrics(*cam_to_first)
        metrics["cam_trans_error"] = metrics.pop("ego_trans_error")
        metrics["fov_error_deg"] = torch.rad2deg((pred[b, :, 7:] - gt[b, :, 7:]).abs()).mean().item()
        per_clip.append(metrics)
    return per_clip


def _nanmean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


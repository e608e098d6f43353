"""The loss terms the model families compose (dvgt/families/): confidence-aware point-map regression,
ego-pose regression and VGGT's camera loss.

The point loss follows VGGT's training loss (facebookresearch/vggt, training/loss.py):

* every valid pixel has a regression error ``reg = ||gt - pred||`` and a confidence term
  ``gamma * reg * conf - alpha * log(conf)``: the network may lower its confidence where it is wrong,
  but pays ``-alpha * log(conf)`` for doing so;
* a gradient term compares local surface structure (normals, or finite differences) at 3 scales,
  weighted by confidence the same way (VGGT does that only for its "*conf*" variants; here always);
* the largest per-pixel losses (above the ``valid_range`` quantile) are dropped as outliers.

The ego-pose loss is an L1 (or L2) loss on the translation and on the quaternion of every refinement
iteration of the pose head, later iterations weighing more.

VGGT's camera loss is the same per-iteration scheme on translation, quaternion and field of view.

Targets are the official sample's keys (docs/data.md), which the data already multiplied by
``gt_scale_factor``: they are in the units of the network output. Everything is computed in float32
(the families turn autocast off). Non-finite values are returned as they are: the trainer skips such
steps and counts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dvgt.data.geometry import pose_to_absT_quaR

MIN_VALID_PIXELS = 100  # below this many valid pixels in a batch the point loss is zero
GRADIENT_LOSS_SCALES = 3  # the gradient term is averaged over strides 1, 2, 4
MIN_GRADIENT_ELEMENTS = 10  # a scale with fewer valid neighbourhoods adds nothing
QUANTILE_MIN_ELEMENTS = 1000  # the outlier filter only acts on more elements than this
HARD_MAX = 100.0  # per-element losses are clamped here (outlier filter, translation loss)


def point_losses(
    predictions: Mapping[str, Any], gt_points: Tensor, batch: Mapping[str, Tensor], point_cfg: Any
) -> dict[str, Tensor]:
    """The point loss of a model's ``points`` / ``points_conf`` against ``gt_points`` [B,T,V,H,W,3] over
    ``batch["point_masks"]``, in float32; ``objective`` = point.weight * (conf + reg + grad terms). The
    families add their pose terms to it."""
    losses = point_loss(
        predictions["points"].float(),
        predictions["points_conf"].float(),
        gt_points.float(),
        batch["point_masks"].bool(),
        gamma=point_cfg.gamma,
        alpha=point_cfg.alpha,
        gradient_loss_fn=point_cfg.gradient_loss_fn,
        valid_range=point_cfg.valid_range,
    )
    losses["objective"] = point_cfg.weight * (
        losses["loss_conf_point"] + losses["loss_reg_point"] + losses["loss_grad_point"]
    )
    return losses


def ego_pose_losses(pred_list: list[Tensor], gt_pose: Tensor, pose_cfg: Any) -> dict[str, Tensor]:
    """`ego_pose_loss` of predicted pose encodings (n x [B,T,7], taken in float32) against the rigid transforms
    `gt_pose` [B,T,4,4], with the config section `loss.ego_pose` (its weight is the caller's)."""
    return ego_pose_loss(
        [pose.float() for pose in pred_list],
        pose_to_absT_quaR(gt_pose.float()),
        gamma=pose_cfg.gamma,
        loss_type=pose_cfg.loss_type,
        weight_trans=pose_cfg.weight_trans,
        weight_rot=pose_cfg.weight_rot,
    )


# --------------------------------------------------------------------------------------------
# Point loss
# --------------------------------------------------------------------------------------------


def point_loss(
    pred: Tensor,
    conf: Tensor,
    gt: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 0.2,
    gradient_loss_fn: str | None = "normal",
    valid_range: float = 0.98,
) -> dict[str, Tensor]:
    """Confidence-aware point-map loss.

    pred, gt: [..., H, W, 3] in the same units; conf: [..., H, W] (> 0); mask: bool [..., H, W].
    Returns ``loss_conf_point``, ``loss_reg_point`` and ``loss_grad_point`` (scalars).
    """
    if mask.sum() < MIN_VALID_PIXELS:
        zero = 0.0 * pred.mean()  # keeps the graph, so every rank runs the same backward
        return {"loss_conf_point": zero, "loss_reg_point": zero, "loss_grad_point": zero}
    # Invalid pixels may hold anything (NaN, inf): zero them, or the normal loss's backward turns
    # 0 * NaN into NaN gradients even though its forward pass ignores them.
    gt = torch.where(mask[..., None], gt, torch.zeros_like(gt))

    reg = torch.linalg.vector_norm(gt[mask] - pred[mask], dim=-1)  # [N valid]
    conf_term = confidence_weighted(reg, conf[mask], gamma, alpha)  # [N valid]

    if gradient_loss_fn is None:
        grad = pred.new_zeros(())
    else:
        h, w = pred.shape[-3:-1]
        grad = multi_scale_gradient_loss(
            pred.reshape(-1, h, w, 3),
            gt.reshape(-1, h, w, 3),
            mask.reshape(-1, h, w),
            conf.reshape(-1, h, w),
            gradient_loss_fn,
            gamma,
            alpha,
        )
    return {
        "loss_conf_point": filter_by_quantile(conf_term, valid_range).mean(),
        "loss_reg_point": filter_by_quantile(reg, valid_range).mean(),
        "loss_grad_point": grad,
    }


def confidence_weighted(error: Tensor, conf: Tensor, gamma: float, alpha: float) -> Tensor:
    """gamma * error * conf - alpha * log(conf), element-wise."""
    return gamma * error * conf - alpha * torch.log(conf)


def multi_scale_gradient_loss(
    pred: Tensor,
    gt: Tensor,
    mask: Tensor,
    conf: Tensor,
    kind: str,
    gamma: float,
    alpha: float,
    scales: int = GRADIENT_LOSS_SCALES,
) -> Tensor:
    """Mean over strides 1, 2, 4, ... of the confidence-weighted local-structure error.

    pred, gt: [N,H,W,3]; mask, conf: [N,H,W]. kind: "normal" (1 - cos between surface normals) or
    "grad" (L1 difference of neighbouring point-map gradients).
    """
    error_fns = {"normal": normal_errors, "grad": finite_difference_errors}
    if kind not in error_fns:
        raise ValueError(f"unknown gradient_loss_fn '{kind}' (expected normal, grad or None)")
    total = pred.new_zeros(())
    for s in range(scales):
        step = 2**s
        errors, error_conf = error_fns[kind](
            pred[:, ::step, ::step], gt[:, ::step, ::step], mask[:, ::step, ::step], conf[:, ::step, ::step]
        )
        if errors.numel() >= MIN_GRADIENT_ELEMENTS:
            total = total + confidence_weighted(errors, error_conf, gamma, alpha).mean()
    return total / scales


def surface_normals(points: Tensor, mask: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Unit normals of a point map from the cross products of its 4 pairs of adjacent neighbours.

    points: [N,H,W,3]; mask: bool [N,H,W]. Returns normals [4,N,H,W,3] (up x left, left x down,
    down x right, right x up) and valid [4,N,H,W] (centre and both neighbours valid). Degenerate
    normals (collinear points) normalise to zero instead of NaN.
    """
    pts = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [N,H+2,W+2,3]
    valid = F.pad(mask, (1, 1, 1, 1))  # outside the image counts as invalid
    centre = pts[:, 1:-1, 1:-1]
    up, down = pts[:, :-2, 1:-1] - centre, pts[:, 2:, 1:-1] - centre
    left, right = pts[:, 1:-1, :-2] - centre, pts[:, 1:-1, 2:] - centre
    v_centre, v_up, v_down = valid[:, 1:-1, 1:-1], valid[:, :-2, 1:-1], valid[:, 2:, 1:-1]
    v_left, v_right = valid[:, 1:-1, :-2], valid[:, 1:-1, 2:]
    normals = torch.stack(
        [
            torch.cross(up, left, dim=-1),
            torch.cross(left, down, dim=-1),
            torch.cross(down, right, dim=-1),
            torch.cross(right, up, dim=-1),
        ]
    )
    valids = torch.stack([v_up & v_left, v_left & v_down, v_down & v_right, v_right & v_up]) & v_centre
    return F.normalize(normals, dim=-1, eps=eps), valids


def normal_errors(pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor) -> tuple[Tensor, Tensor]:
    """1 - cos(angle between predicted and GT normals) per valid (direction, pixel), and its confidence."""
    pred_normals, valid = surface_normals(pred, mask)
    gt_normals, _ = surface_normals(gt, mask)
    cos = (pred_normals * gt_normals).sum(-1)[valid].clamp(-1.0, 1.0)  # [K]
    return 1.0 - cos, conf.expand(4, *conf.shape)[valid]


def finite_difference_errors(pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor) -> tuple[Tensor, Tensor]:
    """Per valid horizontal/vertical neighbour pair: mean over xyz of |change of (pred - gt)|.

    Each pair takes the confidence of its second pixel.
    """
    diff = pred - gt  # [N,H,W,3]
    grad_x = (diff[:, :, 1:] - diff[:, :, :-1]).abs().mean(-1)  # [N,H,W-1]
    grad_y = (diff[:, 1:] - diff[:, :-1]).abs().mean(-1)  # [N,H-1,W]
    valid_x = mask[:, :, 1:] & mask[:, :, :-1]
    valid_y = mask[:, 1:] & mask[:, :-1]
    errors = torch.cat([grad_x[valid_x], grad_y[valid_y]]).clamp(max=HARD_MAX)
    return errors, torch.cat([conf[:, :, 1:][valid_x], conf[:, 1:][valid_y]])


def filter_by_quantile(
    values: Tensor, valid_range: float, min_elements: int = QUANTILE_MIN_ELEMENTS, hard_max: float = HARD_MAX
) -> Tensor:
    """Clamp at ``hard_max`` and keep the values up to the ``valid_range`` quantile (outlier filter).

    values: [N]. Small tensors (<= min_elements) and valid_range <= 0 pass through unchanged. The
    quantile is a k-th value ("nearest" rank), which unlike torch.quantile has no input-size limit.
    """
    if valid_range <= 0 or values.numel() <= min_elements:
        return values
    values = values.clamp(max=hard_max)
    k = round(valid_range * (values.numel() - 1)) + 1
    threshold = values.detach().kthvalue(k).values
    kept = values[values <= threshold]
    return kept if kept.numel() > min_elements else values


# --------------------------------------------------------------------------------------------
# Ego-pose loss
# --------------------------------------------------------------------------------------------


def ego_pose_loss(
    pred_list: list[Tensor],
    gt: Tensor,
    *,
    gamma: float = 0.6,
    loss_type: str = "l1",
    weight_trans: float = 1.0,
    weight_rot: float = 1.0,
) -> dict[str, Tensor]:
    """Pose-encoding loss over the pose head's iterations.

    pred_list: n tensors [B,T,7] (translation, quaternion xyzw), gt: [B,T,7] in the same units.
    Frame 0 is the reference (identity by construction) and is not supervised. Iteration i of n
    weighs gamma ** (n - i - 1), and the weighted sum is divided by n. Returns ``loss_T``,
    ``loss_R`` and ``loss_ego_pose`` = weight_trans * loss_T + weight_rot * loss_R.
    """
    if gt.shape[1] < 2:  # a single frame: nothing to supervise
        zero = 0.0 * torch.stack([pred.mean() for pred in pred_list]).sum()  # keeps the graph
        return {"loss_T": zero, "loss_R": zero, "loss_ego_pose": zero}
    n = len(pred_list)
    loss_t = loss_r = gt.new_zeros(())
    for i, pred in enumerate(pred_list):
        weight = gamma ** (n - i - 1)
        err_t, err_r = _pose_errors(pred[:, 1:], gt[:, 1:], loss_type)
        loss_t = loss_t + weight * err_t.clamp(max=HARD_MAX).mean()
        loss_r = loss_r + weight * err_r.mean()
    loss_t, loss_r = loss_t / n, loss_r / n
    return {"loss_T": loss_t, "loss_R": loss_r, "loss_ego_pose": weight_trans * loss_t + weight_rot * loss_r}


def _pose_errors(pred: Tensor, gt: Tensor, loss_type: str) -> tuple[Tensor, Tensor]:
    """Translation and quaternion errors: element-wise absolute (l1) or per-frame Euclidean (l2)."""
    d_t, d_r = pred[..., :3] - gt[..., :3], pred[..., 3:7] - gt[..., 3:7]
    if loss_type == "l1":
        return d_t.abs(), d_r.abs()
    if loss_type == "l2":
        return torch.linalg.vector_norm(d_t, dim=-1), torch.linalg.vector_norm(d_r, dim=-1)
    raise ValueError(f"unknown ego_pose loss_type '{loss_type}' (expected l1 or l2)")


# --------------------------------------------------------------------------------------------
# VGGT's camera loss
# --------------------------------------------------------------------------------------------


def camera_loss(
    pred_list: list[Tensor],
    gt: Tensor,
    valid_clips: Tensor,
    *,
    gamma: float = 0.6,
    loss_type: str = "l1",
    weight_trans: float = 1.0,
    weight_rot: float = 1.0,
    weight_focal: float = 0.5,
) -> dict[str, Tensor]:
    """VGGT's camera loss over the camera head's iterations.

    pred_list: n tensors [B,T,V,9] (absT_quaR_FoV), gt: [B,T,V,9] in the same units; valid_clips:
    bool [B], the clips that are supervised. Every image counts, the first camera (identity) too.
    Iteration i of n weighs gamma ** (n - i - 1), and the weighted sum is divided by n. Returns
    ``loss_T``, ``loss_R``, ``loss_FL`` and ``loss_camera`` = weight_trans * loss_T + weight_rot * loss_R
    + weight_focal * loss_FL.
    """
    if not valid_clips.any():
        zero = 0.0 * torch.stack([pred.mean() for pred in pred_list]).sum()  # keeps the graph
        return {"loss_T": zero, "loss_R": zero, "loss_FL": zero, "loss_camera": zero}
    n = len(pred_list)
    gt = gt[valid_clips]
    loss_t = loss_r = loss_fl = gt.new_zeros(())
    for i, pred in enumerate(pred_list):
        weight = gamma ** (n - i - 1)
        pred = pred[valid_clips]
        err_t, err_r = _pose_errors(pred, gt, loss_type)
        d_fl = pred[..., 7:] - gt[..., 7:]
        err_fl = d_fl.abs() if loss_type == "l1" else torch.linalg.vector_norm(d_fl, dim=-1)
        loss_t = loss_t + weight * err_t.clamp(max=HARD_MAX).mean()
        loss_r = loss_r + weight * err_r.mean()
        loss_fl = loss_fl + weight * err_fl.mean()
    loss_t, loss_r, loss_fl = loss_t / n, loss_r / n, loss_fl / n
    return {
        "loss_T": loss_t,
        "loss_R": loss_r,
        "loss_FL": loss_fl,
        "loss_camera": weight_trans * loss_t + weight_rot * loss_r + weight_focal * loss_fl,
    }

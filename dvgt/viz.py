"""Result figure: training curves plus one held-out clip (depth maps and a bird's-eye view); the
bird's-eye view of a streaming inference run (`dvgt infer`).

Drawn with matplotlib's object API (``Figure`` + Agg), so no display and no pyplot state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from dvgt.config import EvalConfig
from dvgt.data.geometry import transform_points
from dvgt.families.base import ModelFamily
from dvgt.train import eval_metrics
from dvgt.train.evaluation import evaluate_batch

GT_COLOR, PRED_COLOR = "tab:blue", "tab:orange"
LOSS_COMPONENTS = ("loss_conf_point", "loss_reg_point", "loss_grad_point", "loss_ego_pose")
# held-out metrics in metres, logged by the trainer as val/<dataset>/<name>
HELD_OUT_METRICS = ("ego_first_accuracy", "ego_first_completeness", "ego_first_chamfer")
BEV_MAX_POINTS = 4000  # points per set drawn in the bird's-eye view
DEPTH_CMAP = matplotlib.colormaps["turbo"].with_extremes(bad="0.85")  # invalid pixels in light grey


def render_training_curves(
    history: Sequence[Mapping[str, Any]], out_png: str | Path, title: str = "DVGT training"
) -> Path:
    """Only the training-curve row of the result figure, as a PNG."""
    fig = Figure(figsize=(20, 4.2), layout="constrained")
    plot_training_curves(fig.subplots(1, 4), history)
    fig.suptitle(title, fontsize=14)
    return _save(fig, out_png)


def render_result_figure(
    history: Sequence[Mapping[str, Any]],
    clip: Mapping[str, Any],
    predictions: Mapping[str, Any],
    out_png: str | Path,
    *,
    family: ModelFamily,
    gt_scale_factor: float,
    title: str = "DVGT result",
    views: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Training curves (top row) and the first clip of ``clip`` (one row per (frame, view) pair).

    history: JSON-lines log records (train records: step, loss/objective, loss/loss_*, lr; eval records:
    step, val/<dataset>/<metric>). clip: an evaluation batch (official keys, docs/data.md); predictions:
    the model output for it, in units scaled by gt_scale_factor. views: the (frame, view) pairs shown; by
    default the first view of the first frame and the middle view of the last frame. Each row shows the
    input image, GT depth and predicted depth on one colour scale; the right column is a bird's-eye view
    (x right, z forward, first-frame ego frame) of GT vs predicted points and ego trajectories.
    """
    clip, predictions = _first_clip(clip), _first_clip(predictions)
    pred, gt = family.post_process(predictions, clip, gt_scale_factor, EvalConfig())  # metres, the first frame's ego
    first_to_cam = clip["ego_first_to_cam_n"][0].double().clone()  # [T,V,4,4]
    first_to_cam[..., :3, 3] /= gt_scale_factor
    pred_depth = transform_points(first_to_cam[:, :, None], pred["points_in_ego_first"][0])[..., 2]  # [T,V,H,W]
    depths = clip["depths"][0].double() / gt_scale_factor
    num_frames, num_views = depths.shape[:2]
    views = list(views or dict.fromkeys([(0, 0), (num_frames - 1, num_views // 2)]))

    fig = Figure(figsize=(20, 4.2 * (1 + len(views))), layout="constrained")
    grid = fig.add_gridspec(1 + len(views), 4, width_ratios=[1, 1, 1, 1.5])
    plot_training_curves([fig.add_subplot(grid[0, i]) for i in range(4)], history)
    masks = clip["point_masks"][0].bool()
    depth_range = _depth_range(depths, masks, views)
    for row, (t, v) in enumerate(views, start=1):
        _plot_view(
            fig,
            [fig.add_subplot(grid[row, i]) for i in range(3)],
            clip["images"][0, t, v],
            depths[t, v],
            pred_depth[t, v],
            masks[t, v],
            depth_range,
            f"frame {t}, view {v}",
        )
    metrics = {k: v[0] for k, v in evaluate_batch(family, predictions, clip, gt_scale_factor, EvalConfig()).items()}
    _plot_birds_eye(fig.add_subplot(grid[1:, 3]), masks, gt, pred, metrics)
    fig.suptitle(title, fontsize=14)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def plot_training_curves(axes: Sequence[Axes], history: Sequence[Mapping[str, Any]]) -> None:
    """Four panels: objective, loss components, held-out metrics, learning rate. Missing series are noted."""
    ax_objective, ax_components, ax_held_out, ax_lr = axes
    _plot_series(ax_objective, history, [("loss/objective", "train objective")], "training objective", log=True)
    _plot_series(
        ax_components, history, [(f"loss/{name}", name) for name in LOSS_COMPONENTS], "loss components", log=True
    )
    held_out = sorted({key for r in history for key in r if key.startswith("val/") and key.endswith(HELD_OUT_METRICS)})
    _plot_series(
        ax_held_out,
        history,
        [(key, key.removeprefix("val/")) for key in held_out],
        "held-out metrics [m]",
        log=False,
        empty_note="no held-out evaluation yet",
    )
    _plot_series(ax_lr, history, [("lr", "learning rate")], "learning rate", log=True)


def _plot_series(
    ax: Axes,
    history: Sequence[Mapping[str, Any]],
    series: list[tuple[str, str]],
    title: str,
    log: bool,
    empty_note: str = "no entries yet",
) -> None:
    """One line per (history key, label); records without a finite value for the key are skipped."""
    all_values = []
    for key, label in series:
        points = sorted((r["step"], r[key]) for r in history if "step" in r and _is_number(r.get(key)))
        if points:
            steps, values = np.array(points, dtype=float).T
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
            all_values.extend(values)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if not all_values:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, color="0.4")
        return
    if log and min(all_values) > 0:
        ax.set_yscale("log")
    elif log:  # the confidence terms can go negative: log scale beyond the smallest magnitudes, linear within
        ax.set_yscale("symlog", linthresh=max(float(np.percentile(np.abs(all_values), 10)), 1e-8))
    if len(series) > 1:
        ax.legend(fontsize=8)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# Held-out clip
# --------------------------------------------------------------------------------------------


def _first_clip(data: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors (and lists of tensors) of a batch dict, cut to its first clip, detached, on the CPU."""
    first: dict[str, Any] = {}
    for key, value in data.items():
        if torch.is_tensor(value):
            first[key] = value[:1].detach().cpu()
        elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            first[key] = [v[:1].detach().cpu() for v in value]
    return first


def _depth_range(depths: torch.Tensor, masks: torch.Tensor, views: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """The 2nd..98th percentile of the valid GT depths of the shown views: one colour scale for all."""
    shown = torch.cat([depths[t, v][masks[t, v]] for t, v in views])
    if shown.numel() == 0:
        return 0.0, 1.0
    low, high = np.percentile(shown.float().numpy(), [2, 98])
    return float(low), float(max(high, low + 1e-3))


def _plot_view(
    fig: Figure,
    axes: Sequence[Axes],
    image: torch.Tensor,
    gt: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    depth_range: tuple[float, float],
    name: str,
) -> None:
    """Input image [3,H,W], GT and predicted z-depth [H,W] of one view (invalid GT pixels greyed out)."""
    ax_image, ax_gt, ax_pred = axes
    ax_image.imshow(image.float().permute(1, 2, 0).clamp(0, 1).numpy())
    ax_image.set_title(f"input image ({name})")
    error = eval_metrics.depth(pred[None], gt[None], mask[None])[eval_metrics.ABS_REL][0]
    for ax, depth, title in ((ax_gt, gt, "GT depth"), (ax_pred, pred, f"predicted depth (AbsRel {error:.3f})")):
        shown = torch.where(mask, depth, torch.full_like(depth, math.nan)).numpy()
        im = ax.imshow(shown, cmap=DEPTH_CMAP, vmin=depth_range[0], vmax=depth_range[1])
        ax.set_title(title)
    fig.colorbar(im, ax=[ax_gt, ax_pred], label="depth [m]", shrink=0.9)
    for ax in axes:
        ax.set_axis_off()


def _plot_birds_eye(
    ax: Axes,
    masks: torch.Tensor,
    gt: Mapping[str, torch.Tensor],
    pred: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float],
) -> None:
    """x-z plane of the first-frame ego frame: GT vs predicted points (valid pixels) and ego trajectories."""
    gt_points, pred_points = gt["points_in_ego_first"][0][masks], pred["points_in_ego_first"][0][masks]  # [N,3] m
    stride = max(1, math.ceil(len(gt_points) / BEV_MAX_POINTS))
    gt_xyz, pred_xyz = gt_points[::stride].numpy(), pred_points[::stride].numpy()
    gt_traj = gt["ego_n_to_ego_first"][0, :, :3, 3].numpy()
    pred_traj = pred["ego_n_to_ego_first"][0, :, :3, 3].numpy()

    ax.scatter(gt_xyz[:, 0], gt_xyz[:, 2], s=1, color=GT_COLOR, alpha=0.4, label="GT points", rasterized=True)
    ax.scatter(
        pred_xyz[:, 0], pred_xyz[:, 2], s=1, color=PRED_COLOR, alpha=0.4, label="predicted points", rasterized=True
    )
    ax.plot(gt_traj[:, 0], gt_traj[:, 2], "-o", color="navy", markersize=4, label="GT ego trajectory")
    ax.plot(pred_traj[:, 0], pred_traj[:, 2], "--s", color="darkred", markersize=4, label="predicted ego trajectory")

    # Frame the GT, so that wild predictions cannot shrink the scene to a dot.
    _frame_birds_eye(ax, np.concatenate([gt_xyz[:, 0], gt_traj[:, 0]]), np.concatenate([gt_xyz[:, 2], gt_traj[:, 2]]))
    ax.set_title(
        "bird's-eye view (first-frame ego frame)\n"
        f"chamfer {metrics['ego_first_chamfer']:.2f} m, depth AbsRel {metrics[eval_metrics.ABS_REL]:.3f}\n"
        f"pose AUC@30 {metrics['ego_n_to_ego_first_AUC@30']:.1f}"
    )
    legend = ax.legend(loc="upper left", fontsize=8)
    for handle in legend.legend_handles[:2]:  # the point clouds: legend dots larger than the 1-px points
        if isinstance(handle, PathCollection):
            handle.set_sizes([20])
    ax.grid(alpha=0.3)


def _frame_birds_eye(ax: Axes, xs: np.ndarray, zs: np.ndarray) -> None:
    """A square x-z window around robust percentiles of xs, zs (the same metres per inch on both axes)."""
    (x0, x1), (z0, z1) = np.percentile(xs, [1, 99]), np.percentile(zs, [1, 99])
    half = 0.55 * max(x1 - x0, z1 - z0, 1.0)
    ax.set_xlim((x0 + x1) / 2 - half, (x0 + x1) / 2 + half)
    ax.set_ylim((z0 + z1) / 2 - half, (z0 + z1) / 2 + half)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (right) [m]")
    ax.set_ylabel("z (forward) [m]")


def render_streaming_bev(
    points: np.ndarray,
    frame_of_point: np.ndarray,
    ego_path: np.ndarray,
    planned: np.ndarray | None,
    out_png: str | Path,
    title: str = "DVGT-2 inference",
) -> Path:
    """Bird's-eye view (x right, z forward, first-frame ego frame) of an inference run.

    points [N, 3] metres (accumulated over frames), frame_of_point [N] (colours the points by frame),
    ego_path [T, 3] the ego positions, planned [8, 3] the last frame's planned trajectory (or None).
    """
    stride = max(1, math.ceil(len(points) / (4 * BEV_MAX_POINTS)))
    points, frame_of_point = points[::stride], frame_of_point[::stride]
    fig = Figure(figsize=(8, 8), layout="constrained")
    ax = fig.add_subplot()
    cloud = ax.scatter(
        points[:, 0],
        points[:, 2],
        s=1,
        c=frame_of_point,
        cmap="viridis",
        alpha=0.5,
        vmin=0,
        vmax=max(len(ego_path) - 1, 1),
        rasterized=True,
    )
    fig.colorbar(
        cloud, ax=ax, shrink=0.7, label="frame", ticks=np.arange(len(ego_path)) if len(ego_path) <= 20 else None
    )
    ax.plot(ego_path[:, 0], ego_path[:, 2], "-o", color="darkred", markersize=4, label="ego path")
    xs, zs = [points[:, 0], ego_path[:, 0]], [points[:, 2], ego_path[:, 2]]
    if planned is not None:
        ax.plot(
            np.r_[ego_path[-1:, 0], planned[:, 0]],
            np.r_[ego_path[-1:, 2], planned[:, 2]],
            "--^",
            color="tab:orange",
            markersize=5,
            label="planned trajectory (last frame)",
        )
        xs, zs = xs + [planned[:, 0]], zs + [planned[:, 2]]
    _frame_birds_eye(ax, np.concatenate(xs), np.concatenate(zs))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(fig, out_png)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png

"""Losses: analytic values, masking, outlier filter, normal loss, pose-iteration weighting, gradients."""

import math

import pytest
import torch

from dvgt.config import LossConfig
from dvgt.data.geometry import pose_to_absT_quaR
from dvgt.families.dvgt1 import dvgt1_loss
from dvgt.train.losses import (
    ego_pose_loss,
    filter_by_quantile,
    multi_scale_gradient_loss,
    normal_errors,
    point_loss,
)

B, T, V, H, W = 1, 3, 2, 16, 20
SCALE = 0.1  # gt_scale_factor: the data multiplies the ground truth by it
pytestmark = pytest.mark.torch_threads(2)  # the in-process training runs (the suite ran them with 2)


def make_batch(seed=0):
    """Ground truth as the data gives it (official keys, scaled): a bumpy surface per image (non-degenerate
    normals), ~85% valid pixels, the ego driving 3 m forward per frame."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-2, 2, H), torch.linspace(-3, 3, W), indexing="ij")
    depth = 10 + torch.rand(B, T, V, H, W, generator=g) * 0.5 + ys
    points = torch.stack([xs.expand_as(depth) * depth / 5, ys.expand_as(depth) * depth / 5, depth], dim=-1)
    ego_n_to_ego_first = torch.eye(4).repeat(B, T, 1, 1)
    ego_n_to_ego_first[..., 2, 3] = torch.arange(T, dtype=torch.float32) * 3.0 * SCALE
    return {
        "points_in_ego_first": points * SCALE,
        "point_masks": torch.rand(B, T, V, H, W, generator=g) < 0.85,
        "ego_n_to_ego_first": ego_n_to_ego_first,
    }


def perfect_predictions(batch, conf=2.0, iterations=4):
    pose = pose_to_absT_quaR(batch["ego_n_to_ego_first"])
    return {
        "points": batch["points_in_ego_first"].clone(),
        "points_conf": torch.full(batch["point_masks"].shape, conf),
        "absolute_ego_pose_enc": pose,
        "absolute_ego_pose_enc_list": [pose.clone() for _ in range(iterations)],
    }


def config(**point):
    cfg = LossConfig()
    for key, value in point.items():
        setattr(cfg.point, key, value)
    return cfg


@pytest.mark.parametrize("gradient_loss_fn, terms", [(None, 1), ("normal", 2), ("grad", 2)])
def test_zero_error_with_fixed_confidence_gives_the_analytic_value(gradient_loss_fn, terms):
    batch, conf = make_batch(), 2.0
    cfg = config(gradient_loss_fn=gradient_loss_fn)
    losses = dvgt1_loss(perfect_predictions(batch, conf), batch, cfg)
    # Zero error leaves -alpha * log(conf) in the confidence term (and in the gradient term if any).
    expected = -cfg.point.alpha * math.log(conf)
    assert losses["loss_reg_point"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_conf_point"].item() == pytest.approx(expected, abs=1e-6)
    assert losses["loss_grad_point"].item() == pytest.approx(expected if terms == 2 else 0.0, abs=1e-5)
    assert losses["loss_ego_pose"].item() == 0.0
    assert losses["objective"].item() == pytest.approx(cfg.point.weight * terms * expected, abs=1e-5)
    assert set(losses) == {
        "objective",
        "loss_conf_point",
        "loss_reg_point",
        "loss_grad_point",
        "loss_ego_pose",
        "loss_T",
        "loss_R",
    }


def test_known_error_gives_the_analytic_value():
    batch, conf = make_batch(), 3.0
    predictions = perfect_predictions(batch, conf)
    predictions["points"] = predictions["points"] + torch.tensor([0.03, 0.0, 0.04])  # 0.05 units everywhere
    losses = dvgt1_loss(predictions, batch, config(gradient_loss_fn=None))
    assert losses["loss_reg_point"].item() == pytest.approx(0.05, rel=1e-4)
    assert losses["loss_conf_point"].item() == pytest.approx(0.05 * conf - 0.2 * math.log(conf), rel=1e-4)


def test_point_loss_decreases_as_the_prediction_approaches_the_ground_truth():
    batch = make_batch()
    noise = torch.randn(batch["points_in_ego_first"].shape, generator=torch.Generator().manual_seed(1)) * 0.05
    objectives = []
    for factor in (1.0, 0.5, 0.25, 0.0):
        predictions = perfect_predictions(batch)
        predictions["points"] = predictions["points"] + factor * noise
        objectives.append(dvgt1_loss(predictions, batch, LossConfig())["objective"].item())
    assert objectives == sorted(objectives, reverse=True) and len(set(objectives)) == 4


def test_invalid_pixels_do_not_count():
    batch = make_batch()
    predictions = perfect_predictions(batch)
    predictions["points"] = predictions["points"] + 0.01 * torch.randn(predictions["points"].shape)
    for fn in ("normal", "grad"):
        before = dvgt1_loss(predictions, batch, config(gradient_loss_fn=fn))
        invalid = ~batch["point_masks"]
        changed_batch = dict(
            batch, points_in_ego_first=batch["points_in_ego_first"].masked_fill(invalid[..., None], math.nan)
        )
        changed_points = predictions["points"].masked_fill(invalid[..., None], 1e3).requires_grad_()
        changed_predictions = dict(
            predictions, points=changed_points, points_conf=predictions["points_conf"].masked_fill(invalid, 50.0)
        )
        after = dvgt1_loss(changed_predictions, changed_batch, config(gradient_loss_fn=fn))
        for key in before:
            assert after[key].item() == pytest.approx(before[key].item(), rel=1e-6, abs=1e-7), (fn, key)
        after["objective"].backward()  # NaN ground truth at invalid pixels must not leak into the gradient
        assert torch.isfinite(changed_points.grad).all()


def test_quantile_filter_drops_an_injected_outlier():
    values = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    with_outlier = torch.cat([values, torch.tensor([1e4])])
    kept = filter_by_quantile(with_outlier, 0.98)
    assert kept.max() < 1.0 and len(kept) >= 0.98 * len(values)
    assert filter_by_quantile(with_outlier, 0.0).max() == 1e4  # disabled
    assert len(filter_by_quantile(with_outlier[:1000], 0.98)) == 1000  # too few elements: untouched

    # Through the point loss: one wild pixel barely moves the filtered regression loss.
    batch = make_batch()
    predictions = perfect_predictions(batch)
    predictions["points"] = predictions["points"] + 0.01 * torch.randn(predictions["points"].shape)
    clean = dvgt1_loss(predictions, batch, LossConfig())["loss_reg_point"].item()
    b, t, v, y, x = batch["point_masks"].nonzero()[0]
    predictions["points"][b, t, v, y, x] += 1e3
    filtered = dvgt1_loss(predictions, batch, LossConfig())["loss_reg_point"].item()
    unfiltered = dvgt1_loss(predictions, batch, config(valid_range=-1.0))["loss_reg_point"].item()
    assert filtered == pytest.approx(clean, rel=1e-2)
    assert unfiltered > 10 * clean


def plane(h=12, w=12):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 5.0)], dim=-1)[None]  # [1,h,w,3]


def test_normal_loss_is_zero_for_identical_surfaces_and_positive_for_a_bent_one():
    flat, mask, conf = plane(), torch.ones(1, 12, 12, dtype=torch.bool), torch.ones(1, 12, 12)
    bent = flat.clone()
    bent[..., 2] += (flat[..., 0] - 6).abs()  # fold the plane along x = 6
    errors, _ = normal_errors(flat, flat, mask, conf)
    assert errors.numel() > 0 and errors.abs().max() < 1e-6
    assert multi_scale_gradient_loss(bent, flat, mask, conf, "normal", 1.0, 0.2) > 0.05
    shifted = bent + torch.tensor([3.0, -2.0, 7.0])
    assert multi_scale_gradient_loss(shifted, flat, mask, conf, "normal", 1.0, 0.2).item() == pytest.approx(
        multi_scale_gradient_loss(bent, flat, mask, conf, "normal", 1.0, 0.2).item(), rel=1e-5
    )


def test_pose_loss_ignores_frame_zero_and_weighs_iterations():
    gt = torch.zeros(2, 4, 7)
    gt[..., 6] = 1.0
    errors = [0.4, 0.2, 0.1]  # translation error of iterations 0, 1, 2 (x only)
    preds = [gt.clone() for _ in errors]
    for pred, e in zip(preds, errors):
        pred[:, 1:, 0] += e
        pred[:, 0] = torch.randn(7)  # frame 0 is never supervised
    losses = ego_pose_loss(preds, gt, gamma=0.6, loss_type="l1", weight_trans=2.0, weight_rot=1.0)
    # l1 averages over the 3 translation components, so each iteration contributes e / 3.
    expected = (0.6**2 * 0.4 + 0.6 * 0.2 + 1.0 * 0.1) / 3 / 3
    assert losses["loss_T"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_R"].item() == 0.0
    assert losses["loss_ego_pose"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    l2 = ego_pose_loss(preds, gt, gamma=0.6, loss_type="l2")
    assert l2["loss_T"].item() == pytest.approx(expected * 3, rel=1e-5)


def test_gradients_reach_points_confidence_and_every_pose_iteration():
    batch = make_batch()
    predictions = perfect_predictions(batch)
    predictions["points"] = (predictions["points"] + 0.02 * torch.randn(predictions["points"].shape)).requires_grad_()
    predictions["points_conf"].requires_grad_()
    iterations = [(p + 0.01 * torch.randn(p.shape)).requires_grad_() for p in predictions["absolute_ego_pose_enc_list"]]
    predictions["absolute_ego_pose_enc_list"] = iterations
    dvgt1_loss(predictions, batch, LossConfig())["objective"].backward()
    for tensor in [predictions["points"], predictions["points_conf"], *iterations]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_too_few_valid_pixels_give_a_zero_loss_that_keeps_the_graph():
    batch = make_batch()
    batch["point_masks"] = torch.zeros_like(batch["point_masks"])
    batch["point_masks"][0, 0, 0, :4, :4] = True  # 16 < 100 valid pixels
    predictions = perfect_predictions(batch)
    predictions["points"] = (predictions["points"] + 1.0).requires_grad_()
    losses = point_loss(
        predictions["points"], predictions["points_conf"], batch["points_in_ego_first"], batch["point_masks"]
    )
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert predictions["points"].grad is not None


def test_losses_are_float32_under_bfloat16_autocast():
    batch = make_batch()
    predictions = {
        k: v.bfloat16() if torch.is_tensor(v) else [p.bfloat16() for p in v]
        for k, v in perfect_predictions(batch).items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = dvgt1_loss(predictions, batch, LossConfig())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())

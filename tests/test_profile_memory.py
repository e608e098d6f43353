"""`dvgt profile-memory`: the fit and the per-profile table from injected measurements (no GPU
here), the one-line refusal on a machine without a GPU, and the per-GPU accounting of a device
map or pipeline split (on the meta device)."""

import json
import subprocess
import sys

import pytest

from dvgt.config import load_config
from dvgt.families import model_skeleton
from dvgt.k8s.catalog import Profile, load_catalog
from dvgt.train.profile_memory import (
    GIB,
    MemoryFit,
    fit_memory,
    max_images,
    profile_table,
    split_memory,
    split_table,
)


def test_fit_recovers_fixed_and_per_image_cost():
    fixed, per_image = 14.0 * GIB, 1.5 * GIB
    noise = [0.01 * GIB, -0.02 * GIB, 0.01 * GIB]
    peaks = [(n, fixed + per_image * n + e) for n, e in zip((12, 24, 48), noise)]
    fit = fit_memory(peaks)
    assert fit.fixed_bytes == pytest.approx(fixed, rel=0.01)
    assert fit.per_image_bytes == pytest.approx(per_image, rel=0.01)


def test_largest_images_per_forward_keeps_the_margin():
    fit = MemoryFit(fixed_bytes=10 * GIB, per_image_bytes=2 * GIB)
    assert max_images(fit, 80 * GIB, margin=0.0) == 35  # (80 - 10) / 2
    assert max_images(fit, 80 * GIB, margin=0.1) == 31  # (72 - 10) / 2 = 31
    assert max_images(fit, 8 * GIB, margin=0.1) == 0  # the fixed part alone does not fit


def test_table_has_one_line_per_gpu_profile():
    fit = MemoryFit(fixed_bytes=10 * GIB, per_image_bytes=2 * GIB)
    profiles = {"big": Profile("big", 24, True, [], 80), "cpu": Profile("cpu", 8, False, [], None)}
    lines = profile_table(fit, profiles, margin=0.1)
    assert lines[0].startswith("fixed 10.00 GiB + 2.000 GiB per image")
    assert len(lines) == 3 and lines[2].split() == ["big", "80", "GiB", "24", "31"]
    catalog = load_catalog().profiles  # every GPU profile of the chart has its memory
    assert all(p.memory_gib for p in catalog.values() if p.gpu)
    assert len(profile_table(fit, catalog, 0.1)) == 2 + sum(p.gpu for p in catalog.values())


def test_a_fit_needs_two_image_counts():
    with pytest.raises(ValueError, match="two or more image counts"):
        fit_memory([(12, 5 * GIB), (12, 5 * GIB)])


def test_without_a_gpu_it_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "dvgt", "profile-memory", "--config=train/dvgt1/demo.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: dvgt profile-memory measures GPU memory and needs a CUDA GPU; none is visible here"
    )


def test_measurement_record_keeps_the_card_the_peaks_and_the_measured_profiles():
    """What `dvgt profile-memory --out` writes (docs/distributed.md, "Calibrating the VRAM profiles"), from
    injected peaks and versions (no GPU here)."""
    from dvgt.config import load_config
    from dvgt.train.profile_memory import measurement_record

    cfg = load_config("train/dvgt1/default.yaml")
    environment = {"card": "NVIDIA H100 80GB HBM3", "driver": "570.86", "cuda": "12.8", "torch": "2.13.0"}
    peaks = [(12, 30.5 * GIB), (24, 42.5 * GIB), (48, 66.5 * GIB)]  # 18.5 GiB + 1 GiB per image
    profiles = {"h100-80g": Profile("h100-80g", 24, True, [], 80), "cpu-test": Profile("cpu-test", 8, False, [], None)}
    record = measurement_record(cfg, peaks, 0.1, profiles, environment)
    assert json.loads(json.dumps(record)) == record  # plain JSON
    assert record["card"] == "NVIDIA H100 80GB HBM3" and record["torch"] == "2.13.0"
    assert (record["model"], record["activation_checkpointing"]) == ("dvgt1", "full")
    assert record["views"] == 8  # the config's largest view count
    assert record["peaks"][2] == {"images": 48, "peak_bytes": int(66.5 * GIB)}
    assert record["fixed_bytes"] == pytest.approx(18.5 * GIB) and record["per_image_bytes"] == pytest.approx(GIB)
    assert record["profiles"] == {  # (72 - 18.5) / 1: 53 images fit below 90% of 80 GiB
        "h100-80g": {"memory_gib": 80, "catalog_max_images_per_forward": 24, "measured_max_images_per_forward": 53}
    }


def split_config(*overrides):
    return load_config("train/dvgt1/demo.yaml", ["model.size=tiny", "data.train.img_width=64", *overrides])


def test_per_gpu_memory_of_a_device_map_is_accounted_on_the_meta_device():
    """Every parameter byte lands on exactly one GPU of the map; frozen parameters have no gradient
    or AdamW state; both GPUs hold saved activations (the heads' at full resolution dominate)."""
    cfg = split_config(
        "model.device_map={backbone: 0, aggregator: 0, ego_pose_head: 1, point_head: 1}",
        "optim.frozen_module_names=[aggregator.patch_embed.*]",
    )
    what, groups = split_memory(cfg, frames=2)
    assert "model.device_map" in what and "2 frames x 3 views at 64x32" in what
    model = model_skeleton(cfg.model)
    assert sum(g.parameters for g in groups) == sum(p.numel() * 4 for p in model.parameters())
    frozen = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("aggregator.patch_embed."))
    gpu0, gpu1 = groups
    assert (gpu0.parts, gpu1.parts) == (["backbone", "aggregator"], ["ego_pose_head", "point_head"])
    assert gpu0.gradients == gpu0.parameters - frozen and gpu0.optimizer == 2 * gpu0.gradients
    assert gpu1.gradients == gpu1.parameters and 0 < gpu0.activations < gpu1.activations
    lines = split_table(what, groups)
    assert lines[2].startswith("GPU 0") and lines[3].endswith("ego_pose_head, point_head")


def test_pipeline_stages_hold_the_activations_of_the_micro_batches_in_flight():
    """4 micro-batches on 2 stages: GPipe keeps all 4 in flight on every stage, 1F1B at most 2 on
    stage 0 and 1 on the last; the parameters split as the trainer's split does."""
    gpipe = split_memory(
        split_config(
            "distributed.pipeline.stages=2",
            "limit_val_batches=0",
            "accum_steps=4",
            "distributed.pipeline.schedule=gpipe",
        )
    )[1]
    one_f_one_b = split_memory(split_config("distributed.pipeline.stages=2", "limit_val_batches=0", "accum_steps=4"))[1]
    assert [g.activations for g in gpipe] == [2 * one_f_one_b[0].activations, 4 * one_f_one_b[1].activations]
    assert [g.parameters for g in gpipe] == [g.parameters for g in one_f_one_b]
    assert gpipe[0].parts == ["aggregator.embed .. aggregator.3"] and gpipe[1].parts == ["heads .. heads"]

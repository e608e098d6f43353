"""`dvgt profile-memory`: how many images one GPU holds in a forward/backward pass.

On the current GPU, one training step (forward, backward, optimizer step, with the config's AMP,
activation checkpointing and frozen modules) runs at a few images-per-forward values; each step's
peak (torch.cuda.max_memory_allocated) is fitted as fixed + per_image x images (the fixed part:
weights, gradients, optimizer state; the per-image part: activations). For every GPU profile of
the chart's catalog the largest images-per-forward that stays below (1 - margin) of its memory is
printed: the value for the profile's maxImagesPerForward. Single-GPU (DDP-style) memory: under
FSDP the fixed part shrinks with the number of ranks. `--out FILE.json` also writes the measurements
with the card, driver and torch version (`measurement_record`), for docs/distributed.md's calibration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dvgt.k8s.catalog import Profile

GIB = 1024**3


@dataclass(frozen=True)
class MemoryFit:
    fixed_bytes: float  # weights, gradients, optimizer state, workspace
    per_image_bytes: float  # activations per image in the forward pass


def fit_memory(peaks: Sequence[tuple[int, int]]) -> MemoryFit:
    """Least-squares line through (images per forward, peak bytes); needs two distinct image counts."""
    images = np.array([n for n, _ in peaks], dtype=float)
    if len(set(images)) < 2:
        raise ValueError(f"a memory fit needs peaks at two or more image counts, got {sorted(set(images))}")
    per_image, fixed = np.polyfit(images, np.array([p for _, p in peaks], dtype=float), 1)
    if per_image <= 0:
        raise ValueError(f"peak memory did not grow with the image count ({peaks}); measure larger counts")
    return MemoryFit(float(fixed), float(per_image))


def max_images(fit: MemoryFit, memory_bytes: float, margin: float) -> int:
    """The largest image count whose predicted peak stays below (1 - margin) x memory (0: none fits)."""
    return max(0, math.floor(((1.0 - margin) * memory_bytes - fit.fixed_bytes) / fit.per_image_bytes))


def profile_table(fit: MemoryFit, profiles: Mapping[str, Profile], margin: float) -> list[str]:
    """One line per GPU profile of the catalog (dvgt.k8s.catalog.Profile): its memory, the current
    maxImagesPerForward and the measured largest images per forward."""
    lines = [
        f"fixed {fit.fixed_bytes / GIB:.2f} GiB + {fit.per_image_bytes / GIB:.3f} GiB per image "
        f"(safety margin {margin:.0%})",
        f"{'profile':<12} {'memory':>8} {'catalog':>8} {'measured':>9}",
    ]
    for name, profile in profiles.items():
        if profile.memory_gib:
            fits = max_images(fit, profile.memory_gib * GIB, margin)
            lines.append(f"{name:<12} {profile.memory_gib:>5g} GiB {profile.max_images_per_forward:>8} {fits:>9}")
    return lines


def step_shape(cfg, patch_size: int) -> tuple[int, int, int]:
    """(views, height, width) of the measured steps: the config's largest view count, its width and
    narrowest aspect ratio (the tallest images)."""
    split = cfg.data.train
    width = int(split.img_width)
    return int(split.views[1]), int(width / split.aspect_ratio[0]) // patch_size * patch_size, width


def measurement_record(
    cfg: Any,
    peaks: Sequence[tuple[int, int]],
    margin: float,
    profiles: Mapping[str, Profile],
    environment: dict[str, str],
) -> dict:
    """What a calibration keeps (JSON): the card and software, the config and shape, each step's peak,
    the fit and, per GPU profile, the catalog's maxImagesPerForward next to the measured largest."""
    fit = fit_memory(peaks)
    return {
        **environment,
        "model": cfg.model.name,
        "size": cfg.model.size,
        "activation_checkpointing": cfg.model.activation_checkpointing,
        "amp_dtype": cfg.optim.amp.amp_dtype if cfg.optim.amp.enabled else "float32",
        "frozen_module_names": list(cfg.optim.frozen_module_names),
        "views": int(cfg.data.train.views[1]),
        "img_width": int(cfg.data.train.img_width),
        "aspect_ratio": float(cfg.data.train.aspect_ratio[0]),
        "peaks": [{"images": images, "peak_bytes": int(peak)} for images, peak in peaks],
        "fixed_bytes": fit.fixed_bytes,
        "per_image_bytes": fit.per_image_bytes,
        "margin": margin,
        "profiles": {
            name: {
                "memory_gib": profile.memory_gib,
                "catalog_max_images_per_forward": profile.max_images_per_forward,
                "measured_max_images_per_forward": max_images(fit, profile.memory_gib * GIB, margin),
            }
            for name, profile in profiles.items()
            if profile.memory_gib
        },
    }


def gpu_environment() -> dict[str, str]:
    """The card, driver, CUDA and torch versions a measurement was taken with."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    return {
        "card": torch.cuda.get_device_name(),
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
    }


def measure_peaks(cfg, frame_counts: Sequence[int] = (2, 4, 8)) -> list[tuple[int, int]]:
    """(images per forward, peak bytes) of one training step at each frame count, with the config's
    largest view count, width and narrowest aspect ratio; stops at the first out-of-memory."""
    import torch

    from dvgt.families import build_model, get
    from dvgt.train.optim import build_optimizer, freeze_modules

    device = torch.device("cuda")
    model: Any = build_model(cfg.model).to(device).train()  # (its patch_size is read below)
    freeze_modules(model, cfg.optim.frozen_module_names)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, fused=True)
    views, height, width = step_shape(cfg, model.patch_size)
    peaks = []
    for frames in [f for f in frame_counts if f <= cfg.model.max_frames]:
        images = torch.rand(1, frames, views, 3, height, width, device=device)
        ego_status = torch.zeros(1, frames, len(get(cfg.model.name).ego_status_fields), device=device)
        inputs = {"ego_status": ego_status} if cfg.model.enable_ego_status else {}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.autocast("cuda", dtype=getattr(torch, cfg.optim.amp.amp_dtype), enabled=cfg.optim.amp.enabled):
                outputs = model(images, **inputs)
            loss = torch.stack(
                [v.float().mean() for v in outputs.values() if torch.is_tensor(v) and v.requires_grad]
            ).sum()
            loss.backward()
            optimizer.step()  # the first step allocates the optimizer state: part of every later peak
            optimizer.zero_grad(set_to_none=True)
        except torch.cuda.OutOfMemoryError:
            break
        peaks.append((frames * views, torch.cuda.max_memory_allocated()))
        del images, outputs, loss
    return peaks


def profile_memory(cfg, margin: float, out: str | None = None) -> list[str]:
    import torch

    from dvgt.k8s.catalog import load_catalog

    if not torch.cuda.is_available():
        raise RuntimeError("dvgt profile-memory measures GPU memory and needs a CUDA GPU; none is visible here")
    peaks = measure_peaks(cfg)
    name = torch.cuda.get_device_name()
    lines = [
        f"{cfg.model.name} ({cfg.model.size}) on {name}: "
        + ", ".join(f"{n} images -> {p / GIB:.2f} GiB" for n, p in peaks)
    ]
    profiles = load_catalog().profiles
    if out:
        record = measurement_record(cfg, peaks, margin, profiles, gpu_environment())
        with open(out, "w") as file:
            json.dump(record, file, indent=2)
        lines.append(f"measurements written to {out}")
    return lines + profile_table(fit_memory(peaks), profiles, margin)

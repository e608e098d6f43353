"""`dvgt profile-memory`: how many images one GPU holds in a forward/backward pass.

On the current GPU, one training step (forward, backward, optimizer step, with the config's AMP,
activation checkpointing and frozen modules) runs at a few images-per-forward values; each step's
peak (torch.cuda.max_memory_allocated) is fitted as fixed + per_image x images (the fixed part:
weights, gradients, optimizer state; the per-image part: activations). For every GPU profile of
the chart's catalog the largest images-per-forward that stays below (1 - margin) of its memory is
printed: the value for the profile's maxImagesPerForward. Single-GPU (DDP-style) memory: under
FSDP the fixed part shrinks with the number of ranks. `--out FILE.json` also writes the measurements
with the card, driver and torch version (`measurement_record`), for docs/distributed.md's calibration.

With a model.device_map or distributed.pipeline.stages > 1 in the config it reports each GPU's
share instead (`split_memory`), by accounting on the meta device (no memory, no GPU, any model
size): parameters, gradients and AdamW state of the parts or stages each GPU holds, plus the
activations autograd saves between forward and backward, each attributed to the part or stage
whose module was running when it was saved, for one forward pass of one clip (attention counted
as a fused kernel keeps it: q, k, v and the output, not the attention matrix). A pipeline stage
holds the activations of the micro-batches in flight: all accum_steps of them under GPipe, at most
stages - s under 1F1B. Not counted: transient buffers (attention scores, the recomputation of
checkpointed blocks in backward, communication buffers), so leave a margin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

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


def profile_memory(cfg: Any, margin: float, out: str | None = None, frames: int = 2) -> list[str]:

    from dvgt.k8s.catalog import load_catalog

    if cfg.model.device_map or cfg.distributed.pipeline.stages > 1:  # per GPU of the split, no GPU needed
        return split_table(*split_memory(cfg, frames))

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


@dataclass
class GroupMemory:
    """What one GPU of a device map or one pipeline stage holds, in bytes."""

    name: str  # "GPU 0" or "stage 0"
    parts: list[str] = field(default_factory=list)  # its parts or units
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0  # AdamW: two float32 moments per trainable parameter
    activations: int = 0  # saved for backward, over the micro-batches it holds at once

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def split_memory(cfg, frames: int = 2) -> tuple[str, list[GroupMemory]]:
    """(what was measured, one entry per GPU of the device map or per pipeline stage), by accounting
    on the meta device for one clip of `frames` frames with the config's largest view count, width
    and narrowest aspect ratio per forward pass (see the module docstring)."""

    from dvgt.families import get, model_skeleton
    from dvgt.train.device_map import part_of_parameters
    from dvgt.train.optim import freeze_modules
    from dvgt.train.pipeline import split_model

    model: Any = model_skeleton(cfg.model).train()  # its parts are read by name
    freeze_modules(model, cfg.optim.frozen_module_names)
    stages = cfg.distributed.pipeline.stages
    if cfg.model.device_map:
        device_map = dict(cfg.model.device_map)
        parts = model.device_map_parts()
        owner = {name: f"GPU {device_map[part]}" for name, part in part_of_parameters(model, parts).items()}
        groups = {f"GPU {i}": GroupMemory(f"GPU {i}") for i in sorted(set(device_map.values()))}
        for part, index in device_map.items():
            groups[f"GPU {index}"].parts.append(part)
        modules = {path: f"GPU {device_map[part]}" for part, path in parts.items()}
        in_flight = {name: 1 for name in groups}
        kind = "model.device_map"
    elif stages > 1:
        inputs = ("images", "ego_status") if cfg.model.enable_ego_status else ("images",)
        split = split_model(model, stages, inputs)
        groups, owner, modules, in_flight = {}, {}, {}, {}
        micro = cfg.accum_steps
        for s in range(stages):
            group = groups[f"stage {s}"] = GroupMemory(f"stage {s}")
            units = split.stage_units(s)
            group.parts = [f"{units[0].name} .. {units[-1].name}"]
            for unit in units:
                for name, _ in model.named_parameters():
                    if any(name == p or name.startswith(p + ".") for p in unit.owns):
                        owner[name] = group.name
                modules.update({path: group.name for path in unit.owns if _is_module(model, path)})
            gpipe = cfg.distributed.pipeline.schedule == "gpipe" or micro < stages
            in_flight[group.name] = micro if gpipe else min(micro, stages - s)
        kind = (
            f"distributed.pipeline.stages={stages}, schedule {cfg.distributed.pipeline.schedule}, "
            f"{cfg.accum_steps} micro-batch(es) per step"
        )
    else:
        raise ValueError("split_memory needs model.device_map or distributed.pipeline.stages > 1 in the config")
    for name, param in model.named_parameters():
        group = groups[owner[name]]
        size = param.numel() * param.element_size()
        group.parameters += size
        if param.requires_grad:
            group.gradients += size
            group.optimizer += 2 * param.numel() * 4

    # Saved activations, attributed to the group whose module runs (the stack gives nested parts back
    # their enclosing part; code between parts counts for the group that ran last, the first at start).
    active = [next(iter(groups))]

    def enter(name: str):
        return lambda module, args: active.append(name)  # (returns None: the inputs stay)

    def leave(module, args, output) -> None:
        active.pop()

    for path, name in modules.items():
        module = model.get_submodule(path)
        module.register_forward_pre_hook(enter(name))
        if cfg.model.device_map:
            module.register_forward_hook(leave)

    def pack(tensor):
        groups[active[-1]].activations += tensor.numel() * tensor.element_size() * in_flight[active[-1]]
        return tensor

    split_cfg = cfg.data.train
    views, width = int(split_cfg.views[1]), int(split_cfg.img_width)
    height = int(width / split_cfg.aspect_ratio[0]) // model.patch_size * model.patch_size
    images = torch.rand(1, frames, views, 3, height, width, device="meta")
    ego_status = torch.zeros(1, frames, len(get(cfg.model.name).ego_status_fields), device="meta")
    model_inputs = {"ego_status": ego_status} if cfg.model.enable_ego_status else {}
    # The forward alone: what it saves is the activation memory; gradients and AdamW state are counted
    # from the parameters above (and a backward would recompute checkpointed blocks outside the mode).
    with FlashAttentionAccounting(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images, **model_inputs)
    what = (
        f"{cfg.model.name} ({cfg.model.size}), {kind}; one clip of {frames} frames x {views} views at "
        f"{width}x{height} per forward pass; accounted on the meta device"
    )
    return what, list(groups.values())


class FlashAttentionAccounting(TorchFunctionMode):
    """F.scaled_dot_product_attention saving what a fused (flash) kernel saves: q, k, v, the output and
    one log-sum-exp per query. On the meta device SDPA falls back to the math kernel, which would
    count the N x N attention matrices that no GPU kernel keeps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FlashLikeAttention.apply(*args[:3])
        return func(*args, **(kwargs or {}))


class _FlashLikeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("memory accounting runs the forward only")


def _is_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def split_table(what: str, groups: Sequence[GroupMemory]) -> list[str]:
    lines = [
        what,
        f"{'':<8} {'parameters':>11} {'gradients':>11} {'AdamW':>11} {'activations':>11} {'total':>11}  holds",
    ]
    for g in groups:
        sizes = (g.parameters, g.gradients, g.optimizer, g.activations, g.total)
        lines.append(f"{g.name:<8} " + " ".join(f"{_size(n):>11}" for n in sizes) + f"  {', '.join(g.parts)}")
    return lines

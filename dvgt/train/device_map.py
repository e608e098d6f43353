"""`model.device_map`: one model replica spread over several GPUs of its process.

The map names each of the model's top-level parts (the model declares them: `device_map_parts()`,
part -> submodule path) with a local GPU index 0..k-1; the process then owns k GPUs, local rank r
the GPUs r*k .. r*k+k-1 (so torchrun starts GPUs-per-node / k processes per node). Each part's
parameters live on its GPU; activations move at part boundaries: a forward pre-hook moves a part's
inputs to its GPU and a forward hook moves its outputs back to the GPU of the part that called it
(the enclosing part, or the process's first GPU for the model's top-level parts). So the model's
inputs and outputs stay on the first GPU, the loss runs there, and DDP wraps the whole multi-device
module (device_ids=None). Parameter names are unchanged: checkpoints are the same files with or
without a map.

On the CPU (device=cpu, the tests) every index resolves to the CPU: the same hooks run, nothing moves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class DeviceMapError(ValueError):
    """model.device_map does not fit the model or the GPUs of this process."""


def gpus_per_process(device_map: Mapping[str, int] | None) -> int:
    """k: the GPUs one process owns under this map (1 without a map)."""
    return max(device_map.values()) + 1 if device_map else 1


def resolve(
    device_map: Mapping[str, Any], parts: Mapping[str, str], first: torch.device, visible: int | None
) -> dict[str, torch.device]:
    """Part -> device, checked before anything is allocated. `first`: the process's first device
    (cuda:local_rank*k, or cpu); `visible`: the GPUs this node shows (None on the CPU: no limit)."""
    placed = ", ".join(f"{name}: <GPU>" for name in parts)
    unknown = sorted(set(device_map) - set(parts))
    if unknown:
        raise DeviceMapError(
            f"model.device_map names unknown part(s) {', '.join(unknown)}; this model's parts are "
            f"{', '.join(parts)}: model.device_map={{{placed}}}"
        )
    unplaced = [name for name in parts if name not in device_map]
    if unplaced:
        raise DeviceMapError(
            f"model.device_map leaves part(s) {', '.join(unplaced)} unplaced; give every part a local GPU "
            f"index: model.device_map={{{placed}}}"
        )
    bad = {name: index for name, index in device_map.items() if not isinstance(index, int) or index < 0}
    if bad:
        raise DeviceMapError(f"model.device_map: GPU indices must be integers >= 0, got {bad}")
    k = gpus_per_process(device_map)
    unused = sorted(set(range(k)) - set(device_map.values()))
    if unused:
        raise DeviceMapError(
            f"model.device_map uses GPU indices up to {k - 1} but not {unused}: the process would own GPUs it "
            f"never uses; number the GPUs 0..{len(set(device_map.values())) - 1}"
        )
    if first.type == "cpu":
        return {name: first for name in parts}
    last = first.index + k - 1
    if visible is not None and last >= visible:
        raise DeviceMapError(
            f"model.device_map needs {k} GPUs per process: this process (first GPU {first.index}) would use "
            f"GPUs {first.index}..{last}, but the node shows {visible}; start {max(1, visible // k)} process(es) "
            f"per node (torchrun --nproc_per_node={max(1, visible // k)}) or use fewer GPU indices"
        )
    return {name: torch.device(first.type, first.index + index) for name, index in device_map.items()}


def moved(value: Any, device: torch.device) -> Any:
    """Tensors in value (nested in tuples, lists and dicts) on `device`."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def place(model: nn.Module, parts: Mapping[str, str], devices: Mapping[str, torch.device], first: torch.device) -> None:
    """Move every part to its device (outer parts first, so nested parts end on their own) and hook
    the moves of activations at the part boundaries."""
    model.to(first)
    by_depth = sorted(parts, key=lambda name: parts[name].count("."))
    for name in by_depth:
        model.get_submodule(parts[name]).to(devices[name])
    for name, path in parts.items():
        enclosing = [p for p in parts if path.startswith(parts[p] + ".")]
        caller = devices[max(enclosing, key=lambda p: len(parts[p]))] if enclosing else first
        module = model.get_submodule(path)
        module.register_forward_pre_hook(_inputs_to(devices[name]), with_kwargs=True)
        module.register_forward_hook(_outputs_to(caller))


def _inputs_to(device: torch.device):
    def hook(module, args, kwargs):
        return moved(args, device), moved(kwargs, device)

    return hook


def _outputs_to(device: torch.device):
    def hook(module, args, output):
        return moved(output, device)

    return hook


def check(model_cfg, device: str) -> None:
    """Refuse a bad model.device_map from the config alone, before anything is allocated (the model is
    built on the meta device for its part names)."""
    from dvgt.families import model_parts

    requested = dict(model_cfg.device_map)
    on_gpu = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first = torch.device("cuda", local_rank * gpus_per_process(requested)) if on_gpu else torch.device("cpu")
    resolve(requested, model_parts(model_cfg), first, torch.cuda.device_count() if on_gpu else None)


def apply_device_map(model: Any, device_map: Mapping[str, Any], first: torch.device) -> dict[str, torch.device]:
    """Check the map against the model and this process's GPUs, then place the model; returns part -> device."""
    parts = model.device_map_parts()
    visible = torch.cuda.device_count() if first.type == "cuda" else None
    devices = resolve(dict(device_map), parts, first, visible)
    place(model, parts, devices, first)
    return devices


def describe(model: Any, device_map: Mapping[str, int], devices: Mapping[str, torch.device]) -> str:
    """One line per local GPU index: its device, parts and parameter count (the start-up report)."""
    owner = part_of_parameters(model, model.device_map_parts())
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        counts[owner[name]] = counts.get(owner[name], 0) + param.numel()
    lines = []
    for index in sorted(set(device_map.values())):
        names = [name for name in device_map if device_map[name] == index]
        total = sum(counts.get(name, 0) for name in names)
        lines.append(f"  GPU {index} ({devices[names[0]]}): {', '.join(names)} ({total / 1e6:.2f} M parameters)")
    return "\n".join(lines)


def part_of_parameters(model: nn.Module, parts: Mapping[str, str]) -> dict[str, str]:
    """Parameter name -> the innermost part holding it ("" for none)."""
    owner = {}
    for name, _ in model.named_parameters():
        holding = [p for p, path in parts.items() if name.startswith(path + ".")]
        owner[name] = max(holding, key=lambda p: len(parts[p])) if holding else ""
    return owner

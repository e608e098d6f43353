"""Deterministic test weights (rule `refweights-v1` of the reference fixtures) and the weights digest.

Every parameter is drawn from a generator seeded by `seed + crc32(key)`, with its full shape, then
scaled by its group (all arithmetic in float32, one rounding per operation):
  a) 1-D `*.weight` (LayerNorm scales):        1 + 0.1 z
  b) >=2-D `*.weight` (Linear / conv kernels): z * float32(1 / sqrt(prod(shape[1:])))
  c) other >=2-D entries (learned tokens):      z
  d) everything else (biases, LayerScale):      0.1 z
Persistent buffers (DINOv3 RoPE periods, qkv bias masks, DVGT-2's anchor ranges) keep the values the
constructor gives them, except DVGT-2's normalised k-means anchors, which come from files that are not
published: their stand-in is u * 2 - 1 scaled by 0.9f, u = torch.rand(shape) from the same per-key
generator (uniform in [-0.9, 0.9)).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from .layers import reset_buffers

RULE = "refweights-v1"
STAND_IN_BUFFERS = ("norm_traj_anchor", "norm_pose_translation_anchor")  # buffer names (last key part) with a stand-in


def rule_group(key: str, shape: Sequence[int]) -> str:
    """The rule's group (a, b, c or d) of the parameter `key` with `shape`."""
    if key.rsplit(".", 1)[-1] == "weight":
        return "a" if len(shape) == 1 else "b"
    return "c" if len(shape) >= 2 else "d"


def _is_stand_in(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in STAND_IN_BUFFERS


def _fill_reference_(out: Tensor, key: str, seed: int) -> Tensor:
    """Overwrite the float32 CPU tensor `out` with the rule's value for `key` (a parameter or a stand-in buffer)."""
    generator = torch.Generator("cpu").manual_seed(seed + zlib.crc32(key.encode("utf-8")))
    if _is_stand_in(key):
        torch.rand(out.shape, generator=generator, dtype=torch.float32, out=out)
        return out.mul_(2.0).sub_(1.0).mul_(0.9)
    torch.randn(out.shape, generator=generator, dtype=torch.float32, out=out)
    group = rule_group(key, out.shape)
    if group == "a":
        out.mul_(0.1).add_(1.0)
    elif group == "b":
        out.mul_(float(np.float32(1.0 / math.sqrt(math.prod(out.shape[1:])))))
    elif group == "d":
        out.mul_(0.1)
    return out


def reference_tensor(key: str, shape: Sequence[int], seed: int = 1234) -> Tensor:
    """The rule's value of the parameter `key` with `shape`."""
    return _fill_reference_(torch.empty(tuple(shape), dtype=torch.float32), key, seed)


def reference_state_dict(
    layout_or_model: nn.Module | Mapping, seed: int = 1234, buffers: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """A new state_dict holding the reference weights.

    `layout_or_model` is a model (its persistent buffers are copied) or a layout such as
    `model_layout(...)` or the reference JSON: {"state_dict": {key: [shape, dtype]}} or {key: [shape, dtype]}.
    A layout does not say which entries are buffers: pass their values as `buffers`.
    For the full model this is 7 GB; `fill_reference_weights` fills a model in place instead.
    """
    if isinstance(layout_or_model, nn.Module):
        params = dict(layout_or_model.named_parameters())
        return {
            key: reference_tensor(key, value.shape, seed)
            if key in params or _is_stand_in(key)
            else value.detach().cpu().clone()
            for key, value in layout_or_model.state_dict().items()
        }
    layout = layout_or_model.get("state_dict", layout_or_model)
    buffers = buffers or {}
    return {
        key: buffers[key].clone() if key in buffers else reference_tensor(key, shape, seed)
        for key, (shape, _dtype) in layout.items()
    }


@torch.no_grad()
def fill_reference_weights(model: nn.Module, seed: int = 1234, workers: int | None = None) -> nn.Module:
    """Overwrite `model`'s parameters (float32, CPU) with the reference weights, in place, recompute its buffers
    and set the stand-in buffers.

    Works on a model made with `to_empty(device="cpu")` from a meta build. Keys are drawn in
    parallel threads (each key has its own generator, so the result does not depend on the order).
    """
    params = list(model.named_parameters())
    for key, param in params:
        if param.dtype != torch.float32 or param.device.type != "cpu":
            raise ValueError(f"reference weights need float32 CPU parameters; {key} is {param.dtype} on {param.device}")
    with ThreadPoolExecutor(max_workers=workers or torch.get_num_threads()) as pool:
        list(pool.map(lambda item: _fill_reference_(item[1].data, item[0], seed), params))
    reset_buffers(model)
    for key, buffer in model.named_buffers():
        if _is_stand_in(key):
            _fill_reference_(buffer, key, seed)
    return model


def weights_digest(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 over the entries sorted by key: key (UTF-8), 0, shape "d0,d1,...", 0, float32 little-endian values."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode("utf-8") + b"\0" + ",".join(map(str, tensor.shape)).encode("ascii") + b"\0")
        digest.update(tensor.numpy().astype("<f4", copy=False).data)
    return digest.hexdigest()

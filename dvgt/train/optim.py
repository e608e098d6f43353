"""Frozen modules, AdamW and the per-iteration learning-rate schedule (linear warm-up, then cosine)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import nn


def freeze_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches any fnmatch glob; return their names.

    A glob that matches nothing is an error: a typo would otherwise silently train what the user
    meant to freeze.
    """
    patterns = list(patterns)
    frozen = []
    for pattern in patterns:
        matched = [name for name, _ in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"optim.frozen_module_names: glob '{pattern}' matches no parameter "
                f"(parameter names look like 'aggregator.patch_embed.blocks.0.attn.qkv.weight')"
            )
        frozen += matched
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(set(frozen))


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay for matrices and kernels; none for norms, biases, LayerScale and learned tokens."""
    return param.ndim >= 2 and not any(part in name for part in ("token", "pos_embed"))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, fused: bool = False) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("every parameter is frozen (optim.frozen_module_names): there is nothing to train")
    groups = [
        {"params": [p for n, p in trainable if _decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if not _decays(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float, lr: float, min_lr: float) -> float:
    """Learning rate at an optimizer step: min_lr -> lr linearly, then cosine back to min_lr."""
    warmup = max(1, round(total_steps * warmup_fraction))
    if step < warmup:
        return min_lr + (lr - min_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate is a pure function of the optimizer step, so resuming needs no scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = lr

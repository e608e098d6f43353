"""Activation checkpointing of the aggregator's blocks (`model.activation_checkpointing`).

    none         keep every activation (fastest, most memory)
    full         recompute each block in backward from its input (least memory; about one more forward)
    selective    keep the outputs of the matmuls and attention of each block, recompute the rest
                 (norms, GELU, RoPE, residual adds): most of the saving of `none`'s speed at a fraction
                 of its memory (torch.utils.checkpoint.create_selective_checkpoint_contexts)
    every_other  recompute every other block (the 1st, 3rd, ... block call of a forward pass), keep the rest

Checkpointing applies in train mode only. Gradients are those of `none` in every mode
(tests/test_models.py checks it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective", "every_other")

_aten = torch.ops.aten
# The ops whose outputs `selective` keeps: matmuls (nn.Linear lowers to mm / addmm / bmm) and attention.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"model.activation_checkpointing '{mode}' is not one of {', '.join(MODES)}")
    return mode


def run_block(block: nn.Module, x: Tensor, pos: Tensor, mode: str, index: int, **kwargs) -> Tensor:
    """block(x, pos, **kwargs) under activation checkpointing `mode` (one of MODES); `index`: the block's
    call number in this forward pass (every_other checkpoints the even ones)."""
    if mode == "none" or (mode == "every_other" and index % 2):
        return block(x, pos=pos, **kwargs)
    if mode == "selective":
        return checkpoint(block, x, pos, use_reentrant=False, context_fn=_selective_context, **kwargs)
    return checkpoint(block, x, pos, use_reentrant=False, **kwargs)

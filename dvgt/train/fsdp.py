"""FSDP2 (`torch.distributed.fsdp.fully_shard`): ZeRO-2/3 sharding of a model across the ranks.

Every transformer block (the DINO backbone's, the aggregator's, the heads' trunks) becomes one
FSDP unit, and the root module takes what is left (embeddings, tokens, the DPT head). After
sharding, every parameter is a DTensor holding this rank's 1/world_size slice along dim 0;
gradients arrive as DTensor slices too (reduce-scatter instead of DDP's all-reduce), so the
optimizer built afterwards keeps state only for the local slices.

- zero2 (`reshard_after_forward=False`): a block's parameters are gathered in forward and kept
  until its backward is done: one gather per step, optimizer state and gradients sharded.
- zero3 (`reshard_after_forward=True`): they are freed after forward and gathered again in
  backward: parameters are sharded too, at the cost of a second gather.
Frozen parameters may share a unit with trainable ones (FSDP2 reduces only what has a gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dvgt.models.layers import Block, CrossAttentionBlock

BLOCK_TYPES = (Block, CrossAttentionBlock)  # one FSDP unit each
AUTOCAST_PREFIX = "aggregator."  # the part of every model that runs under autocast (the heads run in float32)


def shard_model(model: nn.Module, mesh: DeviceMesh, cfg, amp_dtype: torch.dtype | None) -> nn.Module:
    """fully_shard every block, then the root, in place (cfg: distributed.fsdp). `amp_dtype`: the
    autocast dtype when AMP is on, else None."""
    reshard = cfg.reshard_after_forward if cfg.reshard_after_forward is not None else cfg.mode == "zero3"
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    # Aggregator blocks gather their parameters in the AMP dtype (half the traffic and memory) and
    # reduce gradients in float32. Their inputs are not cast: the residual stream stays float32,
    # as under plain autocast.
    low = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    full = MixedPrecisionPolicy()
    for name, module in model.named_modules():
        if isinstance(module, BLOCK_TYPES):
            policy = low if amp_dtype is not None and cfg.mixed_precision and name.startswith(AUTOCAST_PREFIX) else full
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload)
    # The root's parameters are needed again right at the start of backward: never resharded.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=full, offload_policy=offload)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate local gradients without reduce-scatter (micro-steps before the last one)."""
    sharded = cast(FSDPModule, model)  # (fully_shard made it one)
    sharded.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        sharded.set_requires_gradient_sync(True)

"""The trainer's faster paths, each behind a config key (docs/distributed.md, "Faster paths"):

- `model.compile_blocks`: regional torch.compile. Every transformer block (`layers.Block`: the DINO
  backbone's, the aggregator's and the head trunks') is compiled on its own, as torchtitan does: the
  blocks share one code object, so a handful of graphs (one per sequence shape) serve all of them, and
  compilation takes seconds instead of the minutes of a whole-model graph. `nn.Module.compile` keeps the
  parameter names, so checkpoints are unchanged.
- `model.attention_backend`: which scaled-dot-product-attention kernels may run. `auto` gives torch a
  priority list, fastest first, for every attention call (a kernel that cannot take a call, such as
  flash attention with a boolean mask or in float32, passes it to the next); a backend name puts that one
  first, with math as the fallback. The kernel each kind of the model's calls gets (the aggregator's
  under AMP, masked or not, and the heads' in float32) is found at start by trying one, and logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvgt.models.layers import Block

ATTENTION_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 on CUDA; a flash-style kernel on CPU
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN's fused attention (Hopper and later: the fastest in bf16)
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # memory-efficient (xFormers) kernel: takes masks, fp32
    "math": SDPBackend.MATH,  # plain matmul + softmax: any device, dtype and mask
}
AUTO_ORDER = {"cuda": ("cudnn", "flash", "efficient", "math"), "cpu": ("flash", "math")}


def attention_order(setting: str, device: torch.device) -> tuple[str, ...]:
    """The backends attention may use, in priority order, for model.attention_backend=`setting`: auto's
    list for the device, or the named backend with math as the fallback for calls it cannot take."""
    if setting == "auto":
        return AUTO_ORDER.get(device.type, ("math",))
    if setting not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend '{setting}' is not one of auto, {', '.join(ATTENTION_BACKENDS)}")
    return (setting,) if setting == "math" else (setting, "math")


def attention_context(order: tuple[str, ...]):
    """The context in which attention calls use the backends of `order`, first that can (sdpa_kernel)."""
    return sdpa_kernel([ATTENTION_BACKENDS[name] for name in order], set_priority=len(order) > 1)


def chosen_backend(order: tuple[str, ...], device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool):
    """The backend of `order` that takes an attention call like the model's (dtype, head dim, with or
    without a boolean mask, with a gradient): the first one that runs it."""
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(16, 16, dtype=torch.bool, device=device).tril() if masked else None
    for name in order:
        try:
            with attention_context((name,)):
                F.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum().backward()
            return name
        except RuntimeError:  # "No available kernel": this backend cannot take the call
            continue
    return "none"


def attention_report(
    setting: str, device: torch.device, head_dim: int, calls: dict[str, tuple[torch.dtype, bool]]
) -> tuple[tuple[str, ...], str]:
    """(the backend order, a log line naming the kernel each kind of attention call gets); `calls`:
    kind -> (dtype, masked), e.g. {"aggregator": (torch.bfloat16, False), "heads": (torch.float32, False)}."""
    order = attention_order(setting, device)
    chosen = [
        f"{kind} ({str(dtype).removeprefix('torch.')}{', masked' if masked else ''}) -> "
        f"{chosen_backend(order, device, dtype, head_dim, masked)}"
        for kind, (dtype, masked) in calls.items()
    ]
    return order, f"Attention (model.attention_backend={setting}, order {', '.join(order)}): {'; '.join(chosen)}"


def training_attention(model: nn.Module, setting: str, device: torch.device, amp_dtype: torch.dtype):
    """attention_report for the trainer's calls: the aggregator's (in the AMP dtype; frame-causal ones
    masked) and, under AMP, the heads' (they run in float32)."""
    head_dim = next((m.attn.head_dim for m in model.modules() if isinstance(m, Block)), None)
    if head_dim is None:
        return attention_order(setting, device), "Attention: the model has no transformer blocks"
    masked = any(getattr(m, "causal", False) for m in model.modules())  # DVGT-2: frame-causal masks
    calls = {"aggregator": (amp_dtype, False)}
    if masked:
        calls["frame-causal"] = (amp_dtype, True)
    if amp_dtype != torch.float32:
        calls["heads"] = (torch.float32, masked)
    return attention_report(setting, device, head_dim, calls)


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of `model` in place (regional compilation); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)

"""Transformer building blocks shared by the DINOv2/DINOv3 backbones, the aggregators and the pose heads.

One `Attention` and one `Block` serve all three. What differs is passed in:
- `qk_norm`: LayerNorm over the head dim of q and k (aggregator only);
- `rope`: a callable `rope(x, pos)` that rotates q and k. The aggregator passes a
  `RotaryPositionEmbedding2D` (DVGT-1) or a `MultimodalRotaryEmbedding` (DVGT-2); the DINOv3
  backbone passes a function that rotates patch tokens only;
- `mask_k_bias`: DINOv3's qkv layer whose K bias is multiplied by a fixed 0/1 mask.
At call time a block also takes an optional boolean `attn_mask` (True = may attend) and a
`KVCache` (streaming inference: keys and values of earlier frames are kept and attended to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RopeFn = Callable[[Tensor, Any], Tensor]  # rope(x, positions): positions as the embedding takes them


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, initialised to a small constant."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose bias is multiplied by the persistent `bias_mask` buffer (0 on the K third).

    DINOv3 trains with the K bias masked out; the bias parameter keeps its full size so that
    checkpoints load unchanged.
    """

    bias_mask: Tensor  # [out_features] (register_buffer)

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.register_buffer("bias_mask", torch.empty(out_features))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        third = self.out_features // 3
        self.bias_mask.fill_(1.0)
        self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def reset_buffers(model: nn.Module) -> nn.Module:
    """Recompute every buffer of `model` (they are constants of the architecture).

    Needed after `model.to_empty(...)`, which leaves buffers as uninitialised memory.
    """
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE (as in VGGT): the first half of each head rotates with the row, the second with the column.

    Each half uses the standard 1D RoPE with frequencies `frequency ** (-2i / half)` and the
    rotate-half convention (pairs feature i with feature i + half/2).
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = frequency

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def _rope_1d(self, x: Tensor, positions: Tensor) -> Tensor:
        # x: [B, heads, N, d], positions: [B or 1, N] integer
        d = x.shape[-1]
        inv_freq = 1.0 / (self.frequency ** (torch.arange(0, d, 2, device=x.device).float() / d))  # [d/2]
        angles = positions.float()[..., None] * inv_freq  # [B, N, d/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, N, d]
        return x * angles.cos().to(x.dtype) + self._rotate_half(x) * angles.sin().to(x.dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim]; pos: [B or 1, N, 2] integer (row, col)."""
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat((self._rope_1d(rows, pos[..., 0]), self._rope_1d(cols, pos[..., 1])), dim=-1)


class MultimodalRotaryEmbedding(nn.Module):
    """Interleaved 3D M-RoPE (as in Qwen3-VL): each head's frequency pairs rotate with t, h or w.

    Frequency pair i (of head_dim/2, frequencies `base ** (-2i / head_dim)`, rotate-half layout)
    follows the row for i = 1, 4, 7, ... and the column for i = 2, 5, 8, ... over the first 3*s
    pairs, and time elsewhere. At head_dim 64 that is s = 10 pairs for h and w each and 12 for t;
    narrower heads keep the same proportions.
    """

    def __init__(self, head_dim: int, base: float = 1000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"M-RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        pairs = head_dim // 2
        self.spatial_pairs = pairs * 5 // 16  # pairs for h and for w each: 10 of 32 at head_dim 64
        axis = [0] * pairs  # 0 = t, 1 = h, 2 = w
        for i in range(3 * self.spatial_pairs):
            axis[i] = i % 3
        self.axis = tuple(axis)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim]; pos: [B or 1, N, 3] integer (t, h, w)."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=x.device).float() / self.head_dim))
        coords = pos[..., list(self.axis)].float()  # [B, N, head_dim/2]: the coordinate each pair follows
        angles = coords * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, N, head_dim]
        return x * angles.cos().to(x.dtype) + RotaryPositionEmbedding2D._rotate_half(x) * angles.sin().to(x.dtype)


class KVCache:
    """Keys and values (after RoPE) of the tokens one attention layer has seen, for streaming inference."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None  # [B, heads, N_past, head_dim]
        self.values: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new k, v [B, heads, N, head_dim]; returns all keys and values, past first."""
        if self.keys is not None and self.values is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v

    def keep_last(self, num_tokens: int) -> None:
        """Drop all but the last `num_tokens` cached tokens (a sliding window)."""
        if self.keys is not None and self.values is not None:
            start = self.keys.shape[2] - num_tokens
            self.keys, self.values = self.keys[:, :, start:], self.values[:, :, start:]


class Attention(nn.Module):
    """Multi-head self-attention (F.scaled_dot_product_attention) with optional q/k norm, RoPE, mask and KV cache."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        rope: RopeFn | None = None,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = LinearKMaskedBias(dim, dim * 3) if mask_k_bias else nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor, pos=None, attn_mask: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)  # [B, heads, N_past + N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        init_values: float,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        rope: RopeFn | None = None,
        mask_k_bias: bool = False,
        norm_eps: float = 1e-5,  # of norm1 and norm2 (DINOv2 uses 1e-6)
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, pos=None, attn_mask: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, attn_mask=attn_mask, kv_cache=kv_cache))
        return x + self.ls2(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, N, C] over a context [B, M, C] (separate q and kv projections)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, N, d]
        k, v = self.kv_proj(context).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: x + ls1(attn(norm1(x), context)), then x + ls2(mlp(norm2(x))).

    The context is used as given (not normalised). `drop` is dropout on both residual branches (train mode).
    """

    def __init__(self, dim: int, num_heads: int, init_values: float, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.ls1(self.drop(self.attn(self.norm1(x), context)))
        return x + self.ls2(self.drop(self.mlp(self.norm2(x))))


def autocast_off(device: torch.device):
    """A region in float32 even under autocast (the heads); nothing to switch off on the meta device
    (dvgt profile-memory runs the model there)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)

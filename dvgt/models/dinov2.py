"""DINOv2 ViT backbone with registers (ViT-L/14 at full size), used by VGGT as its patch embedding.

Parameter names match VGGT-1B's `aggregator.patch_embed.*`. Only what VGGT needs is implemented:
`forward` returns the final-normed patch tokens (DINOv2's `x_norm_patchtokens`).

Differences from the DINOv3 backbone (dinov3.py): a learned absolute position embedding for a
37 x 37 grid (518 px), resized bicubically (antialiased) to the input's patch grid; register tokens
after the CLS token; no RoPE, no K-bias mask; LayerNorm eps 1e-6; LayerScale starts at 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dinov3 import PatchEmbed
from .layers import Block

NORM_EPS = 1e-6


class DinoV2VisionTransformer(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        patch_size: int = 14,
        img_size: int = 518,
        num_register_tokens: int = 4,
        layerscale_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.n_prefix_tokens = 1 + num_register_tokens  # CLS + registers
        grid = img_size // patch_size

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, embed_dim))  # CLS, then the grid row by row
        self.register_tokens = nn.Parameter(torch.empty(1, num_register_tokens, embed_dim))
        # Only used for masked-image pretraining; kept (frozen) so checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, init_values=layerscale_init, norm_eps=NORM_EPS) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's from-scratch init (norms and LayerScale keep their constructor values)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        """[1, 1 + rows*cols, C]: the CLS entry, then the learned grid resized to rows x cols."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if (rows, cols) == (grid, grid):
            return self.pos_embed.to(dtype)
        pos_embed = self.pos_embed.float()
        patches = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, C, grid, grid]
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", antialias=True)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos_embed[:, :1], patches], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] (normalised) -> final-normed patch tokens [N, (H/p)*(W/p), C]."""
        N, _, H, W = images.shape
        x = self.patch_embed(images)  # [N, HW, C]
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)
        x = x + self.position_embedding(H // self.patch_size, W // self.patch_size, x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]], dim=1)  # [N, 1 + R + HW, C]
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, self.n_prefix_tokens :])

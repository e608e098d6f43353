"""DINOv3 ViT backbone (ViT-L/16 at full size), used by DVGT as its patch embedding.

Parameter names match the official DINOv3 checkpoints (`dinov3_vitl16_pretrain_lvd1689m-*.pth`), so
they load strictly. Only what DVGT needs is implemented: `forward` returns the final-normed patch
tokens (DINOv3's `x_norm_patchtokens`).

Architecture (hub config `dinov3_vitl16`): 16x16 patch conv; 1 CLS + 4 storage tokens; no absolute
position embedding; pre-norm blocks (LayerNorm eps 1e-5, GELU MLP x4, LayerScale 1e-5) whose qkv
layer masks the K bias; axial RoPE (base 100) applied to the patch tokens only, with coordinates
normalised to [-1, 1] per axis and, in train mode, randomly rescaled by a factor in [1/2, 2].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import Block


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv: [N, 3, H, W] -> [N, (H/p)*(W/p), C]."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RopePositionEmbedding(nn.Module):
    """Axial RoPE angles for an H x W patch grid, returned as (sin, cos), each [H*W, head_dim].

    A head's dims are split in two halves of head_dim/2; each half holds head_dim/4 frequencies for
    the row coordinate followed by head_dim/4 for the column coordinate. `periods` is a persistent
    buffer (it is in the official checkpoints).
    """

    periods: Tensor  # [head_dim / 4] (register_buffer)

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: float = 2.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"DINOv3 RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        exponents = 2 * torch.arange(self.head_dim // 4, device=self.periods.device, dtype=torch.float32)
        self.periods.copy_(self.base ** (exponents / (self.head_dim // 2)))

    def forward(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        device, dtype = self.periods.device, torch.float32
        coords_h = torch.arange(0.5, H, device=device, dtype=dtype) / H  # patch centres in (0, 1)
        coords_w = torch.arange(0.5, W, device=device, dtype=dtype) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # [HW, 2]
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale_coords is not None:
            log_max = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=device, dtype=dtype).uniform_(-log_max, log_max).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, head_dim/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, head_dim]
        return torch.sin(angles), torch.cos(angles)


def rope_patch_tokens(x: Tensor, sin_cos: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the trailing H*W (patch) tokens of x [B, heads, N, head_dim]; the CLS/storage prefix is left as is."""
    sin, cos = sin_cos
    prefix = x.shape[-2] - sin.shape[-2]
    patches = x[..., prefix:, :].to(sin.dtype)
    half1, half2 = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat((-half2, half1), dim=-1) * sin
    return torch.cat((x[..., :prefix, :], rotated.to(x.dtype)), dim=-2)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        patch_size: int = 16,
        n_storage_tokens: int = 4,
        layerscale_init: float = 1e-5,
        rope_base: float = 100.0,
        rope_rescale_coords: float = 2.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.n_prefix_tokens = 1 + n_storage_tokens  # CLS + storage

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim))
        # Only used for masked-image pretraining; kept (frozen) so official checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.rope_embed = RopePositionEmbedding(
            embed_dim // num_heads, base=rope_base, rescale_coords=rope_rescale_coords
        )
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, init_values=layerscale_init, rope=rope_patch_tokens, mask_k_bias=True)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv3's from-scratch init. Norms and LayerScale keep their constructor values, and PyTorch's
        default Conv2d init is DINOv3's patch-embedding init (uniform +-1/sqrt(fan_in))."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] (normalised) -> final-normed patch tokens [N, (H/p)*(W/p), C]."""
        H, W = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.patch_embed(images)  # [N, HW, C]
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).expand(x.shape[0], -1, -1)
        x = torch.cat([prefix, x], dim=1)  # [N, 1 + storage + HW, C]
        for block in self.blocks:
            # recomputed per block: in train mode each block draws its own coordinate rescale
            x = block(x, pos=self.rope_embed(H=H, W=W))
        return self.norm(x[:, self.n_prefix_tokens :])

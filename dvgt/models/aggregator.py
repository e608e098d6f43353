"""The DVGT-1 aggregator: DINOv3 patch tokens refined by alternating intra-view, cross-view and cross-frame attention.

Each image becomes [ego token, register tokens, patch tokens]. Every depth step runs three blocks:
- intra-view: the tokens of one image attend to each other,           [B*T*V, N, C]
- cross-view: the tokens of the V images of one frame,                [B*T, V*N, C]
- cross-frame: the tokens of the T frames of one camera view,         [B*V, T*N, C]
and outputs [cross-frame, cross-view, intra-view] concatenated: [B, T, V, N, 3C].
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .dinov3 import DinoVisionTransformer
from .layers import Block, RotaryPositionEmbedding2D

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Helpers shared with the VGGT aggregator (vggt.py).


def normalize_images(images: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def check_images(images: Tensor, patch_size: int) -> None:
    """A clear error unless images is [B, T, V, 3, H, W] with H and W multiples of the patch size."""
    if images.ndim != 6 or images.shape[3] != 3:
        raise ValueError(f"expected images of shape [B, T, V, 3, H, W], got {list(images.shape)}")
    (H, W), p = images.shape[-2:], patch_size
    if H % p or W % p:
        raise ValueError(
            f"image height and width must be multiples of the patch size {p}, got {H}x{W} "
            f"(input shape {list(images.shape)}); resize or crop the images, e.g. to {H // p * p}x{W // p * p}"
        )


def token_positions(rows: int, cols: int, num_special: int, device: torch.device) -> Tensor:
    """2D RoPE positions of one image's tokens, [N, 2]: special tokens (0, 0), patches (row + 1, col + 1)."""
    grid = torch.cartesian_prod(torch.arange(rows, device=device), torch.arange(cols, device=device)) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat([special, grid], dim=0)


def per_image_tokens(token: Tensor, B: int, T: int, V: int) -> Tensor:
    """[1, 2, X, C] -> [B*T*V, X, C]: variant 0 for frame 0, variant 1 for the later frames."""
    per_frame = torch.cat([token[:, :1], token[:, 1:].expand(-1, T - 1, -1, -1)], dim=1)  # [1, T, X, C]
    return per_frame[:, :, None].expand(B, T, V, -1, -1).reshape(B * T * V, *token.shape[2:])


def run_block(block: nn.Module, x: Tensor, pos: Tensor, checkpointing: bool) -> Tensor:
    """block(x, pos), recomputed in backward (activation checkpointing) when `checkpointing`."""
    if checkpointing:
        return checkpoint(block, x, pos, use_reentrant=False)
    return block(x, pos=pos)


class Aggregator(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        backbone_depth: int = 24,
        patch_size: int = 16,
        num_register_tokens: int = 4,
        max_frames: int = 48,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        rope_freq: float = 100.0,
        gradient_checkpointing: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_start_idx = 1 + num_register_tokens  # ego token, then registers, then patches
        self.gradient_checkpointing = gradient_checkpointing

        # Learned special tokens: variant 0 for frame 0 (all views), variant 1 for later frames.
        self.register_token = nn.Parameter(torch.empty(1, 2, num_register_tokens, embed_dim))
        self.ego_pose_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim))
        self.temporal_pos_embed = nn.Parameter(torch.empty(1, max_frames, embed_dim))  # by frame index
        for token in (self.register_token, self.ego_pose_token, self.temporal_pos_embed):
            nn.init.normal_(token, std=1e-6)

        self.patch_embed = DinoVisionTransformer(embed_dim, backbone_depth, num_heads, patch_size)
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq)
        self.intra_view_blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, init_values=init_values, mlp_ratio=mlp_ratio, qk_norm=True, rope=self.rope)
                for _ in range(depth)
            ]
        )
        self.cross_view_blocks = copy.deepcopy(self.intra_view_blocks)
        self.cross_frame_blocks = copy.deepcopy(self.intra_view_blocks)

    @property
    def max_frames(self) -> int:
        return self.temporal_pos_embed.shape[1]

    def _check_input(self, images: Tensor) -> None:
        check_images(images, self.patch_size)
        if images.shape[1] > self.max_frames:
            raise ValueError(
                f"got {images.shape[1]} frames but the model's temporal embedding covers at most {self.max_frames} "
                f"(model.max_frames); use shorter clips or raise model.max_frames"
            )

    def forward(self, images: Tensor) -> Tuple[List[Tensor], int]:
        """images [B, T, V, 3, H, W] in [0, 1] -> (depth x [B, T, V, N, 3C], patch_start_idx)."""
        self._check_input(images)
        B, T, V, _, H, W = images.shape
        images = normalize_images(images)

        patches = self.patch_embed(images.reshape(B * T * V, 3, H, W))  # [B*T*V, P, C]
        P, C = patches.shape[1:]
        patches = patches.view(B, T, V, P, C) + self.temporal_pos_embed[0, :T, None, None]
        x = torch.cat(
            [
                per_image_tokens(self.ego_pose_token, B, T, V),
                per_image_tokens(self.register_token, B, T, V),
                patches.view(B * T * V, P, C),
            ],
            dim=1,
        )
        N = x.shape[1]
        x = x.view(B, T, V, N, C)

        pos = token_positions(H // self.patch_size, W // self.patch_size, self.patch_start_idx, images.device)  # [N,2]
        pos_view, pos_frame = pos.repeat(V, 1)[None], pos.repeat(T, 1)[None]  # same grid per image

        checkpointing = self.training and self.gradient_checkpointing
        outputs = []
        for intra_block, view_block, frame_block in zip(
            self.intra_view_blocks, self.cross_view_blocks, self.cross_frame_blocks
        ):
            intra = run_block(intra_block, x.reshape(B * T * V, N, C), pos[None], checkpointing).view(B, T, V, N, C)
            view = run_block(view_block, intra.reshape(B * T, V * N, C), pos_view, checkpointing).view(B, T, V, N, C)
            frame = run_block(frame_block, view.transpose(1, 2).reshape(B * V, T * N, C), pos_frame,
                              checkpointing)
            x = frame.view(B, V, T, N, C).transpose(1, 2)
            outputs.append(torch.cat([x, view, intra], dim=-1))
        return outputs, self.patch_start_idx

"""DPT head (Ranftl et al., "Vision Transformers for Dense Prediction"), as used by VGGT and DVGT.

It reads 4 aggregator outputs, turns their patch tokens into feature maps at 4 scales
(x4, x2, x1, x1/2 of the patch grid), fuses them coarse-to-fine with RefineNet blocks, upsamples
to the image size and predicts, per pixel, 3 point coordinates and a confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Some CUDA interpolation kernels index with int32: split bigger outputs along the batch.
_MAX_INTERPOLATE_ELEMENTS = 1_610_612_736


def interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=True) of x [N, C, h, w] to `size`."""
    chunks = x.shape[0] * x.shape[1] * size[0] * size[1] // _MAX_INTERPOLATE_ELEMENTS + 1
    if chunks == 1:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in x.chunk(chunks)])


def _sincos_1d(pos: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """[M] -> [M, dim]: sin then cos of pos * omega_0 ** (-2i / dim), computed in float64."""
    omega = 1.0 / omega_0 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_embedding(channels: int, height: int, width: int, aspect_ratio: float, device=None) -> Tensor:
    """Sinusoidal embedding [channels, height, width] of a pixel-centre UV grid.

    The grid spans the image rectangle scaled so that its half-diagonal is 1 (x in
    [-a, a] and y in [-b, b] with a / b = aspect_ratio, a^2 + b^2 = 1). The first half of the
    channels encodes u, the second half v.
    """
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, device=device)
    u, v = torch.meshgrid(xs, ys, indexing="xy")  # each [height, width]
    emb = torch.cat([_sincos_1d(u.flatten(), channels // 2), _sincos_1d(v.flatten(), channels // 2)], dim=1)
    return emb.view(height, width, channels).permute(2, 0, 1)


def add_uv_embedding(x: Tensor, aspect_ratio: float, ratio: float = 0.1) -> Tensor:
    """x [N, C, h, w] + ratio * UV embedding."""
    return x + ratio * uv_embedding(x.shape[1], x.shape[2], x.shape[3], aspect_ratio, x.device).to(x.dtype)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The reference unit applies an in-place ReLU to its input, so the skip branch carries relu(x).
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: (x + unit1(skip)) -> unit2 -> bilinear resize -> 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = interpolate(x, size or (2 * x.shape[-2], 2 * x.shape[-1]))
        return self.out_conv(x)


class DPTHead(nn.Module):
    @classmethod
    def of_size(cls, dim_in: int, size, patch_size: int) -> DPTHead:
        """The point head of a model size (a `DVGT1Size` row: dpt_features, dpt_out_channels, dpt_layers)."""
        return cls(
            dim_in,
            patch_size=patch_size,
            features=size.dpt_features,
            out_channels=size.dpt_out_channels,
            intermediate_layer_idx=size.dpt_layers,
        )

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 16,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        output_dim: int = 4,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.intermediate_layer_idx = list(intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels])
        # patch grid -> x4, x2, x1, x1/2
        c1, c2, _, c4 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
            ]
        )

        # Fusion modules, named as in the reference checkpoints.
        self.scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, output_dim, kernel_size=1),
        )

    def forward(
        self,
        tokens_list: list[Tensor],
        image_size: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """tokens_list: aggregator outputs [B, T, V, N, dim_in] -> points [B, T, V, H, W, 3], conf [B, T, V, H, W].

        `frames_chunk_size` bounds memory by running the head on that many frames at a time.
        """
        T = tokens_list[self.intermediate_layer_idx[0]].shape[1]
        chunk = frames_chunk_size or T
        results = [
            self._forward_frames(tokens_list, image_size, patch_start_idx, slice(start, start + chunk))
            for start in range(0, T, chunk)
        ]
        points, conf = zip(*results)
        return torch.cat(points, dim=1), torch.cat(conf, dim=1)

    def _forward_frames(
        self, tokens_list: list[Tensor], image_size: tuple[int, int], patch_start_idx: int, frames: slice
    ) -> tuple[Tensor, Tensor]:
        H, W = image_size
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        features = []
        for layer, project, resize in zip(self.intermediate_layer_idx, self.projects, self.resize_layers):
            x = tokens_list[layer][:, frames, :, patch_start_idx:].float()  # [B, t, V, P, dim_in]
            B, t, V = x.shape[:3]
            x = self.norm(x.reshape(B * t * V, grid_h * grid_w, -1))
            x = x.permute(0, 2, 1).reshape(B * t * V, -1, grid_h, grid_w)
            x = resize(add_uv_embedding(project(x), W / H))
            features.append(x)

        x = self._fuse(features)  # [B*t*V, features/2, 8 * grid_h, 8 * grid_w]
        x = add_uv_embedding(interpolate(x, (H, W)), W / H)
        scratch: Any = self.scratch  # a namespace of the checkpoint's layout (its modules set one by one)
        x = scratch.output_conv2(x).permute(0, 2, 3, 1)  # [B*t*V, H, W, 4]

        points = torch.sign(x[..., :3]) * torch.expm1(x[..., :3].abs())  # inverse of sign(p) * log(1 + |p|)
        conf = 1 + x[..., 3].exp()
        return points.reshape(B, t, V, H, W, 3), conf.reshape(B, t, V, H, W)

    def _fuse(self, features: list[Tensor]) -> Tensor:
        s: Any = self.scratch  # (see forward)
        l1, l2, l3, l4 = (rn(f) for rn, f in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn), features))
        x = s.refinenet4(l4, size=l3.shape[2:])
        x = s.refinenet3(x, l3, size=l2.shape[2:])
        x = s.refinenet2(x, l2, size=l1.shape[2:])
        x = s.refinenet1(x, l1)
        return s.output_conv1(x)

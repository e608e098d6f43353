"""The DVGT aggregator: DINOv3 patch tokens refined by alternating intra-view, cross-view and cross-frame attention.

Each image becomes [ego tokens, register tokens, patch tokens]. Every depth step runs three blocks:
- intra-view: the tokens of one image attend to each other,           [B*T*V, N, C]
- cross-view: the tokens of the V images of one frame,                [B*T, V*N, C]
- cross-frame: the tokens of the T frames of one camera view,         [B*V, T*N, C]
and outputs [cross-frame, cross-view, intra-view] concatenated: [B, T, V, N, 3C].

DVGT-1 and DVGT-2 differ only in parameters:
                     DVGT-1                              DVGT-2
  ego tokens         1, frame-0 variant + later frames   9 (pretrain: 1), shared by all frames
  time               learned embedding on patches        t index of the 3D M-RoPE
  RoPE               2D (row, col), base 100             interleaved M-RoPE (t, row, col), base 1000
  cross-frame        all frames                          frame-causal; streaming with a KV cache
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checkpointing import check_mode, run_block
from .dinov3 import DinoVisionTransformer
from .layers import Block, KVCache, MultimodalRotaryEmbedding, RotaryPositionEmbedding2D
from .split import Carry, PipelineUnit, layer_name

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


def embed_patches(patch_embed: Any, images: Tensor, patch_tokens: Tensor | None = None) -> Tensor:
    """Patch tokens [B*T*V, P, C] of images [B, T, V, 3, H, W] in [0, 1]: the backbone's output, or
    `patch_tokens` [B, T, V, P, C] when given (the backbone's output for these images, precomputed by the
    feature cache, docs/feature-cache.md), which skips the backbone."""
    B, T, V, _, H, W = images.shape
    if patch_tokens is None:
        return patch_embed(normalize_images(images).reshape(B * T * V, 3, H, W))
    p = patch_embed.patch_size
    if patch_tokens.shape[:4] != (B, T, V, (H // p) * (W // p)):
        raise ValueError(
            f"patch_tokens {list(patch_tokens.shape)} do not fit images {list(images.shape)}: expected "
            f"[{B}, {T}, {V}, {(H // p) * (W // p)}, C] ((H/{p}) x (W/{p}) patches per image)"
        )
    return patch_tokens.reshape(B * T * V, *patch_tokens.shape[3:])


def precomputed_outputs(aggregator: Any, aggregator_tokens: Sequence[Tensor | None]) -> tuple[list, int]:
    """(outputs by layer, patch_start_idx) as a frozen aggregator's cached outputs give them (feature cache,
    docs/feature-cache.md): one entry per layer, [B, T, V, N, D] where a head reads it and None elsewhere."""
    if len(aggregator_tokens) != aggregator.depth:
        raise ValueError(
            f"aggregator_tokens has {len(aggregator_tokens)} layers but the aggregator has "
            f"{aggregator.depth}; pass one entry per layer (None for the layers no head reads)"
        )
    return list(aggregator_tokens), aggregator.patch_start_idx


def per_image_tokens(token: Tensor, B: int, T: int, V: int) -> Tensor:
    """[1, 2, X, C] (variant 0 for frame 0, variant 1 for the later frames) or [1, X, C] -> [B*T*V, X, C]."""
    if token.ndim == 3:
        per_frame = token[:, None].expand(-1, T, -1, -1)
    else:
        per_frame = torch.cat([token[:, :1], token[:, 1:].expand(-1, T - 1, -1, -1)], dim=1)  # [1, T, X, C]
    return per_frame[:, :, None].expand(B, T, V, -1, -1).reshape(B * T * V, *token.shape[-2:])


class Aggregator(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        backbone_depth: int = 24,
        patch_size: int = 16,
        num_register_tokens: int = 4,
        num_ego_tokens: int = 1,
        first_frame_tokens: bool = True,
        temporal_embedding: bool = True,
        rope: str = "2d",
        causal: bool = False,
        max_frames: int = 48,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        rope_freq: float = 100.0,
        activation_checkpointing: str = "full",
    ) -> None:
        """`first_frame_tokens`: special tokens have a frame-0 variant ([1, 2, X, C]) or are shared ([1, X, C]);
        `temporal_embedding`: add a learned per-frame embedding to the patch tokens; `rope`: "2d" or
        "mrope" (3D, positions (t, row, col)); `causal`: cross-frame attention sees only earlier frames;
        `activation_checkpointing`: none | full | selective | every_other (checkpointing.py)."""
        super().__init__()
        if rope not in ("2d", "mrope"):
            raise ValueError(f"rope must be '2d' or 'mrope', got '{rope}'")
        self.patch_size = patch_size
        self.depth = depth
        self.max_frames = max_frames
        self.num_ego_tokens = num_ego_tokens
        self.patch_start_idx = num_ego_tokens + num_register_tokens  # ego tokens, then registers, then patches
        self.causal = causal
        self.activation_checkpointing = check_mode(activation_checkpointing)

        # Learned special tokens, [1, 2, X, C] (variant 0 for frame 0, variant 1 for later frames) or [1, X, C].
        variants = (2,) if first_frame_tokens else ()
        self.register_token = nn.Parameter(torch.empty(1, *variants, num_register_tokens, embed_dim))
        self.ego_pose_token = nn.Parameter(torch.empty(1, *variants, num_ego_tokens, embed_dim))
        # by frame index
        self.temporal_pos_embed = nn.Parameter(torch.empty(1, max_frames, embed_dim)) if temporal_embedding else None
        for token in (self.register_token, self.ego_pose_token, self.temporal_pos_embed):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

        self.patch_embed = DinoVisionTransformer(embed_dim, backbone_depth, num_heads, patch_size)
        self.rope: RotaryPositionEmbedding2D | MultimodalRotaryEmbedding
        if rope == "2d":
            self.rope = RotaryPositionEmbedding2D(frequency=rope_freq)
        else:
            self.rope = MultimodalRotaryEmbedding(embed_dim // num_heads, base=rope_freq)
        self.intra_view_blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, init_values=init_values, mlp_ratio=mlp_ratio, qk_norm=True, rope=self.rope)
                for _ in range(depth)
            ]
        )
        self.cross_view_blocks = copy.deepcopy(self.intra_view_blocks)
        self.cross_frame_blocks = copy.deepcopy(self.intra_view_blocks)

    def _check_input(self, images: Tensor) -> None:
        check_images(images, self.patch_size)
        if images.shape[1] > self.max_frames:
            raise ValueError(
                f"got {images.shape[1]} frames but the model supports at most {self.max_frames} "
                f"(model.max_frames); use shorter clips or raise model.max_frames"
            )

    def _positions(self, rows: int, cols: int, frames: Sequence[int], device: torch.device) -> Tensor:
        """RoPE positions of one image's tokens in each frame, [T, N, 2] (2D: row, col) or [T, N, 3] (M-RoPE:
        t = absolute frame index, row, col). Special tokens sit at row = col = 0, patches at (row + 1, col + 1)."""
        spatial = token_positions(rows, cols, self.patch_start_idx, device)[None].expand(len(frames), -1, -1)
        if isinstance(self.rope, RotaryPositionEmbedding2D):
            return spatial
        t = torch.as_tensor(frames, device=device)[:, None, None].expand(-1, spatial.shape[1], 1)  # [T, N, 1]
        return torch.cat([t, spatial], dim=-1)

    def _frame_causal_mask(self, T: int, N: int, device: torch.device) -> Tensor | None:
        """[T*N, T*N] boolean, True where a token may attend: its own frame and earlier ones (None if not causal)."""
        if not self.causal or T == 1:
            return None
        frames = torch.arange(T, device=device).repeat_interleave(N)
        return frames[:, None] >= frames[None, :]

    def forward(
        self,
        images: Tensor,
        kv_caches: list[KVCache] | None = None,
        first_frame: int = 0,
        patch_tokens: Tensor | None = None,
    ) -> tuple[list[Tensor], int]:
        """images [B, T, V, 3, H, W] in [0, 1] -> (depth x [B, T, V, N, 3C], patch_start_idx).

        `patch_tokens` [B, T, V, P, C]: the DINOv3 backbone's output for these images (from the feature
        cache); the backbone is then skipped.

        Streaming (M-RoPE models): pass one frame (T = 1), its absolute index `first_frame` and one
        `KVCache` per depth step; the cross-frame blocks attend to the cached earlier frames and add
        this frame to the caches.
        """
        if kv_caches is not None and (images.shape[1] != 1 or len(kv_caches) != len(self.cross_frame_blocks)):
            raise ValueError(
                f"streaming takes one frame and one KV cache per depth step, got {images.shape[1]} frames and "
                f"{len(kv_caches)} caches for {len(self.cross_frame_blocks)} steps"
            )
        x = self.embed(images, patch_tokens)
        layout = self.layout(images, first_frame)
        outputs = []
        for i in range(self.depth):
            x, output = self.step(i, x, layout, None if kv_caches is None else kv_caches[i])
            outputs.append(output)
        return outputs, self.patch_start_idx

    def embed(self, images: Tensor, patch_tokens: Tensor | None = None) -> Tensor:
        """images [B, T, V, 3, H, W] -> the tokens entering the first depth step, [B, T, V, N, C]."""
        self._check_input(images)
        B, T, V = images.shape[:3]
        patches = embed_patches(self.patch_embed, images, patch_tokens)  # [B*T*V, P, C]
        P, C = patches.shape[1:]
        if self.temporal_pos_embed is not None:
            patches = patches.view(B, T, V, P, C) + self.temporal_pos_embed[0, :T, None, None]
        x = torch.cat(
            [
                per_image_tokens(self.ego_pose_token, B, T, V),
                per_image_tokens(self.register_token, B, T, V),
                patches.reshape(B * T * V, P, C),
            ],
            dim=1,
        )
        return x.view(B, T, V, -1, C)

    def layout(self, images: Tensor, first_frame: int = 0) -> dict:
        """What every depth step needs besides the tokens, from the images' shape: RoPE positions laid
        out like the tokens of each attention type, the frame-causal mask and whether to checkpoint."""
        B, T, V, _, H, W = images.shape
        rows, cols = H // self.patch_size, W // self.patch_size
        N = self.patch_start_idx + rows * cols
        pos = self._positions(rows, cols, range(first_frame, first_frame + T), images.device)
        pos = pos[None, :, None].expand(B, T, V, N, -1)  # [B, T, V, N, 2 or 3]
        pos_intra = pos.reshape(B * T * V, N, -1)
        pos_view = pos.reshape(B * T, V * N, -1)
        pos_frame = pos.transpose(1, 2).reshape(B * V, T * N, -1)
        if isinstance(self.rope, RotaryPositionEmbedding2D):  # 2D positions are the same in every sequence
            pos_intra, pos_view, pos_frame = pos_intra[:1], pos_view[:1], pos_frame[:1]
        return {
            "intra": pos_intra,
            "view": pos_view,
            "frame": pos_frame,
            "mask": self._frame_causal_mask(T, N, images.device),
            "checkpointing": self.activation_checkpointing if self.training else "none",
        }

    def step(self, i: int, x: Tensor, layout: dict, kv_cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """Depth step i: x [B, T, V, N, C] -> (x after the step, its output [B, T, V, N, 3C])."""
        B, T, V, N, C = x.shape
        checkpointing = layout["checkpointing"]
        intra = run_block(self.intra_view_blocks[i], x.reshape(B * T * V, N, C), layout["intra"], checkpointing, 3 * i)
        intra = intra.view(B, T, V, N, C)
        view = run_block(
            self.cross_view_blocks[i], intra.reshape(B * T, V * N, C), layout["view"], checkpointing, 3 * i + 1
        )
        view = view.view(B, T, V, N, C)
        frame_input = view.transpose(1, 2).reshape(B * V, T * N, C)
        if kv_cache is None:
            frame = run_block(
                self.cross_frame_blocks[i],
                frame_input,
                layout["frame"],
                checkpointing,
                3 * i + 2,
                attn_mask=layout["mask"],
            )
        else:
            frame = self.cross_frame_blocks[i](frame_input, pos=layout["frame"], kv_cache=kv_cache)
        x = frame.view(B, V, T, N, C).transpose(1, 2)
        return x, torch.cat([x, view, intra], dim=-1)

    def pipeline_units(self, path: str, read_layers: Sequence[int]) -> list[PipelineUnit]:
        """The embedding (backbone and special tokens), then one unit per depth step; `path`: this
        aggregator's path in the model; `read_layers`: the outputs later units read (kept in the carry)."""
        tokens = [f"{path}.{name}" for name, _ in self.named_parameters(recurse=False)]

        def embed(carry: Carry) -> Carry:
            return {"x": self.embed(carry["images"])}

        def step(i: int) -> PipelineUnit:
            def run(carry: Carry) -> Carry:
                x, output = self.step(i, carry["x"], self.layout(carry["images"]))
                return {"x": x, **({layer_name(i): output} if i in read_layers else {})}

            owns = tuple(
                f"{path}.{kind}.{i}" for kind in ("intra_view_blocks", "cross_view_blocks", "cross_frame_blocks")
            )
            writes = ("x", layer_name(i)) if i in read_layers else ("x",)
            return PipelineUnit(f"{path}.{i}", owns, ("images", "x"), writes, run)

        embedding = PipelineUnit(f"{path}.embed", (f"{path}.patch_embed", *tokens), ("images",), ("x",), embed)
        return [embedding, *(step(i) for i in range(self.depth))]

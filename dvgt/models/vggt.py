"""VGGT (Wang et al., "VGGT: Visual Geometry Grounded Transformer"), as fine-tuned in DVGT.

The T x V images of a clip are one sequence of S = T*V images. The aggregator turns each image into
[camera token, register tokens, DINOv2 patch tokens] and alternates two kinds of attention:
- frame: the tokens of one image attend to each other,       [B*S, N, C]
- global: the tokens of all S images of a clip,               [B, S*N, C]
and outputs [frame, global] concatenated after every step: [B, S, N, 2C].
The camera head predicts one absT_quaR_FoV encoding per image (first camera -> that camera), the
DPT head a point map in the first camera's frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .aggregator import check_images, embed_patches, per_image_tokens, precomputed_outputs, token_positions
from .checkpointing import check_mode, run_block
from .dinov2 import DinoV2VisionTransformer
from .dpt_head import DPTHead
from .dvgt1 import SIZES, DVGT1Size, read_layers, run_heads
from .ego_pose_head import CAMERA_POSE_DIM, EgoPoseHead
from .layers import Block, RotaryPositionEmbedding2D
from .split import Carry, PipelineUnit, layer_name

# Heads of the published VGGT-1B that this model does not build: their checkpoint keys are ignored.
DISABLED_HEADS = ("depth_head.", "track_head.")


class VGGTAggregator(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        backbone_depth: int = 24,
        patch_size: int = 14,
        img_size: int = 518,
        num_register_tokens: int = 4,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        rope_freq: float = 100.0,
        activation_checkpointing: str = "full",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.depth = depth
        self.patch_start_idx = 1 + num_register_tokens  # camera token, then registers, then patches
        self.activation_checkpointing = check_mode(activation_checkpointing)

        # Learned special tokens: variant 0 for the first image of a clip, variant 1 for the others.
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.empty(1, 2, num_register_tokens, embed_dim))
        for token in (self.camera_token, self.register_token):
            nn.init.normal_(token, std=1e-6)

        self.patch_embed = DinoV2VisionTransformer(
            embed_dim, backbone_depth, num_heads, patch_size, img_size, num_register_tokens
        )
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq)

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                [
                    Block(
                        embed_dim, num_heads, init_values=init_values, mlp_ratio=mlp_ratio, qk_norm=True, rope=self.rope
                    )
                    for _ in range(depth)
                ]
            )

        self.frame_blocks = stack()
        self.global_blocks = stack()

    def forward(self, images: Tensor, patch_tokens: Tensor | None = None) -> tuple[list[Tensor], int]:
        """images [B, T, V, 3, H, W] in [0, 1] -> (depth x [B, T*V, N, 2C], patch_start_idx); `patch_tokens`
        [B, T, V, P, C]: the DINOv2 backbone's output for these images (feature cache), which skips it."""
        x = self.embed(images, patch_tokens)
        layout = self.layout(images)
        outputs = []
        for i in range(self.depth):
            x, output = self.step(i, x, layout)
            outputs.append(output)
        return outputs, self.patch_start_idx

    def embed(self, images: Tensor, patch_tokens: Tensor | None = None) -> Tensor:
        """images [B, T, V, 3, H, W] -> the tokens entering the first step, [B, S, N, C] (S = T*V)."""
        check_images(images, self.patch_size)
        B, T, V = images.shape[:3]
        S = T * V
        patches = embed_patches(self.patch_embed, images, patch_tokens)  # [B*S, P, C]
        x = torch.cat(
            [
                per_image_tokens(self.camera_token, B, S, 1),  # one "frame" per image: variant 0 for image 0 only
                per_image_tokens(self.register_token, B, S, 1),
                patches,
            ],
            dim=1,
        )
        return x.view(B, S, *x.shape[1:])

    def layout(self, images: Tensor) -> dict:
        """RoPE positions of the frame and global attention, and whether to checkpoint (from the images' shape)."""
        H, W = images.shape[-2:]
        S = images.shape[1] * images.shape[2]
        pos = token_positions(H // self.patch_size, W // self.patch_size, self.patch_start_idx, images.device)  # [N,2]
        return {
            "frame": pos[None],
            "global": pos.repeat(S, 1)[None],  # same grid per image
            "checkpointing": self.activation_checkpointing if self.training else "none",
        }

    def step(self, i: int, x: Tensor, layout: dict) -> tuple[Tensor, Tensor]:
        """Step i: x [B, S, N, C] -> (x after the step, its output [B, S, N, 2C])."""
        B, S, N, C = x.shape
        checkpointing = layout["checkpointing"]
        frame = run_block(self.frame_blocks[i], x.reshape(B * S, N, C), layout["frame"], checkpointing, 2 * i).view(
            B, S, N, C
        )
        x = run_block(self.global_blocks[i], frame.reshape(B, S * N, C), layout["global"], checkpointing, 2 * i + 1)
        x = x.view(B, S, N, C)
        return x, torch.cat([frame, x], dim=-1)

    def pipeline_units(self, path: str, read_layers: Sequence[int]) -> list[PipelineUnit]:
        """The embedding (backbone and special tokens), then one unit per step (as Aggregator.pipeline_units)."""
        tokens = [f"{path}.{name}" for name, _ in self.named_parameters(recurse=False)]

        def embed(carry: Carry) -> Carry:
            return {"x": self.embed(carry["images"])}

        def step(i: int) -> PipelineUnit:
            def run(carry: Carry) -> Carry:
                x, output = self.step(i, carry["x"], self.layout(carry["images"]))
                return {"x": x, **({layer_name(i): output} if i in read_layers else {})}

            owns = (f"{path}.frame_blocks.{i}", f"{path}.global_blocks.{i}")
            writes = ("x", layer_name(i)) if i in read_layers else ("x",)
            return PipelineUnit(f"{path}.{i}", owns, ("images", "x"), writes, run)

        embedding = PipelineUnit(f"{path}.embed", (f"{path}.patch_embed", *tokens), ("images",), ("x",), embed)
        return [embedding, *(step(i) for i in range(self.depth))]


class VGGT(nn.Module):
    disabled_heads = DISABLED_HEADS  # read by load_weights
    # model.device_map: part -> submodule (the backbone's parameters leave the aggregator's part)
    DEVICE_MAP_PARTS = {
        "backbone": "aggregator.patch_embed",
        "aggregator": "aggregator",
        "camera_head": "camera_head",
        "point_head": "point_head",
    }

    def __init__(
        self,
        size: DVGT1Size = SIZES["full"],
        patch_size: int = 14,
        activation_checkpointing: str = "full",
        frames_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size  # H and W of inputs must be multiples of this
        self.frames_chunk_size = frames_chunk_size
        self.aggregator = VGGTAggregator(
            embed_dim=size.embed_dim,
            depth=size.depth,
            num_heads=size.num_heads,
            backbone_depth=size.backbone_depth,
            patch_size=patch_size,
            activation_checkpointing=activation_checkpointing,
        )
        dim_in = 2 * size.embed_dim
        self.camera_head = EgoPoseHead(
            dim_in, trunk_depth=size.ego_trunk_depth, num_heads=size.num_heads, pose_dim=CAMERA_POSE_DIM, per_image=True
        )
        self.point_head = DPTHead.of_size(dim_in, size, patch_size)

    def forward(
        self,
        images: Tensor,
        patch_tokens: Tensor | None = None,
        aggregator_tokens: Sequence[Tensor | None] | None = None,
    ) -> dict[str, object]:
        """images [B, T, V, 3, H, W] (or [T, V, 3, H, W]) in [0, 1], H and W multiples of 14; `patch_tokens`
        [B, T, V, P, C]: precomputed backbone output; `aggregator_tokens`: a frozen aggregator's precomputed
        outputs by layer, [B, T, V, N, 2C] or None (feature cache, docs/feature-cache.md).

        Returns cam_pose_enc [B, T, V, 9] (absT_quaR_FoV of first camera -> camera, last iteration),
        cam_pose_enc_list (one per iteration), points [B, T, V, H, W, 3] in the first camera's frame,
        points_conf [B, T, V, H, W], and, in eval mode, the input `images`.
        """
        if images.ndim == 5:
            images = images.unsqueeze(0)
        B, T, V = images.shape[:3]
        if aggregator_tokens is None:
            tokens_list, patch_start_idx = self.aggregator(images, patch_tokens=patch_tokens)
            tokens_list = [tokens.view(B, T, V, *tokens.shape[2:]) for tokens in tokens_list]  # [B, T, V, N, 2C]
        else:
            tokens_list, patch_start_idx = precomputed_outputs(self.aggregator, aggregator_tokens)
        return run_heads(self, images, tokens_list, patch_start_idx, self.camera_head, "cam_pose_enc")

    def device_map_parts(self) -> dict[str, str]:
        return dict(self.DEVICE_MAP_PARTS)

    def pipeline_units(self) -> list[PipelineUnit]:
        """Pipeline units: the aggregator's (embedding, one per step), then both heads."""

        def heads(carry: Carry) -> dict[str, object]:
            images = carry["images"]
            B, T, V = images.shape[:3]
            tokens_list = [carry.get(layer_name(i)) for i in range(self.aggregator.depth)]
            tokens_list = [None if t is None else t.view(B, T, V, *t.shape[2:]) for t in tokens_list]
            return run_heads(
                self, images, tokens_list, self.aggregator.patch_start_idx, self.camera_head, "cam_pose_enc"
            )

        read = read_layers(self)
        heads_unit = PipelineUnit("heads", ("camera_head", "point_head"), ("images", *map(layer_name, read)), (), heads)
        return [*self.aggregator.pipeline_units("aggregator", read), heads_unit]

"""DVGT-1: driving visual geometry transformer (aggregator + ego-pose head + DPT point head)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .aggregator import Aggregator, precomputed_outputs
from .dpt_head import DPTHead
from .ego_pose_head import EgoPoseHead
from .layers import autocast_off
from .split import Carry, PipelineUnit, layer_name


@dataclass(frozen=True)
class DVGT1Size:
    """Width and depth of every part. `full` is the published model; the others are for tests and CPU demos."""

    embed_dim: int  # token width C of DINOv3 and the aggregator; the heads read 3C
    num_heads: int  # DINOv3, aggregator and ego-pose trunk
    backbone_depth: int  # DINOv3 blocks
    depth: int  # aggregator steps (one intra-view, one cross-view and one cross-frame block each)
    dpt_features: int
    dpt_out_channels: tuple[int, int, int, int]
    dpt_layers: tuple[int, int, int, int]  # aggregator outputs read by the DPT head
    ego_trunk_depth: int


SIZES: dict[str, DVGT1Size] = {
    "full": DVGT1Size(1024, 16, 24, 24, 256, (256, 512, 1024, 1024), (4, 11, 17, 23), 4),
    "small": DVGT1Size(192, 3, 4, 4, 64, (48, 96, 192, 192), (0, 1, 2, 3), 2),
    "tiny": DVGT1Size(64, 2, 2, 4, 32, (16, 32, 64, 64), (0, 1, 2, 3), 1),
}


class DVGT1(nn.Module):
    # model.device_map: part -> submodule (the backbone's parameters leave the aggregator's part)
    DEVICE_MAP_PARTS = {
        "backbone": "aggregator.patch_embed",
        "aggregator": "aggregator",
        "ego_pose_head": "ego_pose_head",
        "point_head": "point_head",
    }

    def __init__(
        self,
        size: DVGT1Size = SIZES["full"],
        patch_size: int = 16,
        max_frames: int = 48,
        activation_checkpointing: str = "full",
        frames_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size  # H and W of inputs must be multiples of this
        self.frames_chunk_size = frames_chunk_size
        self.aggregator = Aggregator(
            embed_dim=size.embed_dim,
            depth=size.depth,
            num_heads=size.num_heads,
            backbone_depth=size.backbone_depth,
            patch_size=patch_size,
            max_frames=max_frames,
            activation_checkpointing=activation_checkpointing,
        )
        dim_in = 3 * size.embed_dim
        self.ego_pose_head = EgoPoseHead(dim_in, trunk_depth=size.ego_trunk_depth, num_heads=size.num_heads)
        self.point_head = DPTHead.of_size(dim_in, size, patch_size)

    def forward(
        self,
        images: Tensor,
        patch_tokens: Tensor | None = None,
        aggregator_tokens: Sequence[Tensor | None] | None = None,
    ) -> dict[str, object]:
        """images [B, T, V, 3, H, W] (or [T, V, 3, H, W]) in [0, 1], H and W multiples of the patch size.
        Precomputed by the feature cache (docs/feature-cache.md): `patch_tokens` [B, T, V, P, C], the DINOv3
        backbone's output for these images, which skips the backbone; `aggregator_tokens`, a frozen
        aggregator's outputs by layer ([B, T, V, N, 3C] where a head reads it, else None), which skips it.

        Returns absolute_ego_pose_enc [B, T, 7] (last iteration), absolute_ego_pose_enc_list (one per
        iteration), points [B, T, V, H, W, 3] in the frame-0 ego frame, points_conf [B, T, V, H, W],
        and, in eval mode, the input `images`.
        """
        if images.ndim == 5:
            images = images.unsqueeze(0)
        tokens_list, patch_start_idx = (
            self.aggregator(images, patch_tokens=patch_tokens)
            if aggregator_tokens is None
            else precomputed_outputs(self.aggregator, aggregator_tokens)
        )
        return run_heads(self, images, tokens_list, patch_start_idx, self.ego_pose_head, "absolute_ego_pose_enc")

    def device_map_parts(self) -> dict[str, str]:
        return dict(self.DEVICE_MAP_PARTS)

    def pipeline_units(self) -> list[PipelineUnit]:
        """Pipeline units: the aggregator's (embedding, one per depth step), then both heads."""

        def heads(carry: Carry) -> dict[str, object]:
            tokens_list = [carry.get(layer_name(i)) for i in range(self.aggregator.depth)]
            patch_start_idx = self.aggregator.patch_start_idx
            return run_heads(
                self, carry["images"], tokens_list, patch_start_idx, self.ego_pose_head, "absolute_ego_pose_enc"
            )

        read = read_layers(self)
        heads_unit = PipelineUnit(
            "heads", ("ego_pose_head", "point_head"), ("images", *map(layer_name, read)), (), heads
        )
        return [*self.aggregator.pipeline_units("aggregator", read), heads_unit]


def read_layers(model: Any) -> list[int]:
    """The aggregator outputs the heads read: the DPT head's intermediate layers and the last (pose heads)."""
    return sorted({*model.point_head.intermediate_layer_idx, model.aggregator.depth - 1})


def unread_dropped(model: nn.Module, tokens_list: Sequence[Tensor | None]) -> list[Tensor | None]:
    """tokens_list with None for the layers no head reads (so a device map moves only what is read)."""
    read = set(read_layers(model))
    return [tokens if i in read else None for i, tokens in enumerate(tokens_list)]


def run_heads(
    model: Any, images: Tensor, tokens_list, patch_start_idx: int, pose_head: nn.Module, pose_key: str
) -> dict[str, object]:
    """The pose head and `model.point_head` on the aggregator's tokens, in float32 even under autocast
    (DVGT-1 and VGGT). Returns `pose_key` (last iteration), `<pose_key>_list`, points, points_conf
    and, in eval mode, the input `images`."""
    tokens_list = unread_dropped(model, tokens_list)
    with autocast_off(images.device):
        poses = pose_head(tokens_list)
        points, points_conf = model.point_head(
            tokens_list, images.shape[-2:], patch_start_idx, frames_chunk_size=model.frames_chunk_size
        )
    predictions = {pose_key: poses[-1], f"{pose_key}_list": poses, "points": points, "points_conf": points_conf}
    if not model.training:
        predictions["images"] = images
    return predictions

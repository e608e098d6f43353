"""DVGT-2: streaming driving visual geometry transformer with planning (and its stage-1 pretrain variant).

The aggregator is DVGT-1's with 3D M-RoPE (t, row, col) instead of a temporal embedding, 9 ego
tokens per image (1 relative-pose token + 8 future tokens) shared by all frames, and frame-causal
cross-frame attention. Heads: the DPT point head (points in each frame's own ego frame) and the ego
head with the truncated-diffusion trajectory / pose decoder (see dvgt2_head.py).

The pretrain variant (`planning=False`) has 1 ego token, no causal mask, and an ego head that
regresses the relative pose ego_{t-1} -> ego_t directly.

Streaming: `inference(images, infer_window=W)` consumes one frame at a time; the cross-frame blocks
keep the keys and values of the last W - 1 frames (a KV cache with a sliding window) and the ego
head sees the ego tokens of the last W frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .aggregator import Aggregator, precomputed_outputs
from .dpt_head import DPTHead
from .dvgt1 import SIZES, DVGT1Size, read_layers, unread_dropped
from .dvgt2_head import DVGT2EgoHead
from .layers import KVCache, autocast_off
from .split import Carry, PipelineUnit, layer_name
from .trajectory_decoder import TrajectoryPoseDecoder

PLANNING_STEPS = 8  # the planning horizon: future poses at 2 Hz, one future ego token per image each
# The optional ego-status input, [B, T, 8] per frame, as the official trainer builds it
# (scene_dataset.py:get_sequence_data): velocity (2) and acceleration (2) in the ego frame as
# [right, forward], multiplied by gt_scale_factor, then the driving command one-hot (4) in the order of
# the dataset it comes from (dvgt.data.format.COMMAND_ORDER).
EGO_STATUS_FIELDS = (
    "velocity_right",
    "velocity_forward",
    "acceleration_right",
    "acceleration_forward",
    "command_0",
    "command_1",
    "command_2",
    "command_3",
)
DECODER_SIZES = {"full": (256, 16), "small": (128, 8), "tiny": (64, 4)}  # decoder (width, heads) per model size


class DVGT2(nn.Module):
    def __init__(
        self,
        size: DVGT1Size = SIZES["full"],
        planning: bool = True,
        patch_size: int = 16,
        max_frames: int = 48,
        decoder_dim: int = 256,
        decoder_heads: int = 16,
        enable_ego_status: bool = False,
        gt_scale_factor: float = 0.1,
        activation_checkpointing: str = "full",
        frames_chunk_size: int | None = None,
    ) -> None:
        """`planning`: DVGT-2 (9 ego tokens, causal, diffusion decoder) or the stage-1 pretrain variant.
        The planning anchors start as zeros: see `TrajectoryPoseDecoder.load_anchors`."""
        super().__init__()
        self.patch_size = patch_size
        self.frames_chunk_size = frames_chunk_size
        self.num_ego_tokens = 1 + (PLANNING_STEPS if planning else 0)
        self.aggregator = Aggregator(
            embed_dim=size.embed_dim,
            depth=size.depth,
            num_heads=size.num_heads,
            backbone_depth=size.backbone_depth,
            patch_size=patch_size,
            num_ego_tokens=self.num_ego_tokens,
            first_frame_tokens=False,
            temporal_embedding=False,
            rope="mrope",
            rope_freq=1000.0,
            causal=planning,
            max_frames=max_frames,
            activation_checkpointing=activation_checkpointing,
        )
        dim_in = 3 * size.embed_dim
        decoder = None
        if planning:
            decoder = TrajectoryPoseDecoder(
                dim=decoder_dim,
                num_heads=decoder_heads,
                future_steps=PLANNING_STEPS,
                ego_status_dim=len(EGO_STATUS_FIELDS),
                gt_scale_factor=gt_scale_factor,
                enable_ego_status=enable_ego_status,
            )
        elif enable_ego_status:
            raise ValueError("model.enable_ego_status needs model.name=dvgt2 (the pretrain model does not plan)")
        self.ego_pose_head = DVGT2EgoHead(
            dim_in, trunk_depth=size.ego_trunk_depth, num_heads=size.num_heads, max_frames=max_frames, decoder=decoder
        )
        self.point_head = DPTHead.of_size(dim_in, size, patch_size)

    @property
    def planning(self) -> bool:
        return self.ego_pose_head.traj_pose_decoder is not None

    def _heads(
        self,
        tokens_list: list[Any],
        patch_start_idx: int,
        image_size: tuple[int, ...],
        ego_tokens: Tensor,
        ego_status: Tensor | None,
        noise: tuple[Tensor, Tensor] | None,
        embedded: bool = False,
    ) -> dict[str, object]:
        tokens_list = unread_dropped(self, tokens_list)
        # The heads run in float32 even under autocast.
        with autocast_off(ego_tokens.device):
            predictions = dict(self.ego_pose_head(ego_tokens, ego_status, noise=noise, embedded=embedded))
            predictions["points"], predictions["points_conf"] = self.point_head(
                tokens_list, image_size, patch_start_idx, frames_chunk_size=self.frames_chunk_size
            )
        return predictions

    def forward(
        self,
        images: Tensor,
        ego_status: Tensor | None = None,
        noise: tuple[Tensor, Tensor] | None = None,
        patch_tokens: Tensor | None = None,
        aggregator_tokens: Sequence[Tensor | None] | None = None,
    ) -> dict[str, object]:
        """images [B, T, V, 3, H, W] (or [T, V, 3, H, W]) in [0, 1]; ego_status [B, T, 8] (EGO_STATUS_FIELDS)
        when the model was built with enable_ego_status.

        DVGT-2: diff_traj_reg_list 2 x [B, T, 20, 8, 3] (per anchor, 8 future steps of [right, forward,
        heading] in the current ego frame), diff_traj_cls_list 2 x [B, T, 20], diff_poses_reg_list
        2 x [B, T, 20, 7] (ego_{t-1} -> ego_t, absT_quaR), diff_poses_cls_list 2 x [B, T, 20].
        Pretrain: relative_ego_pose_enc [B, T, 7], relative_ego_pose_enc_list (1 entry).
        Both: points [B, T, V, H, W, 3] in each frame's own ego frame, points_conf [B, T, V, H, W], and
        in eval mode the input `images`. Outputs are in units of gt_scale_factor (10 m).
        `noise`: the decoder's starting noise (see TrajectoryPoseDecoder.forward), else drawn from the
        global generator. Precomputed by the feature cache (docs/feature-cache.md): `patch_tokens`
        [B, T, V, P, C], the DINOv3 backbone's output for these images, which skips the backbone;
        `aggregator_tokens`, a frozen aggregator's outputs by layer ([B, T, V, N, 3C] where a head reads
        it, else None), which skips the aggregator.
        """
        if images.ndim == 5:
            images = images.unsqueeze(0)
            ego_status = None if ego_status is None else ego_status.unsqueeze(0)
        tokens_list, patch_start_idx = (
            self.aggregator(images, patch_tokens=patch_tokens)
            if aggregator_tokens is None
            else precomputed_outputs(self.aggregator, aggregator_tokens)
        )
        ego_tokens = tokens_list[-1][:, :, :, : self.num_ego_tokens]
        predictions = self._heads(tokens_list, patch_start_idx, images.shape[-2:], ego_tokens, ego_status, noise)
        if not self.training:
            predictions["images"] = images
        return predictions

    def device_map_parts(self) -> dict[str, str]:
        """model.device_map: part -> submodule (the backbone leaves the aggregator the rest of its
        parameters, the trajectory decoder the ego head the rest of its)."""
        parts = {
            "backbone": "aggregator.patch_embed",
            "aggregator": "aggregator",
            "ego_pose_head": "ego_pose_head",
            "point_head": "point_head",
        }
        if self.planning:
            parts["trajectory_decoder"] = "ego_pose_head.traj_pose_decoder"
        return parts

    def pipeline_units(self) -> list[PipelineUnit]:
        """Pipeline units: the aggregator's (embedding, one per depth step), then the heads (the ego head
        reads the model input ego_status when the model takes it)."""

        def heads(carry: Carry) -> dict[str, object]:
            tokens_list: list[Any] = [carry.get(layer_name(i)) for i in range(self.aggregator.depth)]
            ego_tokens = tokens_list[-1][:, :, :, : self.num_ego_tokens]
            image_size = carry["images"].shape[-2:]
            patch_start_idx = self.aggregator.patch_start_idx
            return self._heads(tokens_list, patch_start_idx, image_size, ego_tokens, carry.get("ego_status"), None)

        read = read_layers(self)
        decoder = self.ego_pose_head.traj_pose_decoder
        inputs = ("images", "ego_status") if decoder is not None and decoder.hist_encoding is not None else ("images",)
        heads_unit = PipelineUnit(
            "heads", ("ego_pose_head", "point_head"), (*inputs, *map(layer_name, read)), (), heads
        )
        return [*self.aggregator.pipeline_units("aggregator", read), heads_unit]

    @torch.no_grad()
    def inference(
        self,
        images: Tensor,
        ego_status: Tensor | None = None,
        infer_window: int = 4,
        noise: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, object]:
        """Streaming inference over the frames of `images` [B, T, V, 3, H, W] (or [T, V, 3, H, W]), one at a time.

        Each frame's tokens attend to the cached keys and values of at most `infer_window` - 1 earlier
        frames; the ego head runs over the ego tokens of the current window (Tc = min(t + 1, W)
        frames) and its outputs for the last frame of the window are kept. Returns forward()'s keys
        with T frames each (point maps per frame).

        Like the upstream model, each frame's ego tokens keep the temporal embedding added at every
        step they took part in (the upstream head adds it in place to its cached input): at step
        t >= 1 the head receives [cached frames with their embeddings so far, new frame] and adds
        E[0..Tc-1] again. `noise[t]` is the decoder's noise for step t (shapes [B*Tc, ...]).
        """
        if images.ndim == 5:
            images = images.unsqueeze(0)
            ego_status = None if ego_status is None else ego_status.unsqueeze(0)
        if infer_window < 1:
            raise ValueError(f"infer_window must be at least 1, got {infer_window}")
        caches = [KVCache() for _ in self.aggregator.cross_frame_blocks]
        ego_cache: Tensor | None = None  # [B, Tc, V, E, 3C]: ego tokens of the window, embeddings added
        steps = []
        for t in range(images.shape[1]):
            predictions, ego_cache = self.step(
                images[:, t],
                t,
                caches,
                ego_cache,
                infer_window,
                None if ego_status is None else ego_status[:, max(0, t - infer_window + 1) : t + 1],
                None if noise is None else noise[t],
            )
            steps.append(predictions)
        return _merge_steps(steps)

    def step(
        self,
        frame: Tensor,
        t: int,
        caches: list[KVCache],
        ego_cache: Tensor | None,
        infer_window: int,
        ego_status: Tensor | None = None,
        noise: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[dict[str, object], Tensor]:
        """One streaming step: frame [B, V, 3, H, W] with absolute index t; updates `caches` in place and
        returns (predictions for this frame, the new ego-token cache). ego_status: [B, Tc, 8] of the window."""
        if t >= infer_window:  # the caches hold W frames: keep the last W - 1
            keys = caches[0].keys
            assert keys is not None, "frame t >= infer_window > 0 filled the caches"
            tokens_per_frame = keys.shape[2] // infer_window
            for cache in caches:
                cache.keep_last((infer_window - 1) * tokens_per_frame)
        tokens_list, patch_start_idx = self.aggregator(frame[:, None], kv_caches=caches, first_frame=t)
        ego_tokens = tokens_list[-1][:, :, :, : self.num_ego_tokens]  # [B, 1, V, E, 3C]
        if ego_cache is not None and infer_window > 1:
            ego_tokens = torch.cat([ego_cache[:, -infer_window + 1 :], ego_tokens], dim=1)
        ego_tokens = self.ego_pose_head.add_temporal_embedding(ego_tokens.float())
        predictions = self._heads(
            tokens_list, patch_start_idx, frame.shape[-2:], ego_tokens, ego_status, noise, embedded=True
        )
        predictions = {
            k: [x[:, -1:] for x in v] if isinstance(v, list) else cast(Tensor, v)[:, -1:]
            for k, v in predictions.items()
        }
        if not self.training:
            predictions["images"] = frame[:, None]
        return predictions, ego_tokens


def _merge_steps(steps: list[dict[str, Any]]) -> dict[str, object]:
    """Concatenate per-step outputs (tensors and lists of tensors with a T dim of 1) along T."""
    merged: dict[str, object] = {}
    for key, value in steps[0].items():
        if isinstance(value, list):
            merged[key] = [torch.cat([s[key][i] for s in steps], dim=1) for i in range(len(value))]
        else:
            merged[key] = torch.cat([s[key] for s in steps], dim=1)
    return merged

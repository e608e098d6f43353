"""DVGT-2 ego head: a transformer over the ego tokens of all frames and views of the clip.

Input: the ego tokens of the last aggregator output, [B, T, V, E, 3C] (E = 9: the relative-pose token
and 8 future tokens; E = 1 for the stage-1 pretrain variant). A learned temporal embedding (by frame
index) is added, then LayerNorm, `trunk_depth` blocks over all T*V*E tokens and LayerNorm.
- planning (DVGT-2): frame-causal attention (a token sees its own and earlier frames), an MLP to the
  decoder width, and the truncated-diffusion `TrajectoryPoseDecoder` (trajectories and relative poses
  per anchor);
- pretrain: full attention, the mean over the frame's tokens and an MLP to the 7-D relative pose
  ego_{t-1} -> ego_t (translation, quaternion xyzw; linear activations).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .layers import Block, Mlp
from .trajectory_decoder import POSE_DIM, TrajectoryPoseDecoder


class DVGT2EgoHead(nn.Module):
    def __init__(
        self,
        dim_in: int,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        max_frames: int = 48,
        decoder: TrajectoryPoseDecoder | None = None,
    ) -> None:
        """`decoder` given: the planning head (causal, outputs of the decoder); None: the pretrain head."""
        super().__init__()
        self.temporal_pos_embed = nn.Parameter(torch.empty(1, max_frames, 1, 1, dim_in))  # by frame index
        nn.init.normal_(self.temporal_pos_embed, std=1e-6)
        self.trunk = nn.ModuleList(
            [Block(dim_in, num_heads, init_values=init_values, mlp_ratio=mlp_ratio) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        out_dim = POSE_DIM if decoder is None else cast(nn.Linear, decoder.time_mlp[-1]).out_features
        self.pose_branch = Mlp(dim_in, dim_in // 2, out_dim)
        self.traj_pose_decoder = decoder

    @property
    def causal(self) -> bool:
        return self.traj_pose_decoder is not None

    def add_temporal_embedding(self, ego_tokens: Tensor) -> Tensor:
        """[B, T, V, E, C] + the embedding of frames 0..T-1."""
        T, max_frames = ego_tokens.shape[1], self.temporal_pos_embed.shape[1]
        if max_frames < T:
            raise ValueError(f"the ego head covers at most {max_frames} frames (model.max_frames), got {T}")
        return ego_tokens + self.temporal_pos_embed[:, :T]

    def forward(
        self,
        ego_tokens: Tensor,
        ego_status: Tensor | None = None,
        noise: tuple[Tensor, Tensor] | None = None,
        embedded: bool = False,
    ) -> dict[str, object]:
        """ego_tokens [B, T, V, E, C] (`embedded`: the temporal embedding is already added).

        Pretrain: relative_ego_pose_enc [B, T, 7] and relative_ego_pose_enc_list (1 entry).
        Planning: the decoder's outputs (see TrajectoryPoseDecoder.forward; `ego_status`, `noise` go there).
        """
        x = ego_tokens.float() if embedded else self.add_temporal_embedding(ego_tokens.float())
        x = self.token_norm(x)
        B, T, V, E, C = x.shape
        x = x.reshape(B, T * V * E, C)
        mask = None
        if self.causal and T > 1:
            frame = torch.arange(T, device=x.device).repeat_interleave(V * E)
            mask = frame[:, None] >= frame[None, :]  # [T*V*E, T*V*E], True = may attend
        for block in self.trunk:
            x = block(x, attn_mask=mask)
        x = x.view(B, T, V * E, C)

        if self.traj_pose_decoder is None:
            pose = self.pose_branch(self.trunk_norm(x.mean(dim=2)))  # [B, T, 7]
            return {"relative_ego_pose_enc": pose, "relative_ego_pose_enc_list": [pose]}
        latent = self.pose_branch(self.trunk_norm(x)).view(B, T, V, E, -1)  # [B, T, V, E, D]
        return self.traj_pose_decoder(latent, ego_status, noise=noise)

"""Ego-pose head: iteratively refines a 7-D pose per frame (absT_quaR: translation, quaternion xyzw).

Input is the ego token (token 0) of the last aggregator output, averaged over the views of each
frame. Each iteration embeds the current pose estimate (a learned "empty" pose at first), uses it
to modulate the normalised frame tokens (adaLN: shift, scale, gate), runs a small transformer over
the T frames and adds the predicted delta to the estimate.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .layers import Block, Mlp

POSE_DIM = 7  # translation (3) + quaternion (4), scalar last


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class EgoPoseHead(nn.Module):
    def __init__(
        self,
        dim_in: int,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        num_iterations: int = 4,
    ) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, init_values=init_values, mlp_ratio=mlp_ratio) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(POSE_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_DIM)

    def forward(self, tokens_list: List[Tensor]) -> List[Tensor]:
        """tokens_list: aggregator outputs [B, T, V, N, dim_in] -> one pose [B, T, 7] per iteration."""
        tokens = tokens_list[-1][:, :, :, 0].float().mean(dim=2)  # ego token averaged over views: [B, T, dim_in]
        tokens = self.token_norm(tokens)

        B, T, _ = tokens.shape
        pose = None
        poses = []
        for _ in range(self.num_iterations):
            if pose is None:
                pose_embedding = self.embed_pose(self.empty_pose_tokens.expand(B, T, -1))
            else:
                # No gradient into earlier iterations: each one learns a correction of a fixed estimate.
                pose = pose.detach()
                pose_embedding = self.embed_pose(pose)
            shift, scale, gate = self.poseLN_modulation(pose_embedding).chunk(3, dim=-1)
            x = gate * modulate(self.adaln_norm(tokens), shift, scale) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))  # [B, T, 7]
            pose = delta if pose is None else pose + delta
            poses.append(pose)  # linear activation for both translation and quaternion
        return poses

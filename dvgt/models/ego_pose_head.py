"""Pose head: iteratively refines a pose encoding per frame (DVGT-1) or per image (VGGT's camera head).

Encodings are absT_quaR (7-D: translation, quaternion xyzw) or, for cameras, absT_quaR_FoV (9-D:
then the vertical and horizontal field of view, kept non-negative by a ReLU).

Input is the first special token (ego or camera token, token 0) of the last aggregator output:
averaged over the views of each frame for one ego pose per frame, or taken per image for one camera
pose per image. Each iteration embeds the current pose estimate (a learned "empty" pose at first),
uses it to modulate the normalised tokens (adaLN: shift, scale, gate), runs a small transformer over
the tokens of a clip and adds the predicted delta to the estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, Mlp

POSE_DIM = 7  # translation (3) + quaternion (4), scalar last
CAMERA_POSE_DIM = 9  # POSE_DIM + field of view (vertical, horizontal) in radians


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def activate_pose(pose: Tensor) -> Tensor:
    """Translation and quaternion stay linear; the field-of-view entries (index 7 on) go through a ReLU."""
    if pose.shape[-1] <= POSE_DIM:
        return pose
    return torch.cat([pose[..., :POSE_DIM], F.relu(pose[..., POSE_DIM:])], dim=-1)


class EgoPoseHead(nn.Module):
    def __init__(
        self,
        dim_in: int,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        num_iterations: int = 4,
        pose_dim: int = POSE_DIM,
        per_image: bool = False,  # one pose per image (VGGT cameras) instead of one per frame
    ) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.per_image = per_image
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, pose_dim))
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, init_values=init_values, mlp_ratio=mlp_ratio) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.embed_pose = nn.Linear(pose_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, pose_dim)

    def forward(self, tokens_list: list[Tensor]) -> list[Tensor]:
        """tokens_list: aggregator outputs [B, T, V, N, dim_in] -> one pose per iteration,
        [B, T, pose_dim] (per frame) or [B, T, V, pose_dim] (per image)."""
        tokens = tokens_list[-1][:, :, :, 0].float()  # [B, T, V, dim_in]
        B, T, V, _ = tokens.shape
        tokens = tokens.flatten(1, 2) if self.per_image else tokens.mean(dim=2)  # [B, T*V or T, dim_in]
        tokens = self.token_norm(tokens)

        pose = None
        poses = []
        for _ in range(self.num_iterations):
            if pose is None:
                pose_embedding = self.embed_pose(self.empty_pose_tokens.expand(*tokens.shape[:2], -1))
            else:
                # No gradient into earlier iterations: each one learns a correction of a fixed estimate.
                pose = pose.detach()
                pose_embedding = self.embed_pose(pose)
            shift, scale, gate = self.poseLN_modulation(pose_embedding).chunk(3, dim=-1)
            x = gate * modulate(self.adaln_norm(tokens), shift, scale) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))  # [B, T*V or T, pose_dim]
            pose = delta if pose is None else pose + delta
            poses.append(activate_pose(pose))
        return [p.view(B, T, V, -1) for p in poses] if self.per_image else poses

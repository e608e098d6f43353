"""DVGT-2's planning decoder: truncated diffusion over anchors (DiffusionDrive style).

For every frame the decoder refines 20 trajectory anchors (8 future steps x [right, forward]) and
20 past-translation anchors (the ego_{t-1} -> ego_t translation). Anchors live in a normalised space
([-1, 1] per coordinate, from fixed physical ranges); a noisy copy of them is embedded
(sine embedding -> MLP), cross-attends to the frame's ego tokens (trajectory queries to the 8 future
tokens of every view, pose queries to the relative-pose token of every view), is modulated by the
diffusion time, and two heads per query give a score and a correction:
  trajectory  [20, 8, 3]: position = noisy anchor + offset, heading = tanh(.) * pi
  pose        [20, 7]:    translation = noisy anchor + offset, quaternion (xyzw) as predicted.

Training noises the anchors at a random diffusion step t < 50 and decodes once. Inference starts
from the anchors noised at t = 10 and runs two DDIM steps (t = 10, then 0); the outputs are those
of the last step. Noise comes from the global torch generator (or is passed in), so a seed makes
the outputs deterministic.

Anchors come from k-means over a training set (the official anchor files, or `dvgt anchors`);
`set_anchors` takes them (dvgt.models.build_model reads model.anchor_dir).
Until then they are zeros (every anchor the same), as upstream builds the model without the file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .layers import CrossAttentionBlock

NUM_ANCHORS = 20
POSE_DIM = 7  # translation (3) + quaternion xyzw (4)
# Physical ranges (metres) that map anchors and predictions to [-1, 1]; scaled by gt_scale_factor.
TRAJ_RANGE = ((-28.9, -7.4), (33.7, 137.2))  # (min, max) of [right, forward]
POSE_TRANSLATION_RANGE = ((-1.3, -0.7, -17.7), (1.5, 0.8, 1.0))  # (min, max) of [x, y, z]


class DDIM:
    """The two formulas of a DDIM sampler (eta = 0, model predicts the clean sample) that the decoder needs.

    Betas follow diffusers' "scaled_linear" schedule over 1000 steps; `step` matches diffusers'
    DDIMScheduler.step with its defaults (clip_sample to [-1, 1], final alpha 1).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> None:
        # on the CPU even when the model is built under a meta default device
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32, device="cpu") ** 2
        )
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [1000]

    def add_noise(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x, noise [B, ...], t [B] integer -> sqrt(a_t) x + sqrt(1 - a_t) noise."""
        alpha = self.alphas_cumprod.to(x.device)[t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return alpha**0.5 * x + (1 - alpha) ** 0.5 * noise

    def step(self, clean: Tensor, t: int, prev_t: int, sample: Tensor) -> Tensor:
        """The sample at step prev_t, given the predicted clean sample at step t (deterministic)."""
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        epsilon = (sample - alpha**0.5 * clean) / (1 - alpha) ** 0.5
        return alpha_prev**0.5 * clean.clamp(-1, 1) + (1 - alpha_prev) ** 0.5 * epsilon


def sine_embedding(x: Tensor, dim: int) -> Tensor:
    """[..., D] -> [..., D * dim]: per coordinate, sin/cos of 2*pi*x at `dim` frequencies 10000^(-2i/dim) (DAB-DETR)."""
    dim_t = torch.arange(dim, dtype=torch.float32, device=x.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / dim)
    angles = x[..., None] * (2 * math.pi) / dim_t  # [..., D, dim]
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return embedding.flatten(-2)


def _linear_relu_ln(dim: int, in_dim: int, repeats: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(repeats):
        layers += [nn.Linear(in_dim, dim), nn.ReLU(), nn.LayerNorm(dim)]
        in_dim = dim
    return layers


class SinusoidalEmbedding(nn.Module):
    """[B] integer diffusion steps -> [B, dim]: sin then cos at frequencies 10000^(-i/(dim/2 - 1))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        frequencies = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t[:, None] * frequencies[None]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Modulation(nn.Module):
    """x * (1 + scale) + shift, with (scale, shift) = Linear(Mish(condition))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_shift_mlp = nn.Sequential(nn.Mish(), nn.Linear(dim, dim * 2))

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        scale, shift = self.scale_shift_mlp(condition).chunk(2, dim=-1)
        return x * (1 + scale) + shift


class ScoreAndOffsetHead(nn.Module):
    """Per query [B, M, D] -> (offsets [B, M, *output_shape], score [B, M])."""

    def __init__(self, dim: int, output_shape: Sequence[int]) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        hidden = _linear_relu_ln(dim, dim, 2)
        score = nn.Linear(dim, 1)
        self.cls_branch = nn.Sequential(*hidden, score)
        self.reg_branch = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, math.prod(output_shape))
        )
        nn.init.constant_(score.bias, -math.log((1 - 0.01) / 0.01))  # prior score 0.01

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, M, _ = x.shape
        return self.reg_branch(x).view(B, M, *self.output_shape), self.cls_branch(x).squeeze(-1)


class DecoderLayer(nn.Module):
    """Trajectory and pose queries: cross-attention to the ego tokens, time modulation, scores and refined positions."""

    def __init__(self, dim: int, num_heads: int, future_steps: int, init_values: float, drop: float) -> None:
        super().__init__()
        self.traj_attn = CrossAttentionBlock(dim, num_heads, init_values=init_values, drop=drop)
        self.pose_attn = CrossAttentionBlock(dim, num_heads, init_values=init_values, drop=drop)
        self.traj_time_modulation = Modulation(dim)
        self.pose_time_modulation = Modulation(dim)
        self.traj_decoder = ScoreAndOffsetHead(dim, (future_steps, 3))
        self.pose_decoder = ScoreAndOffsetHead(dim, (POSE_DIM,))

    def forward(
        self,
        traj_feature: Tensor,  # [b, 20, D]
        pose_feature: Tensor,  # [b, 20, D]
        past_tokens: Tensor,  # [b, V, D]
        future_tokens: Tensor,  # [b, 8V, D]
        traj: Tensor,  # [b, 20, 8, 2] physical
        pose_translation: Tensor,  # [b, 20, 3] physical
        time_embed: Tensor,  # [b, 1, D]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pose_feature = self.pose_time_modulation(self.pose_attn(pose_feature, past_tokens), time_embed)
        traj_feature = self.traj_time_modulation(self.traj_attn(traj_feature, future_tokens), time_embed)
        traj_offset, traj_score = self.traj_decoder(traj_feature)
        pose_offset, pose_score = self.pose_decoder(pose_feature)
        traj_out = torch.cat([traj_offset[..., :2] + traj, traj_offset[..., 2:].tanh() * math.pi], dim=-1)
        pose_out = torch.cat([pose_offset[..., :3] + pose_translation, pose_offset[..., 3:]], dim=-1)
        return traj_out, traj_score, pose_out, pose_score


class TrajectoryPoseDecoder(nn.Module):
    INFERENCE_STEPS = (10, 0)  # DDIM steps at inference (DiffusionDrive: trained on t < 50, sampled from 10)
    # persistent buffers (register_buffer; declared for the type checker)
    norm_traj_anchor: Tensor  # [1, K, future_steps, 2]
    traj_max: Tensor  # [2]
    traj_min: Tensor  # [2]
    norm_pose_translation_anchor: Tensor  # [1, K, 3]
    pose_translation_max: Tensor  # [3]
    pose_translation_min: Tensor  # [3]

    def __init__(
        self,
        future_steps: int,
        ego_status_dim: int,
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 16,
        init_values: float = 0.01,
        drop: float = 0.1,
        truncated_noise_steps: int = 50,
        gt_scale_factor: float = 0.1,
        enable_ego_status: bool = False,
    ) -> None:
        super().__init__()
        self.future_steps = future_steps
        self.ego_status_dim = ego_status_dim
        self.truncated_noise_steps = truncated_noise_steps
        self.gt_scale_factor = gt_scale_factor
        self.scheduler = DDIM()

        # Normalised anchors and the fixed physical ranges, all in the checkpoint (set by reset_buffers).
        self.register_buffer("norm_traj_anchor", torch.empty(1, NUM_ANCHORS, future_steps, 2))
        self.register_buffer("traj_max", torch.empty(2))
        self.register_buffer("traj_min", torch.empty(2))
        self.register_buffer("norm_pose_translation_anchor", torch.empty(1, NUM_ANCHORS, 3))
        self.register_buffer("pose_translation_max", torch.empty(3))
        self.register_buffer("pose_translation_min", torch.empty(3))
        self.reset_buffers()

        # Ego status (see dvgt2.EGO_STATUS_FIELDS) conditions the trajectory queries.
        self.hist_encoding = nn.Linear(ego_status_dim, dim) if enable_ego_status else None
        self.traj_feature_proj = nn.Sequential(*_linear_relu_ln(dim, 2 * dim, 1), nn.Linear(dim, dim))
        self.pose_feature_proj = nn.Sequential(*_linear_relu_ln(dim, 3 * dim, 1), nn.Linear(dim, dim))
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim)
        )
        layer = DecoderLayer(dim, num_heads, future_steps, init_values, drop)
        self.diff_decoder = nn.ModuleDict({"layers": nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])})

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The fixed ranges (constants x gt_scale_factor) and all-zero anchors (upstream's value without anchor files)."""
        for name, values in (
            ("traj_min", TRAJ_RANGE[0]),
            ("traj_max", TRAJ_RANGE[1]),
            ("pose_translation_min", POSE_TRANSLATION_RANGE[0]),
            ("pose_translation_max", POSE_TRANSLATION_RANGE[1]),
        ):
            buffer = getattr(self, name)
            buffer.copy_(torch.tensor(values, dtype=torch.float32, device=buffer.device) * self.gt_scale_factor)
        self.set_anchors(torch.zeros(self.norm_traj_anchor.shape[1:]), torch.zeros(NUM_ANCHORS, 3))

    @staticmethod
    def normalize(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        return 2 * (x - low) / (high - low + 1e-6) - 1

    @staticmethod
    def denormalize(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        return (x + 1) / 2 * (high - low + 1e-6) + low

    @torch.no_grad()
    def set_anchors(self, trajectory: Tensor, pose_translation: Tensor) -> None:
        """Anchors in metres: trajectory [20, 8, 2] ([right, forward]), pose_translation [20, 3]."""
        expected = {"trajectory": tuple(self.norm_traj_anchor.shape[1:]), "pose_translation": (NUM_ANCHORS, 3)}
        for name, value in (("trajectory", trajectory), ("pose_translation", pose_translation)):
            if tuple(value.shape) != expected[name]:
                raise ValueError(
                    f"anchor array '{name}' has shape {list(value.shape)}, expected {list(expected[name])}"
                )
        device = self.norm_traj_anchor.device
        traj = trajectory.to(device, torch.float32)[None] * self.gt_scale_factor
        pose = pose_translation.to(device, torch.float32)[None] * self.gt_scale_factor
        self.norm_traj_anchor.copy_(self.normalize(traj, self.traj_min, self.traj_max))
        self.norm_pose_translation_anchor.copy_(
            self.normalize(pose, self.pose_translation_min, self.pose_translation_max)
        )

    def forward(
        self, ego_tokens: Tensor, ego_status: Tensor | None = None, noise: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, list[Tensor]]:
        """ego_tokens [B, T, V, 1 + 8, D] (relative-pose token, then the future tokens); ego_status [B, T, 8].

        Returns diff_traj_reg_list L x [B, T, 20, 8, 3], diff_traj_cls_list L x [B, T, 20],
        diff_poses_reg_list L x [B, T, 20, 7], diff_poses_cls_list L x [B, T, 20] (one entry per decoder
        layer). `noise` = (trajectory [B*T, 20, 8, 2], pose [B*T, 20, 3]) replaces the draws from the
        global generator, which are made in that order (after the training time steps).
        """
        B, T = ego_tokens.shape[:2]
        tokens = ego_tokens.flatten(0, 1)  # [b, V, 9, D], b = B*T
        b = tokens.shape[0]
        traj_anchor = self.norm_traj_anchor.expand(b, -1, -1, -1)
        pose_anchor = self.norm_pose_translation_anchor.expand(b, -1, -1)
        if self.training:
            t = torch.randint(0, self.truncated_noise_steps, (b,), device=tokens.device)
        else:
            t = torch.full((b,), self.INFERENCE_STEPS[0], device=tokens.device, dtype=torch.long)
        traj_noise, pose_noise = (
            noise if noise is not None else (torch.randn_like(traj_anchor), torch.randn_like(pose_anchor))
        )
        noisy_traj = self.scheduler.add_noise(traj_anchor, traj_noise, t)
        noisy_pose = self.scheduler.add_noise(pose_anchor, pose_noise, t)

        if self.training:
            outputs = self._decode(tokens, ego_status, noisy_traj, noisy_pose, t)
        else:
            outputs = self._denoise(tokens, ego_status, noisy_traj, noisy_pose)
        return {f"diff_{key}_list": [v.view(B, T, *v.shape[1:]) for v in values] for key, values in outputs.items()}

    @torch.no_grad()
    def _denoise(self, tokens: Tensor, ego_status: Tensor | None, noisy_traj: Tensor, noisy_pose: Tensor):
        step_size = self.INFERENCE_STEPS[0] - self.INFERENCE_STEPS[1]
        for step in self.INFERENCE_STEPS:
            t = torch.full((tokens.shape[0],), step, device=tokens.device, dtype=torch.long)
            outputs = self._decode(tokens, ego_status, noisy_traj, noisy_pose, t)
            clean_traj = self.normalize(outputs["traj_reg"][-1][..., :2], self.traj_min, self.traj_max)
            clean_pose = self.normalize(
                outputs["poses_reg"][-1][..., :3], self.pose_translation_min, self.pose_translation_max
            )
            noisy_traj = self.scheduler.step(clean_traj, step, step - step_size, noisy_traj.clamp(-1, 1))
            noisy_pose = self.scheduler.step(clean_pose, step, step - step_size, noisy_pose.clamp(-1, 1))
        return outputs

    def _decode(
        self, tokens: Tensor, ego_status: Tensor | None, noisy_traj: Tensor, noisy_pose: Tensor, t: Tensor
    ) -> dict[str, list[Tensor]]:
        """All decoder layers, from normalised noisy anchors [b, 20, 8, 2] / [b, 20, 3] at steps t [b]."""
        b, D = tokens.shape[0], tokens.shape[-1]
        past_tokens = tokens[:, :, :1].reshape(b, -1, D)  # the relative-pose token of each view: [b, V, D]
        future_tokens = tokens[:, :, 1:].reshape(b, -1, D)  # [b, 8V, D]
        traj = self.denormalize(noisy_traj.clamp(-1, 1), self.traj_min, self.traj_max)  # physical
        pose = self.denormalize(noisy_pose.clamp(-1, 1), self.pose_translation_min, self.pose_translation_max)

        traj_feature = self.traj_feature_proj(sine_embedding(traj, D // self.future_steps).flatten(-2))  # [b, 20, D]
        pose_feature = self.pose_feature_proj(sine_embedding(pose, D))
        if self.hist_encoding is not None:
            if ego_status is None:
                raise ValueError(
                    "this model conditions on the ego status (model.enable_ego_status): pass ego_status [B, T, 8]"
                )
            traj_feature = traj_feature + self.hist_encoding(ego_status.reshape(b, 1, self.ego_status_dim))
        time_embed = self.time_mlp(t)[:, None]  # [b, 1, D]

        outputs: dict[str, list[Tensor]] = {key: [] for key in ("traj_reg", "traj_cls", "poses_reg", "poses_cls")}
        for layer in cast(nn.ModuleList, self.diff_decoder["layers"]):
            results = layer(traj_feature, pose_feature, past_tokens, future_tokens, traj, pose, time_embed)
            for key, value in zip(outputs, results):
                outputs[key].append(value)
            # the next layer refines these positions (its features still come from the noisy anchors)
            traj, pose = results[0][..., :2].detach(), results[2][..., :3].detach()
        return outputs

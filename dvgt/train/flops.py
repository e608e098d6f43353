"""Model FLOPs of a training step, counted analytically, and the peak that turns them into MFU.

Convention (model FLOPs, as in the PaLM paper's MFU and torchtitan):
- counted: the multiply-adds of every matmul and convolution with weights (2 FLOPs each) and of
  attention (Q K^T and A V, over every key a query may see; a boolean mask is a dense kernel, so
  masked-out pairs are counted too); not counted: norms, activations, RoPE, interpolation, losses;
- forward x 1; the backward of a part adds x 1 for the gradients of its weights (if it has trainable
  parameters) and x 1 for the gradients of its inputs (if a gradient flows through it: it is trainable
  or a part before it is). Attention has no weights: its backward is x 2 whenever a gradient flows. An
  op whose input never needs a gradient (the patch convolution on the images, the planning decoder's
  embeddings of its noisy anchors) has no input-gradient term;
- activation recomputation (model.activation_checkpointing) is NOT counted: these are the FLOPs the
  model needs, not what the hardware executes (hardware FLOPs), so MFU does not reward recomputing;
- a part served by the feature cache (data.feature_cache) is not run and not counted.

The parts are the backbone (aggregator.patch_embed), the aggregator's blocks, the pose head and the
point head. `StepFlops(model, ...)(B, T, V, H, W)` counts one optimizer step of B clips; every term is
linear in B, so accumulation chunks add up to the same count. Each shape is computed once (cached).
tests/test_flops.py checks the count against torch.utils.flop_counter.FlopCounterMode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import nn

# Dense (no sparsity) bfloat16 tensor-core peak of one GPU, in TFLOP/s, matched in order on
# torch.cuda.get_device_name() (most specific names first: "H200" before "H20"). Sources: NVIDIA's
# datasheets (H100 and H200 Tensor Core GPU, A100, L40S, L40, L4, HGX/DGX B200 and GB200 NVL72 pages,
# whose "with sparsity" figures are halved here) and AMD's MI300X datasheet; the H20 and H800 have no
# public datasheet: the widely reported 148 and the H100 SXM's 989. logging.peak_tflops overrides it.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("MI300X", 1307.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name (torch.cuda.get_device_name()), None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def device_peak_flops(device, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the value comes from) for MFU: the override, else the
    table on a CUDA device; a CPU has no peak (MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12, f"logging.peak_tflops={override_tflops:g}"
    if getattr(device, "type", "cpu") != "cuda":
        return None, "a CPU has no peak: set logging.peak_tflops to report MFU"
    import torch

    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        return None, f"'{name}' is not in dvgt/train/flops.py's table: set logging.peak_tflops to report MFU"
    return tflops * 1e12, f"{name}, dense bf16"


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of a part, split by how their backward is counted."""

    weights: float = 0.0  # matmuls and convolutions with weights
    attention: float = 0.0  # Q K^T and A V
    leaf: float = 0.0  # the part of `weights` whose input never needs a gradient

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.weights + other.weights, self.attention + other.attention, self.leaf + other.leaf)

    def __mul__(self, times: float) -> Flops:
        return Flops(self.weights * times, self.attention * times, self.leaf * times)

    @property
    def forward(self) -> float:
        return self.weights + self.attention

    def training(self, trainable: bool, gradient_flows: bool) -> float:
        """Forward + backward FLOPs (see the module docstring)."""
        total = self.forward
        if trainable:
            total += self.weights
        if trainable or gradient_flows:
            total += self.weights - self.leaf + 2 * self.attention
        return total


def linear(tokens: float, fan_in: int, fan_out: int, leaf: bool = False) -> Flops:
    flops = 2.0 * tokens * fan_in * fan_out
    return Flops(weights=flops, leaf=flops if leaf else 0.0)


def conv(output_pixels: float, c_in: int, c_out: int, kernel: int, leaf: bool = False) -> Flops:
    """A convolution (or a transposed one, counted over its input pixels as torch's counter does)."""
    return linear(output_pixels * kernel * kernel, c_in, c_out, leaf)


def self_attention_block(block: Any, sequences: float, tokens: int, keys: int | None = None) -> Flops:
    """A `layers.Block` over `sequences` sequences of `tokens` tokens, each attending to `keys` keys."""
    dim, hidden = block.attn.qkv.in_features, block.mlp.fc1.out_features
    rows = sequences * tokens
    return (
        linear(rows, dim, 3 * dim)
        + linear(rows, dim, dim)
        + linear(rows, dim, hidden)
        + linear(rows, hidden, dim)
        + Flops(attention=4.0 * rows * (keys or tokens) * dim)
    )


def cross_attention_block(block: Any, sequences: float, queries: int, keys: int) -> Flops:
    """A `layers.CrossAttentionBlock`: `queries` queries over `keys` context tokens, per sequence."""
    dim, hidden = block.attn.q_proj.in_features, block.mlp.fc1.out_features
    rows = sequences * queries
    return (
        linear(rows, dim, dim)
        + linear(sequences * keys, dim, 2 * dim)
        + linear(rows, dim, dim)
        + linear(rows, dim, hidden)
        + linear(rows, hidden, dim)
        + Flops(attention=4.0 * rows * keys * dim)
    )


def mlp(module: Any, rows: float, leaf_first: bool = False) -> Flops:
    """The nn.Linear layers of a module, in order, on `rows` rows (the first may be a leaf)."""
    flops = Flops()
    for i, layer in enumerate(m for m in module.modules() if isinstance(m, nn.Linear)):
        flops += linear(rows, layer.in_features, layer.out_features, leaf=leaf_first and i == 0)
    return flops


# -- the parts --------------------------------------------------------------------------------------


def backbone_flops(backbone: Any, images: int, patches: int) -> Flops:
    """DINOv3 / DINOv2: the patch convolution (on the images: no input gradient), then its blocks over
    [CLS, registers or storage tokens, patches]."""
    p, conv_layer = backbone.patch_size, backbone.patch_embed.proj
    tokens = backbone.n_prefix_tokens + patches
    flops = conv(images * patches, conv_layer.in_channels, conv_layer.out_channels, p, leaf=True)
    for block in backbone.blocks:
        flops += self_attention_block(block, images, tokens)
    return flops


def aggregator_flops(aggregator: Any, B: int, T: int, V: int, patches: int) -> Flops:
    """DVGT's intra-view / cross-view / cross-frame blocks, or VGGT's frame / global blocks."""
    N = aggregator.patch_start_idx + patches  # tokens per image
    flops = Flops()
    if hasattr(aggregator, "intra_view_blocks"):
        for intra, view, frame in zip(
            aggregator.intra_view_blocks, aggregator.cross_view_blocks, aggregator.cross_frame_blocks
        ):
            flops += self_attention_block(intra, B * T * V, N)
            flops += self_attention_block(view, B * T, V * N)
            flops += self_attention_block(frame, B * V, T * N)
    else:
        for frame, global_ in zip(aggregator.frame_blocks, aggregator.global_blocks):
            flops += self_attention_block(frame, B * T * V, N)
            flops += self_attention_block(global_, B, T * V * N)
    return flops


def pose_head_flops(head: Any, B: int, T: int, V: int, ego_tokens: int = 1) -> Flops:
    """ego_pose_head.EgoPoseHead (DVGT-1, VGGT's camera head) or dvgt2_head.DVGT2EgoHead (over the
    `ego_tokens` ego tokens of each image)."""
    if hasattr(head, "num_iterations"):  # iterative refinement over one token per frame (or image)
        tokens = T * V if head.per_image else T
        rows = B * tokens
        iteration = (
            linear(rows, head.embed_pose.in_features, head.embed_pose.out_features, leaf=True)
            + mlp(head.poseLN_modulation, rows)
            + mlp(head.pose_branch, rows)
        )
        for block in head.trunk:
            iteration += self_attention_block(block, B, tokens)
        return iteration * head.num_iterations
    decoder = head.traj_pose_decoder
    tokens = T * V * ego_tokens
    flops = Flops()
    for block in head.trunk:
        flops += self_attention_block(block, B, tokens)
    flops += mlp(head.pose_branch, B * (T if decoder is None else tokens))
    if decoder is not None:
        flops += planning_decoder_flops(decoder, B * T, V)
    return flops


def planning_decoder_flops(decoder: Any, frames: int, V: int) -> Flops:
    """trajectory_decoder.TrajectoryPoseDecoder in training (one decoding pass) for `frames` = B*T."""
    queries = decoder.norm_traj_anchor.shape[1]
    future = decoder.future_steps
    flops = mlp(decoder.traj_feature_proj, frames * queries, leaf_first=True)
    flops += mlp(decoder.pose_feature_proj, frames * queries, leaf_first=True)
    flops += mlp(decoder.time_mlp, frames, leaf_first=True)
    if decoder.hist_encoding is not None:
        flops += mlp(decoder.hist_encoding, frames, leaf_first=True)
    for layer in decoder.diff_decoder["layers"]:
        flops += cross_attention_block(layer.traj_attn, frames, queries, future * V)
        flops += cross_attention_block(layer.pose_attn, frames, queries, V)
        flops += mlp(layer.traj_time_modulation, frames) + mlp(layer.pose_time_modulation, frames)
        flops += mlp(layer.traj_decoder, frames * queries) + mlp(layer.pose_decoder, frames * queries)
    return flops


def point_head_flops(head: Any, images: int, H: int, W: int) -> Flops:
    """dpt_head.DPTHead: projections to 4 scales, RefineNet fusion, the output convolutions at full size."""
    h, w = H // head.patch_size, W // head.patch_size
    dim_in = head.norm.normalized_shape[0]
    c = [project.out_channels for project in head.projects]
    features = head.scratch.layer1_rn.out_channels
    h4, w4 = (h + 1) // 2, (w + 1) // 2  # the stride-2 convolution's output
    sizes = [16 * h * w, 4 * h * w, h * w, h4 * w4]  # pixels of the 4 scales (x4, x2, x1, x1/2 of the grid)
    flops = Flops()
    for channels, size in zip(c, sizes):
        flops += conv(images * h * w, dim_in, channels, 1)  # projection
        flops += conv(images * size, channels, features, 3)  # layer{i}_rn
    flops += conv(images * h * w, c[0], c[0], 4) + conv(images * h * w, c[1], c[1], 2)  # transposed, stride 4 and 2
    flops += conv(images * h4 * w4, c[3], c[3], 3)  # stride 2
    unit = conv(1, features, features, 3) * 2  # a ResidualConvUnit per pixel
    # refinenet4: 1 unit at x1/2, out conv at x1; refinenet3, 2: 2 units, out conv one scale up; refinenet1:
    # 2 units at x4, out conv at x8
    flops += unit * (images * sizes[3]) + conv(images * sizes[2], features, features, 1)
    flops += unit * (2 * images * sizes[2]) + conv(images * sizes[1], features, features, 1)
    flops += unit * (2 * images * sizes[1]) + conv(images * sizes[0], features, features, 1)
    flops += unit * (2 * images * sizes[0]) + conv(images * 4 * sizes[0], features, features, 1)
    flops += conv(images * 4 * sizes[0], features, features // 2, 3)  # output_conv1 at x8
    out1, out2 = head.scratch.output_conv2[0], head.scratch.output_conv2[2]
    flops += conv(images * H * W, out1.in_channels, out1.out_channels, 3)
    flops += conv(images * H * W, out2.in_channels, out2.out_channels, 1)
    return flops


# -- one training step ------------------------------------------------------------------------------

BACKBONE, AGGREGATOR, POSE_HEAD, POINT_HEAD = "aggregator.patch_embed", "aggregator", "pose_head", "point_head"


class StepFlops:
    """Model FLOPs of one training step of `model` (DVGT1, DVGT2, VGGT) per input shape.

    `frozen`: names of the parameters that get no gradient; `skipped`: the part served by the feature
    cache ("backbone" or "aggregator", which includes the backbone), or None.
    """

    def __init__(self, model: nn.Module, frozen: Iterable[str] = (), skipped: str | None = None) -> None:
        self.model: Any = model  # its parts are read by name
        self.pose_head_name = "camera_head" if hasattr(model, "camera_head") else "ego_pose_head"
        frozen = set(frozen)
        names = [name for name, _ in model.named_parameters()]

        def trainable(prefix: str, exclude: str | None = None) -> bool:
            return any(
                n not in frozen for n in names if n.startswith(prefix + ".") and not (exclude and n.startswith(exclude))
            )

        self.trainable = {
            BACKBONE: trainable(BACKBONE),
            AGGREGATOR: trainable(AGGREGATOR, exclude=BACKBONE + "."),
            POSE_HEAD: trainable(self.pose_head_name),
            POINT_HEAD: trainable("point_head"),
        }
        self.skipped = {None: (), "backbone": (BACKBONE,), "aggregator": (BACKBONE, AGGREGATOR)}[skipped]
        self._count = lru_cache(maxsize=256)(self._training_flops)

    def forward_parts(self, B: int, T: int, V: int, H: int, W: int) -> dict[str, Flops]:
        """Forward FLOPs of each part for B clips of T frames x V views of H x W images."""
        model = self.model
        p = model.patch_size
        patches = (H // p) * (W // p)
        return {
            BACKBONE: backbone_flops(model.aggregator.patch_embed, B * T * V, patches),
            AGGREGATOR: aggregator_flops(model.aggregator, B, T, V, patches),
            POSE_HEAD: pose_head_flops(
                getattr(model, self.pose_head_name), B, T, V, getattr(model, "num_ego_tokens", 1)
            ),
            POINT_HEAD: point_head_flops(model.point_head, B * T * V, H, W),
        }

    def forward(self, B: int, T: int, V: int, H: int, W: int) -> float:
        """Forward FLOPs of the parts that run (the feature cache's part does not)."""
        parts = self.forward_parts(B, T, V, H, W)
        return sum(flops.forward for name, flops in parts.items() if name not in self.skipped)

    def _training_flops(self, B: int, T: int, V: int, H: int, W: int) -> float:
        parts = self.forward_parts(B, T, V, H, W)
        total, upstream_trainable = 0.0, False
        for name in (BACKBONE, AGGREGATOR):  # in order: a gradient flows back through a part after a trainable one
            if name not in self.skipped:
                total += parts[name].training(self.trainable[name], upstream_trainable)
                upstream_trainable |= self.trainable[name]
        for name in (POSE_HEAD, POINT_HEAD):  # both read the aggregator's outputs
            total += parts[name].training(self.trainable[name], upstream_trainable)
        return total

    def __call__(self, B: int, T: int, V: int, H: int, W: int) -> float:
        """Model FLOPs of one training step (forward and backward), cached per shape."""
        return self._count(int(B), int(T), int(V), int(H), int(W))

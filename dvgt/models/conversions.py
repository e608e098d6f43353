"""Weight conversions between architectures, for `checkpoint.load_pretrained_weights_path`.

Pure functions from one state_dict to another (the mapping of the reference README):
- VGGT-1B -> DVGT-1: frame blocks -> intra-view blocks; global blocks -> both cross-view and
  cross-frame blocks; camera token -> ego-pose token; register token kept. All else is dropped:
  the DINOv3 backbone comes from its own file (model.dino_v3_weight_path), heads and the temporal
  embedding keep their initialisation.
- VGGT-1B -> DVGT-2 (either stage): the two block rules only (DVGT-2's tokens have other shapes).
- DVGT-2 stage 1 -> stage 2: the single ego token gets 8 new future tokens, N(0, 1e-6), appended;
  the stage-1 ego-pose head is dropped; everything else is copied.

Each family declares the conversions into it (dvgt/families/); `dvgt.families.initialise_from_pretrained`
detects the source layout from its keys and applies the target family's. Converted tensors share memory with
the source (no copy of a 1B model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dvgt2 import PLANNING_STEPS  # stage 2's ego tokens: 1 relative-pose token + one per planned step

VGGT, DVGT2_STAGE1 = "VGGT-1B", "DVGT-2 stage 1"
NEW_TOKEN_STD = 1e-6

# VGGT block stack -> the DVGT stacks it initialises.
BLOCK_RULES = {
    "aggregator.frame_blocks.": ("aggregator.intra_view_blocks.",),
    "aggregator.global_blocks.": ("aggregator.cross_view_blocks.", "aggregator.cross_frame_blocks."),
}
DVGT1_TOKEN_RULES = {
    "aggregator.camera_token": "aggregator.ego_pose_token",  # [1, 2, 1, C] in both
    "aggregator.register_token": "aggregator.register_token",  # [1, 2, 4, C] in both
}


@dataclass
class Conversion:
    source: str  # VGGT or DVGT2_STAGE1
    description: str  # the rules applied, for the log
    state: dict[str, Tensor]  # in the target's key names
    dropped: list[str] = field(default_factory=list)  # source keys the mapping does not use


def _map_keys(
    state: Mapping[str, Tensor], renames: Mapping[str, tuple[str, ...]]
) -> tuple[dict[str, Tensor], list[str]]:
    """Copy each key that starts with a prefix of `renames` to every target prefix; the rest is dropped."""
    converted, dropped = {}, []
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            dropped.append(key)
            continue
        for target in renames[prefix]:
            converted[target + key[len(prefix) :]] = value
    return converted, dropped


def vggt_to_dvgt1(state: Mapping[str, Tensor]) -> Conversion:
    renames = {**BLOCK_RULES, **{k: (v,) for k, v in DVGT1_TOKEN_RULES.items()}}
    converted, dropped = _map_keys(state, renames)
    return Conversion(
        VGGT,
        "VGGT-1B -> DVGT-1: frame blocks -> intra-view, global blocks -> cross-view and "
        "cross-frame, camera token -> ego-pose token, register token kept",
        converted,
        dropped,
    )


def vggt_to_dvgt2(state: Mapping[str, Tensor]) -> Conversion:
    converted, dropped = _map_keys(state, BLOCK_RULES)
    return Conversion(
        VGGT,
        "VGGT-1B -> DVGT-2: frame blocks -> intra-view, global blocks -> cross-view and "
        "cross-frame (tokens not copied)",
        converted,
        dropped,
    )


def dvgt2_stage1_to_stage2(state: Mapping[str, Tensor]) -> Conversion:
    """New tokens are drawn from the global generator (the trainer seeds it)."""
    token = state["aggregator.ego_pose_token"]  # [1, 1, C]
    future = torch.randn(token.shape[0], PLANNING_STEPS, token.shape[2], dtype=token.dtype, device=token.device)
    converted = {k: v for k, v in state.items() if not k.startswith("ego_pose_head.")}
    converted["aggregator.ego_pose_token"] = torch.cat([token, future * NEW_TOKEN_STD], dim=1)  # [1, 9, C]
    dropped = [k for k in state if k.startswith("ego_pose_head.")]
    return Conversion(
        DVGT2_STAGE1,
        f"DVGT-2 stage 1 -> stage 2: ego token + {PLANNING_STEPS} new future "
        "tokens N(0, 1e-6), stage-1 ego-pose head dropped",
        converted,
        dropped,
    )


def detect_source(state: Mapping[str, Tensor]) -> str:
    """VGGT or DVGT2_STAGE1, from the keys (and the ego-token shape) of a state_dict."""
    if "aggregator.camera_token" in state and any(k.startswith("aggregator.global_blocks.") for k in state):
        return VGGT
    token = state.get("aggregator.ego_pose_token")
    if token is not None and token.ndim == 3 and token.shape[1] == 1:
        return DVGT2_STAGE1
    raise ValueError(
        "checkpoint.load_pretrained_weights_path: the weights are neither VGGT-1B (aggregator.camera_token, "
        "aggregator.frame_blocks.*, aggregator.global_blocks.*) nor a DVGT-2 stage-1 checkpoint "
        "(aggregator.ego_pose_token of shape [1, 1, C]); weights of the model's own architecture load with "
        "checkpoint.direct_load_pretrained_weights_path"
    )

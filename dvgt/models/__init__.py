"""Model construction from the `model` section of a training config.

model = build_model(cfg.model)          # cfg.model.name (dvgt1 | dvgt2 | dvgt2_pretrain | vggt) at cfg.model.size
layout = model_layout(cfg.model)        # parameter names and shapes, built on the meta device
parts = model_parts(cfg.model)          # what model.device_map places (part -> submodule path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dvgt1 import DVGT1, SIZES, DVGT1Size
from .dvgt2 import DECODER_SIZES, DVGT2
from .vggt import VGGT
from .weights import LoadReport, WeightsMismatchError, load_weights, read_checkpoint

__all__ = [
    "DVGT1",
    "DVGT1Size",
    "DVGT2",
    "SIZES",
    "VGGT",
    "LoadReport",
    "WeightsMismatchError",
    "build_model",
    "load_weights",
    "model_layout",
    "model_parts",
    "model_skeleton",
    "sample_targets",
    "read_checkpoint",
]


def _make(model_cfg: Any) -> nn.Module:
    """The architecture named by `model_cfg` (an OmegaConf node or a `ModelConfig`), randomly initialised."""
    name = model_cfg.name
    if name not in ("dvgt1", "dvgt2", "dvgt2_pretrain", "vggt"):
        raise ValueError(f"model.name '{name}' is not one of dvgt1, dvgt2, dvgt2_pretrain, vggt")
    if model_cfg.size not in SIZES:
        raise ValueError(f"model.size '{model_cfg.size}' is not one of {', '.join(SIZES)}")
    if getattr(model_cfg, "anchor_dir", None) and name != "dvgt2":
        raise ValueError(f"model.anchor_dir needs model.name=dvgt2 (model '{name}' does not plan)")
    if name == "vggt":
        return VGGT(
            SIZES[model_cfg.size],
            gradient_checkpointing=getattr(model_cfg, "gradient_checkpointing", True),
            frames_chunk_size=getattr(model_cfg, "frames_chunk_size", None),
        )
    if name in ("dvgt2", "dvgt2_pretrain"):
        return DVGT2(
            SIZES[model_cfg.size],
            planning=name == "dvgt2",
            max_frames=getattr(model_cfg, "max_frames", 48),
            decoder_dim=DECODER_SIZES[model_cfg.size][0],
            decoder_heads=DECODER_SIZES[model_cfg.size][1],
            enable_ego_status=getattr(model_cfg, "enable_ego_status", False),
            gradient_checkpointing=getattr(model_cfg, "gradient_checkpointing", True),
            frames_chunk_size=getattr(model_cfg, "frames_chunk_size", None),
        )
    return DVGT1(
        SIZES[model_cfg.size],
        max_frames=getattr(model_cfg, "max_frames", 48),
        gradient_checkpointing=getattr(model_cfg, "gradient_checkpointing", True),
        frames_chunk_size=getattr(model_cfg, "frames_chunk_size", None),
    )


# The optional sample keys (dvgt.data.scene_dataset.TARGETS) each family trains on; evaluation adds the
# ray depth and z-depth maps the metrics and figures read.
TRAINING_TARGETS = {
    "dvgt1": {"points_in_ego_first"},
    "dvgt2": {"points_in_ego_n", "ego_past_to_ego_curr"},
    "dvgt2_pretrain": {"points_in_ego_n", "ego_past_to_ego_curr"},
    "vggt": {"points_in_ego_first", "cam"},
}
EVALUATION_TARGETS = {"ray_depth", "depths"}


def sample_targets(model_cfg: Any, evaluation: bool) -> frozenset:
    """The sample keys the data must produce for this model (training, or evaluation)."""
    targets = set(TRAINING_TARGETS[model_cfg.name])
    if getattr(model_cfg, "enable_ego_status", False):
        targets.add("ego_status")
    return frozenset(targets | (EVALUATION_TARGETS if evaluation else set()))


def build_model(model_cfg: Any) -> nn.Module:
    """Build the model for training or inference; loads DINOv3 weights if `model.dino_v3_weight_path` is set
    and DVGT-2's planning anchors if `model.anchor_dir` is set.

    Without weights the model is initialised as upstream does for training from scratch. Building
    under `with torch.device("meta"):` allocates nothing.
    """
    model = _make(model_cfg)
    path = getattr(model_cfg, "dino_v3_weight_path", None)
    if path and model_cfg.name == "vggt":
        raise ValueError(
            "model.dino_v3_weight_path is for DVGT models; VGGT's DINOv2 backbone comes with the VGGT "
            "weights (checkpoint.direct_load_pretrained_weights_path=.../model.safetensors)"
        )
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.dino_v3_weight_path: DINOv3 weights file '{path}' does not exist")
        try:
            load_weights(model.aggregator.patch_embed, path, strict=True)
        except WeightsMismatchError as error:
            raise WeightsMismatchError(
                f"model.dino_v3_weight_path: '{path}' does not match the DINOv3 backbone of model.size="
                f"{model_cfg.size}\n{error}"
            ) from None
    anchor_dir = getattr(model_cfg, "anchor_dir", None)
    if anchor_dir:
        from dvgt.data.anchors import read_anchor_dir

        trajectory, pose_translation = read_anchor_dir(anchor_dir)
        model.ego_pose_head.traj_pose_decoder.set_anchors(
            torch.from_numpy(trajectory), torch.from_numpy(pose_translation)
        )
    return model


def model_layout(model_cfg: Any) -> dict[str, Any]:
    """{"num_parameters": int, "state_dict": {key: [shape, dtype]}} in state_dict order, without allocating weights."""
    model = model_skeleton(model_cfg)
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()},
    }


def model_parts(model_cfg: Any) -> dict[str, str]:
    """The parts `model.device_map` places (part -> submodule path), without allocating weights."""
    return model_skeleton(model_cfg).device_map_parts()


def model_skeleton(model_cfg: Any) -> nn.Module:
    """The architecture on the meta device: names, shapes and forward shapes, no memory."""
    with torch.device("meta"):
        return _make(model_cfg)

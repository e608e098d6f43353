"""Model construction from the `model` section of a training config.

    model = build_model(cfg.model)          # DVGT-1 or VGGT at cfg.model.size (full | small | tiny)
    layout = model_layout(cfg.model)        # parameter names and shapes, built on the meta device
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from .dvgt1 import DVGT1, SIZES, DVGT1Size
from .vggt import VGGT
from .weights import LoadReport, WeightsMismatchError, load_weights, read_checkpoint

__all__ = [
    "DVGT1",
    "DVGT1Size",
    "SIZES",
    "VGGT",
    "LoadReport",
    "WeightsMismatchError",
    "build_model",
    "load_weights",
    "model_layout",
    "read_checkpoint",
]


def _make(model_cfg: Any) -> nn.Module:
    """The architecture named by `model_cfg` (an OmegaConf node or a `ModelConfig`), randomly initialised."""
    name = model_cfg.name
    if name not in ("dvgt1", "dvgt2", "dvgt2_pretrain", "vggt"):
        raise ValueError(f"model.name '{name}' is not one of dvgt1, dvgt2, dvgt2_pretrain, vggt")
    if name not in ("dvgt1", "vggt"):
        raise NotImplementedError(
            f"model '{name}' is not available yet: DVGT-2 arrives with the next release; "
            "use a train/dvgt1/* or train/vggt/* stage"
        )
    if model_cfg.size not in SIZES:
        raise ValueError(f"model.size '{model_cfg.size}' is not one of {', '.join(SIZES)}")
    if name == "vggt":
        return VGGT(
            SIZES[model_cfg.size],
            gradient_checkpointing=getattr(model_cfg, "gradient_checkpointing", True),
            frames_chunk_size=getattr(model_cfg, "frames_chunk_size", None),
        )
    return DVGT1(
        SIZES[model_cfg.size],
        max_frames=getattr(model_cfg, "max_frames", 48),
        gradient_checkpointing=getattr(model_cfg, "gradient_checkpointing", True),
        frames_chunk_size=getattr(model_cfg, "frames_chunk_size", None),
    )


def build_model(model_cfg: Any) -> nn.Module:
    """Build the model for training or inference; loads DINOv3 weights if `model.dino_v3_weight_path` is set.

    Without weights the model is initialised as upstream does for training from scratch. Building
    under `with torch.device("meta"):` allocates nothing.
    """
    model = _make(model_cfg)
    path = getattr(model_cfg, "dino_v3_weight_path", None)
    if path and model_cfg.name == "vggt":
        raise ValueError("model.dino_v3_weight_path is for DVGT models; VGGT's DINOv2 backbone comes with the VGGT "
                         "weights (checkpoint.direct_load_pretrained_weights_path=.../model.safetensors)")
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
    return model


def model_layout(model_cfg: Any) -> Dict[str, Any]:
    """{"num_parameters": int, "state_dict": {key: [shape, dtype]}} in state_dict order, without allocating weights."""
    with torch.device("meta"):
        model = _make(model_cfg)
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()},
    }

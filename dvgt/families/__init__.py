"""The model families and what every caller asks of them (dvgt/families/base.py says what a family declares).

    model = build_model(cfg.model)                   # the family of cfg.model.name, its weights files loaded
    layout = model_layout(cfg.model)                 # parameter names and shapes, built on the meta device
    load_pretrained(model, cfg)                      # checkpoint.load_pretrained_weights_path (converted) and
                                                     # checkpoint.direct_load_pretrained_weights_path

A new family is one module that calls `register` (the four below are imported here so they are always known).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dvgt.families import dvgt1, dvgt2, dvgt2_pretrain, vggt
from dvgt.families.base import ModelFamily, UnknownModelError, get, names, register, unregister
from dvgt.models.conversions import Conversion, detect_source
from dvgt.models.dvgt1 import SIZES
from dvgt.models.weights import LoadReport, load_state, load_weights, read_checkpoint

__all__ = [
    "BUILT_IN",
    "EVALUATION_TARGETS",
    "ModelFamily",
    "UnknownModelError",
    "build_model",
    "check_model_config",
    "convert_for",
    "get",
    "initialise_from_pretrained",
    "load_pretrained",
    "model_layout",
    "model_parts",
    "model_skeleton",
    "names",
    "register",
    "sample_targets",
    "unregister",
]

BUILT_IN = (dvgt1.FAMILY, dvgt2_pretrain.FAMILY, dvgt2.FAMILY, vggt.FAMILY)
# Sample keys evaluation reads beside a family's training targets: the ray depth and z-depth maps the
# metrics and figures use.
EVALUATION_TARGETS = frozenset({"ray_depth", "depths"})


def check_model_config(model_cfg: Any) -> ModelFamily:
    """The family of `model_cfg`, after the model options it cannot take are refused (ValueError)."""
    family = get(model_cfg.name)
    if model_cfg.size not in SIZES:
        raise ValueError(f"model.size '{model_cfg.size}' is not one of {', '.join(SIZES)}")
    if model_cfg.anchor_dir and not family.planning_steps:
        raise ValueError(f"model.anchor_dir needs a planning model (model.name=dvgt2); '{family.name}' does not plan")
    if model_cfg.enable_ego_status and not family.ego_status_fields:
        raise ValueError(
            f"model.enable_ego_status needs a model that plans from it (model.name=dvgt2); '{family.name}' does not"
        )
    family.check_config(model_cfg)
    return family


def build_model(model_cfg: Any) -> nn.Module:
    """The model of `model_cfg`, randomly initialised as upstream does for training from scratch, with the
    weights files its options name loaded (DINOv3 backbone, DVGT-2 anchors). Building under
    `with torch.device("meta"):` allocates nothing."""
    return check_model_config(model_cfg).build(model_cfg)


def model_skeleton(model_cfg: Any) -> nn.Module:
    """The architecture on the meta device: names, shapes and forward shapes, no memory, no weight files read."""
    family = check_model_config(model_cfg)
    with torch.device("meta"):
        return family.build(_without_weight_files(model_cfg))


def model_parts(model_cfg: Any) -> dict[str, str]:
    """The parts model.device_map places (part -> module path), without allocating weights."""
    family = check_model_config(model_cfg)
    if family.device_map_parts is None:
        raise ValueError(f"model '{family.name}' declares no parts: model.device_map cannot place it")
    return dict(family.device_map_parts(model_skeleton(model_cfg)))


def model_layout(model_cfg: Any) -> dict[str, Any]:
    """{"num_parameters": int, "state_dict": {key: [shape, dtype]}} in state_dict order, without allocating weights."""
    model = model_skeleton(model_cfg)
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()},
    }


def _without_weight_files(model_cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.merge(model_cfg, {"dino_v3_weight_path": None, "anchor_dir": None})


def sample_targets(model_cfg: Any, evaluation: bool) -> frozenset[str]:
    """The optional sample keys the data must produce for this model (training, or evaluation)."""
    targets = set(get(model_cfg.name).training_targets)
    if model_cfg.enable_ego_status:
        targets.add("ego_status")
    return frozenset(targets | (EVALUATION_TARGETS if evaluation else set()))


def convert_for(model_name: str, state: Mapping[str, Tensor]) -> Conversion:
    """The conversion of `state` (layout detected from its keys) into model.name `model_name`."""
    source = detect_source(state)
    convert: Callable[[Mapping[str, Tensor]], Conversion] | None = get(model_name).conversions.get(source)
    if convert is None:
        targets = ", ".join(name for name in names() if source in get(name).conversions)
        raise ValueError(
            f"checkpoint.load_pretrained_weights_path: {source} weights cannot initialise model "
            f"'{model_name}' (they can initialise: {targets})"
        )
    return convert(state)


def initialise_from_pretrained(
    model: nn.Module, model_name: str, path: str | Path, s3: Any = None
) -> tuple[LoadReport, Conversion]:
    """Convert the weights at `path` (local or s3://; `s3`: checkpoint.s3 options) for `model` and load them
    non-strictly (the rest keeps its init)."""
    conversion = convert_for(model_name, read_checkpoint(path, s3))
    ignored = {f"not used by {conversion.source} -> {model_name}": conversion.dropped} if conversion.dropped else None
    return load_state(model, conversion.state, strict=False, source=str(path), ignored=ignored), conversion


def load_pretrained(model: nn.Module, cfg: Any, say: Callable[[str], None] = print) -> None:
    """checkpoint.load_pretrained_weights_path (converted, e.g. VGGT-1B -> DVGT-1), then
    checkpoint.direct_load_pretrained_weights_path (same architecture, honours checkpoint.strict)."""
    ck = cfg.checkpoint
    for key in ("load_pretrained_weights_path", "direct_load_pretrained_weights_path"):
        if ck[key] and not str(ck[key]).startswith("s3://") and not Path(ck[key]).is_file():
            raise FileNotFoundError(
                f"checkpoint.{key}: weights file '{ck[key]}' does not exist; fix the path or set checkpoint.{key}=null"
            )
    if ck.load_pretrained_weights_path:
        report, conversion = initialise_from_pretrained(model, cfg.model.name, ck.load_pretrained_weights_path, ck.s3)
        say(f"Initialised from {ck.load_pretrained_weights_path} ({conversion.description}):\n{report.summary()}")
    if ck.direct_load_pretrained_weights_path:
        report = load_weights(model, ck.direct_load_pretrained_weights_path, strict=ck.strict, s3=ck.s3)
        say(f"Loaded pretrained weights from {ck.direct_load_pretrained_weights_path}:\n{report.summary()}")

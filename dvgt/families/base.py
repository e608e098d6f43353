"""What a model family declares, and the registry the rest of dvgt asks.

A family (DVGT-1, DVGT-2 stage 1, DVGT-2, VGGT) is one module in dvgt/families/ that builds a `ModelFamily`
and registers it. The trainer, inference, the feature cache, `dvgt model-info` and the config validator look
a family up by `model.name` and never inspect prediction keys or model classes to decide what to do:

    family = get(cfg.model.name)
    model = family.build(cfg.model)                  # randomly initialised
    predictions = model(images, **family.model_inputs(cfg.model, batch))
    loss = family.loss(model, cfg.loss)              # once the weights are final (DVGT-2 reads its anchors)
    losses = loss(predictions, batch)                # {"objective": ..., "loss_*": ...}
    pred, gt = family.post_process(predictions, batch, cfg.gt_scale_factor, cfg.eval)   # the official frames
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

Batch = Mapping[str, Any]  # a collated sample batch (docs/data.md): tensors [B, ...] and per-clip lists
Predictions = Mapping[str, Any]  # a model's outputs; each family declares their TypedDict
LossFn = Callable[[Predictions, Batch], dict[str, Tensor]]  # -> scalar losses, "objective" among them
PostProcessFn = Callable[[Predictions, Batch, float, Any], tuple[dict[str, Tensor], dict[str, Tensor]]]
ConversionFn = Callable[[Mapping[str, Tensor]], Any]  # a state_dict of another layout -> models.conversions.Conversion
# (model, frozen parameter names, part served by the feature cache) -> model FLOPs of a step of shape (B, T, V, H, W)
FlopsCounter = Callable[[nn.Module, Iterable[str], str | None], Callable[[int, int, int, int, int], float]]


class UnknownModelError(ValueError):
    """model.name names no registered family."""


def no_model_inputs(model_cfg: Any, batch: Batch) -> dict[str, Any]:
    return {}


def no_config_rules(model_cfg: Any) -> None:
    return None


@dataclass(frozen=True)
class ModelFamily:
    """Everything that is specific to one model family, in one place."""

    name: str  # model.name
    title: str  # for people: logs, figures ("DVGT-1")
    build: Callable[[Any], nn.Module]  # model config -> the model, randomly initialised (weights files it names loaded)
    predictions: type  # the TypedDict of the model's outputs
    loss: Callable[[nn.Module, Any], LossFn]  # (model with its final weights, config `loss`) -> the loss of a batch
    post_process: PostProcessFn  # (predictions, batch, gt_scale_factor, config `eval`) -> (pred, gt) in metres
    training_targets: frozenset[str]  # optional sample keys (dvgt.data.scene_dataset.TARGETS) training reads
    model_inputs: Callable[[Any, Batch], dict[str, Any]] = no_model_inputs  # forward kwargs beyond the images
    check_config: Callable[[Any], None] = no_config_rules  # raise ValueError on model options it cannot take
    conversions: Mapping[str, ConversionFn] = field(default_factory=dict)  # source layout -> its conversion
    cacheable_parts: Mapping[str, str] = field(default_factory=dict)  # feature-cache part -> module path
    # model -> its parts model.device_map places (part -> module path); pipeline stages split the model's
    # pipeline_units() (dvgt/models/split.py). None: the family cannot be split.
    device_map_parts: Callable[[Any], Mapping[str, str]] | None = None
    flops: FlopsCounter | None = None  # its analytic FLOP count (dvgt/train/flops.py StepFlops); None: no MFU
    streaming_inference: bool = False  # `dvgt infer` can run it frame by frame
    planning_steps: int = 0  # future poses it plans (0: no planning head)
    ego_status_fields: tuple[str, ...] = ()  # the ego-status vector it can condition on (model.enable_ego_status)


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` known under `family.name` (a name is registered once)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family '{family.name}' is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get(name: str) -> ModelFamily:
    """The family of model.name `name`, or an error that lists the registered ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(f"model.name '{name}' is not one of {', '.join(_FAMILIES)}") from None

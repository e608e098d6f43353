"""How a model splits across GPUs: the vocabulary each model uses to declare it (next to its class).

- device-map parts (`model.device_map`): part name -> submodule path, e.g. {"backbone":
  "aggregator.patch_embed", "aggregator": "aggregator", "point_head": "point_head"}; a part nested in
  another (the backbone inside the aggregator) leaves the outer part the rest of its parameters.
- pipeline units (`distributed.pipeline.stages`): the model's forward as an ordered list of units at
  block boundaries. A unit owns some parameters (by path), reads named tensors of the "carry" (the
  model inputs and what earlier units wrote) and writes new ones; a pipeline stage runs consecutive
  units and sends the carry entries that later units read to the next stage. The last unit returns
  the model's predictions.

The machinery that uses them is generic: dvgt/train/device_map.py and dvgt/train/pipeline.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Carry = dict[str, Tensor]


@dataclass(frozen=True)
class PipelineUnit:
    name: str  # shown in the split report, e.g. "aggregator.3"
    owns: tuple[str, ...]  # paths of the submodules and parameters it runs (nothing is owned twice)
    reads: tuple[str, ...]  # carry entries it needs
    writes: tuple[str, ...]  # carry entries it returns (none for the last unit: it returns the predictions)
    run: Callable[[Carry], Carry | dict]


def layer_name(i: int) -> str:
    """The carry entry of the aggregator's output after depth step i."""
    return f"layer{i}"

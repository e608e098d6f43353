"""The architectures (DVGT-1, DVGT-2, VGGT), plainly composed from their blocks and heads; which one a
config builds, and everything else specific to a model family, is in dvgt/families/."""

from __future__ import annotations

from .dvgt1 import DVGT1, SIZES, DVGT1Size
from .dvgt2 import DVGT2
from .vggt import VGGT
from .weights import LoadReport, WeightsMismatchError, load_weights, read_checkpoint

__all__ = [
    "DVGT1",
    "DVGT2",
    "SIZES",
    "VGGT",
    "DVGT1Size",
    "LoadReport",
    "WeightsMismatchError",
    "load_weights",
    "read_checkpoint",
]

"""From a dataset sample to the tensors the model trains on, with the official colour augmentation
(dvgt/datasets/composed_dataset.py:ComposedDataset and transforms/augmentation.py of wzzheng/DVGT).

Images become float32 [T, V, 3, H, W] in [0, 1]. In training, colour jitter is applied as torchvision's
``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` followed by
``RandomGrayscale(0.05)``: with probability 1 - ``cojitter_ratio`` one draw for the whole clip ("co-jitter",
contrast still uses each image's own mean grey), otherwise one draw per image. torchvision is not a
dependency (no build of it matches the pinned torch on every platform), so the four adjustments are
written here with torchvision's formulas; draws come from a generator seeded per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
GRAYSCALE_P = 0.05  # RandomGrayscale's probability (augmentation.py)


@dataclass(frozen=True)
class ColorJitter:
    """The official augmentation's parameters (configs/_base_/default_dataset.yaml values by default)."""

    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.1
    p: float = 0.9  # probability that the jitter is applied at all
    gray_scale: bool = True  # then RandomGrayscale(0.05)
    cojitter: bool = True  # allow one draw for the whole clip ...
    cojitter_ratio: float = 0.3  # ... except with this probability (then one draw per image)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images [T, V, 3, H, W] in [0, 1] -> jittered copy."""
        if self.cojitter and _uniform(generator) > self.cojitter_ratio:
            return self._apply(images, generator)
        out = images.clone()
        for t in range(images.shape[0]):
            for v in range(images.shape[1]):
                out[t, v] = self._apply(images[t, v], generator)
        return out

    def _apply(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """One draw of RandomApply(ColorJitter) + RandomGrayscale on [..., 3, H, W]."""
        if not self.p < _uniform(generator):  # RandomApply keeps the image when p < u
            order = torch.randperm(4, generator=generator).tolist()
            factors = [
                _uniform(generator, max(0.0, 1 - x), 1 + x) for x in (self.brightness, self.contrast, self.saturation)
            ]
            hue = _uniform(generator, -self.hue, self.hue)
            for step in order:
                if step == 0:
                    images = _blend(images, torch.zeros_like(images), factors[0])
                elif step == 1:
                    images = _blend(images, grey(images).mean(dim=(-3, -2, -1), keepdim=True), factors[1])
                elif step == 2:
                    images = _blend(images, grey(images), factors[2])
                else:
                    images = adjust_hue(images, hue)
        if self.gray_scale and _uniform(generator) < GRAYSCALE_P:
            images = grey(images).expand_as(images).clone()
        return images


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _blend(image: Tensor, other: Tensor, ratio: float) -> Tensor:
    return (ratio * image + (1.0 - ratio) * other).clamp(0.0, 1.0)


def grey(images: Tensor) -> Tensor:
    """Luma [..., 1, H, W] of RGB [..., 3, H, W]."""
    r, g, b = images.unbind(dim=-3)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_hue(images: Tensor, factor: float) -> Tensor:
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]) in HSV space."""
    r, g, b = images.unbind(dim=-3)
    value, _ = images.max(dim=-3)
    minimum, _ = images.min(dim=-3)
    chroma = value - minimum
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue) / 6.0
    hue = (hue + factor) % 1.0
    # HSV -> RGB
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    sector = sector.long() % 6
    table = torch.stack(
        [
            torch.stack(c, dim=-3)
            for c in ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))
        ]
    )
    return torch.gather(table, 0, sector[None, ..., None, :, :].expand(1, *images.shape))[0]


def to_tensors(
    sample: Mapping[str, Any], jitter: ColorJitter | None = None, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Numpy sample -> tensors; images uint8 [T, V, H, W, 3] -> float32 [T, V, 3, H, W] in [0, 1], jittered
    when ``jitter`` is given (training)."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        out[key] = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    images = out["images"].permute(0, 1, 4, 2, 3).float() / 255.0
    if jitter is not None:
        images = jitter(images, generator if generator is not None else torch.Generator())
    out["images"] = images.contiguous()
    return out

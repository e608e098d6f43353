"""Per-image crop and resize with exact intrinsics, as the official dataset prepares every view
(dvgt/datasets/transforms/transforms.py of wzzheng/DVGT):

1. crop symmetrically about the principal point (not strict);
2. resize so that both sides cover the target plus a margin (4 px, plus a random share of the target
   size in training), LANCZOS when shrinking and BICUBIC when enlarging for the image, nearest
   neighbour for depth (OpenCV's INTER_NEAREST rule), intrinsics with the half-pixel convention;
3. crop strictly to the target about the principal point, zero-padding the bottom/right if short.

The geometry of the three steps depends only on the stored size and the intrinsics, so ``plan_view``
computes it before any pixel is decoded (a ``ViewPlan``); ``resize_image`` applies it as the official
code does (full decode, crop, resize: byte-identical), ``resize_jpeg`` applies the same plan while
libjpeg decodes at 1/2, 1/4 or 1/8 scale (docs/data.md, "Fast JPEG decoding"), and ``resize_depth``
applies it to a depth map. Output sizes and intrinsics are the same either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SAFE_BOUND_PX = 4  # resize margin beyond the target (both sides)
RANDOM_RESIZE_MODE = 0.3  # training adds triangular(0, 0, 0.3) x max(target) to the margin
DRAFT_SCALES = (8, 4, 2)  # the DCT scalings libjpeg offers (1/8, 1/4, 1/2), largest first
# A DCT-scaled decode must leave the crop at least this many times the resized size: from 1.5 on, every
# view of the official fixture (training augmentation, widths 40-100) stays closer to the exact view
# than a quality-95 JPEG round trip of it; between 1 and 1.5 some views do not (docs/data.md).
DRAFT_HEADROOM = 1.5

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, end exclusive)


def crop_box(height: int, width: int, intrinsics: np.ndarray, target: tuple[int, int], strict: bool = False) -> Box:
    """The crop of an image [height, width] around (cx, cy) to at most ``target`` (height, width).

    Not strict: symmetric about the principal point and inside the image. Strict: it starts half a
    target before the principal point and is exactly the target (it may end past the bottom/right edge:
    the missing pixels are zeros).
    """
    target_h, target_w = target
    if height < target_h or width < target_w:
        raise ValueError(f"image of {height}x{width} is smaller than the crop {target_h}x{target_w}")
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    half_x = min(target_w / 2, cx) if strict else min(target_w / 2, cx, width - cx)
    half_y = min(target_h / 2, cy) if strict else min(target_h / 2, cy, height - cy)
    x0, y0 = math.floor(cx) - math.floor(half_x), math.floor(cy) - math.floor(half_y)
    if x0 < 0 or y0 < 0:
        raise ValueError(f"principal point ({cx:.1f}, {cy:.1f}) lies outside the image")
    if strict:
        return x0, y0, x0 + target_w, y0 + target_h
    return x0, y0, x0 + 2 * math.floor(half_x), y0 + 2 * math.floor(half_y)


def _shifted(intrinsics: np.ndarray, x0: int, y0: int) -> np.ndarray:
    intrinsics = intrinsics.copy()
    intrinsics[0, 2] -= x0
    intrinsics[1, 2] -= y0
    return intrinsics


def _scaled(intrinsics: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics of an image resized by (sx, sy), pixel centres at +0.5 while scaling."""
    intrinsics = intrinsics.copy()
    intrinsics[:2, 2] += 0.5
    intrinsics[0, 0] *= sx
    intrinsics[1, 1] *= sy
    intrinsics[0, 2] *= sx
    intrinsics[1, 2] *= sy
    intrinsics[:2, 2] -= 0.5
    return intrinsics


@dataclass(frozen=True)
class ViewPlan:
    """Where the pixels of one prepared view come from: crop ``box`` of the stored image (step 1), resize
    it to ``size`` (step 2), crop ``final`` of the resized image (step 3); ``intrinsics`` are the output's."""

    box: Box  # in stored pixels
    size: tuple[int, int]  # (height, width) after the cover resize
    final: Box  # in resized pixels; may end past the resized image (zero padding)
    intrinsics: np.ndarray  # [3, 3] of the prepared view

    @property
    def shrinks(self) -> bool:
        return self.size[1] < self.box[2] - self.box[0] or self.size[0] < self.box[3] - self.box[1]

    @property
    def resample(self) -> Image.Resampling:
        """The official filter: LANCZOS when shrinking, BICUBIC when enlarging."""
        return Image.Resampling.LANCZOS if self.shrinks else Image.Resampling.BICUBIC

    def draft_scale(self) -> int:
        """The largest DCT scaling (8, 4, 2, else 1) at which the crop box still has DRAFT_HEADROOM times
        the resized size, so the final LANCZOS resize still shrinks (and filters) the decoded pixels."""
        crop_w, crop_h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        need_w, need_h = DRAFT_HEADROOM * self.size[1], DRAFT_HEADROOM * self.size[0]
        return next((s for s in DRAFT_SCALES if crop_w / s >= need_w and crop_h / s >= need_h), 1)


def plan_view(
    stored: tuple[int, int],
    intrinsics: np.ndarray,
    target: tuple[int, int],
    aug_size: tuple[int, int] | None = None,
    extra_margin: float = 0.0,
) -> ViewPlan:
    """The three steps of the module docstring for an image of ``stored`` (height, width) pixels.
    ``aug_size`` (height, width) is the first crop's size under pixel-aspect augmentation (default: the
    whole image); ``extra_margin`` the training-time random resize margin (pixels)."""
    x0, y0, x1, y1 = box = crop_box(*stored, intrinsics, aug_size or stored)
    intrinsics = _shifted(intrinsics, x0, y0)
    height, width = y1 - y0, x1 - x0
    scale = float(
        np.max(
            (np.asarray(target, dtype=float) + SAFE_BOUND_PX + extra_margin) / np.array([height, width], dtype=float)
        )
    )
    new_h, new_w = int(np.floor(height * scale)), int(np.floor(width * scale))
    intrinsics = _scaled(intrinsics, new_w / width, new_h / height)
    fx0, fy0, fx1, fy1 = final = crop_box(new_h, new_w, intrinsics, target, strict=True)
    return ViewPlan(box=box, size=(new_h, new_w), final=final, intrinsics=_shifted(intrinsics, fx0, fy0))


def _final_crop(pixels: np.ndarray, final: Box) -> np.ndarray:
    """Step 3: the strict crop, zero-padded at the bottom/right."""
    x0, y0, x1, y1 = final
    out = pixels[y0:y1, x0:x1]
    pad = ((0, (y1 - y0) - out.shape[0]), (0, (x1 - x0) - out.shape[1])) + ((0, 0),) * (pixels.ndim - 2)
    return np.pad(out, pad) if pad[0][1] or pad[1][1] else out


def resize_image(image: np.ndarray, plan: ViewPlan) -> np.ndarray:
    """The official image path: uint8 [H, W, 3] (fully decoded) -> the prepared view, byte-identical."""
    x0, y0, x1, y1 = plan.box
    new_h, new_w = plan.size
    resized = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize((new_w, new_h), resample=plan.resample))
    return _final_crop(resized, plan.final)


def resize_jpeg(jpeg: Image.Image, plan: ViewPlan) -> np.ndarray:
    """The fast image path: decode a lazily opened JPEG at its plan's draft scale (libjpeg's DCT
    scaling, before any pixel is produced) and resize the crop box, scaled to the decoded pixels, with
    the official filter. Decoded pixel i covers stored pixels [i s, (i + 1) s), so the box keeps the
    geometry exact; only the pixel values differ from ``resize_image`` (JPEG tolerance, docs/data.md)."""
    scale, stored_w = plan.draft_scale(), jpeg.width
    drafted = jpeg.draft("RGB", (jpeg.width // scale, jpeg.height // scale)) if scale > 1 else None
    if not drafted:  # too little room to shrink (or not a JPEG): the official path, byte-identical
        return resize_image(np.asarray(jpeg.convert("RGB")), plan)
    agreed = stored_w / drafted[1][2]  # the scale the decoder agreed to
    x0, y0, x1, y1 = plan.box
    new_h, new_w = plan.size
    rgb = jpeg if jpeg.mode == "RGB" else jpeg.convert("RGB")
    resized = rgb.resize(
        (new_w, new_h), resample=plan.resample, box=(x0 / agreed, y0 / agreed, x1 / agreed, y1 / agreed)
    )
    return _final_crop(np.asarray(resized), plan.final)


def resize_nearest(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize with OpenCV's INTER_NEAREST rule: source index floor(i * src / dst)."""
    rows = np.minimum(np.floor(np.arange(height) * (depth.shape[0] / height)).astype(np.int64), depth.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (depth.shape[1] / width)).astype(np.int64), depth.shape[1] - 1)
    return depth[rows[:, None], cols[None, :]]


def resize_depth(depth: np.ndarray, plan: ViewPlan) -> np.ndarray:
    """Depth [H, W] (stored size) -> the prepared view, nearest neighbour."""
    x0, y0, x1, y1 = plan.box
    new_h, new_w = plan.size
    return _final_crop(resize_nearest(depth[y0:y1, x0:x1], new_w, new_h), plan.final)

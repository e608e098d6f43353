"""Per-image crop and resize with exact intrinsics, as the official dataset prepares every view
(dvgt/datasets/transforms/transforms.py of wzzheng/DVGT):

1. crop symmetrically about the principal point (``crop_about_principal_point``, not strict);
2. resize so that both sides cover the target plus a margin (4 px, plus a random share of the target
   size in training), LANCZOS when shrinking and BICUBIC when enlarging for the image, nearest
   neighbour for depth (OpenCV's INTER_NEAREST rule), intrinsics with the half-pixel convention;
3. crop strictly to the target about the principal point, zero-padding the bottom/right if short.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SAFE_BOUND_PX = 4  # resize margin beyond the target (both sides)
RANDOM_RESIZE_MODE = 0.3  # training adds triangular(0, 0, 0.3) x max(target) to the margin


def crop_about_principal_point(image: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray,
                               target: tuple[int, int], strict: bool = False):
    """Crop image [H, W, 3] and depth [H, W] around (cx, cy) to at most ``target`` (height, width).

    Not strict: the crop is symmetric about the principal point and stays inside the image. Strict: the
    crop starts half a target before the principal point and is exactly the target, zero-padded at the
    bottom/right. Returns (image, depth, intrinsics shifted by the crop offset).
    """
    height, width = image.shape[:2]
    target_h, target_w = target
    if height < target_h or width < target_w:
        raise ValueError(f"image of {height}x{width} is smaller than the crop {target_h}x{target_w}")
    intrinsics = intrinsics.copy()
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    half_x = min(target_w / 2, cx) if strict else min(target_w / 2, cx, width - cx)
    half_y = min(target_h / 2, cy) if strict else min(target_h / 2, cy, height - cy)
    x0, y0 = math.floor(cx) - math.floor(half_x), math.floor(cy) - math.floor(half_y)
    if x0 < 0 or y0 < 0:
        raise ValueError(f"principal point ({cx:.1f}, {cy:.1f}) lies outside the image")
    x1, y1 = (x0 + target_w, y0 + target_h) if strict else (x0 + 2 * math.floor(half_x), y0 + 2 * math.floor(half_y))
    image, depth = image[y0:y1, x0:x1], depth[y0:y1, x0:x1]
    intrinsics[0, 2] -= x0
    intrinsics[1, 2] -= y0
    if strict:
        pad_h, pad_w = target_h - image.shape[0], target_w - image.shape[1]
        if pad_h < 0 or pad_w < 0:
            raise ValueError(f"crop {image.shape[:2]} larger than the target {target}")
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
            depth = np.pad(depth, ((0, pad_h), (0, pad_w)))
    return image, depth, intrinsics


def resize_nearest(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize with OpenCV's INTER_NEAREST rule: source index floor(i * src / dst)."""
    rows = np.minimum(np.floor(np.arange(height) * (depth.shape[0] / height)).astype(np.int64), depth.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (depth.shape[1] / width)).astype(np.int64), depth.shape[1] - 1)
    return depth[rows[:, None], cols[None, :]]


def resize_to_cover(image: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray, target: tuple[int, int],
                    extra_margin: float = 0.0):
    """Resize (aspect kept) so both sides reach target + SAFE_BOUND_PX + extra_margin (pixels).

    ``extra_margin`` is the training-time random margin. Returns (image, depth, intrinsics).
    """
    height, width = image.shape[:2]
    scale = float(np.max((np.asarray(target, dtype=float) + SAFE_BOUND_PX + extra_margin)
                         / np.array([height, width], dtype=float)))
    new_h, new_w = int(np.floor(height * scale)), int(np.floor(width * scale))
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=method))
    depth = resize_nearest(depth, new_w, new_h)
    sx, sy = new_w / width, new_h / height
    intrinsics = intrinsics.copy()
    intrinsics[:2, 2] += 0.5  # pixel centres at +0.5 while scaling
    intrinsics[0, 0] *= sx
    intrinsics[1, 1] *= sy
    intrinsics[0, 2] *= sx
    intrinsics[1, 2] *= sy
    intrinsics[:2, 2] -= 0.5
    return image, depth, intrinsics


def prepare_view(image: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray, target: tuple[int, int],
                 aug_size: tuple[int, int] | None = None, extra_margin: float = 0.0):
    """The three steps of the module docstring for one view. ``aug_size`` (height, width) is the first
    crop's size under pixel-aspect augmentation (default: the whole image)."""
    image, depth, intrinsics = crop_about_principal_point(image, depth, intrinsics, aug_size or image.shape[:2])
    image, depth, intrinsics = resize_to_cover(image, depth, intrinsics, target, extra_margin)
    return crop_about_principal_point(image, depth, intrinsics, target, strict=True)

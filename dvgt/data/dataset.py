"""Clip datasets: T consecutive frames x V cameras of one scene, resized to H x W, as tensors.

The grouped batch sampler (sampler.py) decides every shape; the dataset is asked for one clip with
a ``ClipRequest`` and does the decoding, resizing and geometry (in DataLoader workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from dvgt.data import layout
from dvgt.data.ego_motion import scene_ego_motion
from dvgt.data.geometry import inverse_pose, pose_to_absT_quaR, transform_points, unproject_depth
from dvgt.data.synthetic import ensure_synthetic_dataset


class ClipRequest(NamedTuple):
    """One sample of a batch, as chosen by the sampler."""

    dataset_index: int  # which dataset of the mix
    clip_index: int  # in [0, dataset.num_clips(frames))
    views: int  # V cameras
    frames: int  # T frames
    height: int
    width: int
    seed: int | None = None  # camera subset + colour jitter; None: the first V cameras, no jitter


# --------------------------------------------------------------------------------------------
# Resize + centre crop with exact intrinsics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropResize:
    """Aspect-preserving resize then centre crop, as one map from output to source pixels.

    Output pixel centre x_out (OpenCV: column i is at x = i) comes from the source point at edge
    coordinate ``left + (x_out + 0.5) / scale`` (edge coordinates: the source image spans [0, W]);
    the same for rows with ``top``.
    """

    scale: float
    left: float
    top: float
    width: int  # output size
    height: int

    @staticmethod
    def centre(source_width: int, source_height: int, width: int, height: int) -> "CropResize":
        scale = max(width / source_width, height / source_height)  # cover the output, crop the excess
        left, top = (source_width - width / scale) / 2, (source_height - height / scale) / 2
        return CropResize(scale, left, top, width, height)

    def image(self, image: Image.Image) -> np.ndarray:
        """Resampled RGB float32 [H, W, 3] in [0, 1] (bilinear, antialiased when shrinking)."""
        box = (self.left, self.top, self.left + self.width / self.scale, self.top + self.height / self.scale)
        resized = image.resize((self.width, self.height), Image.Resampling.BILINEAR, box=box)
        return np.asarray(resized, dtype=np.float32) / 255.0

    def depth(self, depth: np.ndarray) -> np.ndarray:
        """Nearest-neighbour resampling: every output depth is a measured one (no mixing across edges)."""
        rows = np.floor(self.top + (np.arange(self.height) + 0.5) / self.scale).astype(np.int64)
        cols = np.floor(self.left + (np.arange(self.width) + 0.5) / self.scale).astype(np.int64)
        return depth[np.clip(rows, 0, depth.shape[0] - 1)[:, None], np.clip(cols, 0, depth.shape[1] - 1)[None, :]]

    def intrinsics(self, intrinsics: np.ndarray) -> np.ndarray:
        """Intrinsics of the output image: x_out = (x_src + 0.5 - left) * scale - 0.5."""
        adjusted = intrinsics.astype(np.float64).copy()
        adjusted[0, :] *= self.scale
        adjusted[1, :] *= self.scale
        adjusted[0, 2] = (intrinsics[0, 2] + 0.5 - self.left) * self.scale - 0.5
        adjusted[1, 2] = (intrinsics[1, 2] + 0.5 - self.top) * self.scale - 0.5
        return adjusted


def colour_jitter(images: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength] per image.

    ``images`` is [N, 3, H, W] in [0, 1]; each image (one camera at one frame) gets its own factors,
    as real cameras expose independently.
    """
    brightness, contrast, saturation = torch.from_numpy(
        rng.uniform(1 - strength, 1 + strength, size=(3, images.shape[0], 1, 1, 1))).float()
    images = images * brightness
    mean_grey = _grey(images).mean((2, 3), keepdim=True)
    images = (images - mean_grey) * contrast + mean_grey
    grey = _grey(images)
    images = (images - grey) * saturation + grey
    return images.clamp(0, 1)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images [N, 3, H, W] (ITU-R BT.601 weights)."""
    return (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def choose_cameras(num_cameras: int, views: int, seed: int | None) -> list[int]:
    """Camera indices: the reference (front) camera first, then a seeded subset of the others in rig order."""
    if views > num_cameras:
        raise ValueError(f"asked for {views} cameras but the dataset has {num_cameras}")
    if seed is None:
        return list(range(views))
    others = np.random.default_rng(seed).choice(np.arange(1, num_cameras), size=views - 1, replace=False)
    return [0, *sorted(int(c) for c in others)]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class ClipDataset:
    """The clips of one dataset entry (one root and split in the DVGT layout)."""

    def __init__(self, name: str, root: str | Path, split: str = "train", *, frame_stride: int = 1,
                 color_jitter: float = 0.0, config_key: str = "root"):
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        self.name, self.root, self.split = name, Path(root), split
        self.frame_stride, self.color_jitter = frame_stride, color_jitter
        self.scenes = layout.read_split(root, split, config_key)
        self.num_cameras = min(len(scene.cameras) for scene in self.scenes)
        self.max_frames = max((scene.num_frames - 1) // frame_stride + 1 for scene in self.scenes)
        self.motion = [scene_ego_motion(scene.ego_to_world, scene.timestamps, scene.measured) for scene in self.scenes]

    def clips_per_scene(self, frames: int) -> np.ndarray:
        """How many start frames each scene offers for a clip of ``frames`` frames."""
        span = (frames - 1) * self.frame_stride + 1
        return np.array([max(scene.num_frames - span + 1, 0) for scene in self.scenes])

    def num_clips(self, frames: int) -> int:
        return int(self.clips_per_scene(frames).sum())

    def locate_clip(self, clip_index: int, frames: int) -> tuple[int, int]:
        """(scene index, start frame) of a clip; clips are numbered scene after scene."""
        counts = self.clips_per_scene(frames)
        if not 0 <= clip_index < counts.sum():
            raise IndexError(f"clip {clip_index} out of range: {self.name} has {counts.sum()} clips of {frames} frames")
        scene_index = int(np.searchsorted(np.cumsum(counts), clip_index, side="right"))
        return scene_index, clip_index - int(counts[:scene_index].sum())

    def __getitem__(self, request: ClipRequest) -> dict[str, Any]:
        scene_index, start = self.locate_clip(request.clip_index, request.frames)
        return self.load_clip(scene_index, start, request.views, request.frames, request.height, request.width,
                              request.seed)

    def load_image(self, scene_index: int, frame: int, camera: int, height: int, width: int) -> np.ndarray:
        """One image centre crop-resized to H x W exactly as in clips (no jitter): float32 [H, W, 3] in [0, 1]."""
        scene = self.scenes[scene_index]
        crop = CropResize.centre(*scene.image_sizes[frame, camera].tolist(), width, height)
        return crop.image(layout.read_image(scene.root / scene.image_paths[frame, camera]))

    def _load_view(self, scene: layout.SceneRecord, frame: int, camera: int, crop: CropResize):
        """(image [H, W, 3], depth [H, W] metres, intrinsics [3, 3]) of one camera at one frame."""
        image_path = scene.root / scene.image_paths[frame, camera]
        depth_path = scene.root / scene.depth_paths[frame, camera]
        image = layout.read_image(image_path)
        depth = layout.read_depth(depth_path, scene.depth_scales[frame, camera])
        expected = tuple(int(v) for v in scene.image_sizes[frame, camera])
        for path, size in ((image_path, image.size), (depth_path, depth.shape[::-1])):
            if tuple(size) != expected:
                raise ValueError(f"'{path}' is {size[0]}x{size[1]} but its row in '{scene.table_path}' says "
                                 f"width x height = {expected[0]}x{expected[1]}")
        return crop.image(image), crop.depth(depth), crop.intrinsics(scene.intrinsics[frame, camera])

    def load_clip(self, scene_index: int, start: int, views: int, frames: int, height: int, width: int,
                  seed: int | None = None) -> dict[str, Any]:
        """One clip as tensors (see docs/data.md for the keys): geometry in the first frame's ego frame,
        plus each frame's own-frame points, relative pose and ego motion (DVGT-2)."""
        if not 0 <= scene_index < len(self.scenes):
            raise IndexError(f"scene {scene_index} out of range: {self.name} ({self.root}/{self.split}) has "
                             f"{len(self.scenes)} scenes")
        scene = self.scenes[scene_index]
        frame_ids = start + np.arange(frames) * self.frame_stride
        if frame_ids[-1] >= scene.num_frames:
            raise IndexError(f"scene '{scene.name}' has {scene.num_frames} frames; a clip of {frames} frames with "
                             f"stride {self.frame_stride} cannot start at frame {start}")
        cameras = choose_cameras(len(scene.cameras), views, seed)
        loaded = [self._load_view(scene, f, c, CropResize.centre(*scene.image_sizes[f, c].tolist(), width, height))
                  for f in frame_ids for c in cameras]
        images, depths, intrinsics = zip(*loaded)

        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [T*V, 3, H, W]
        if self.color_jitter > 0 and seed is not None:
            images = colour_jitter(images, self.color_jitter, np.random.default_rng([seed, 1]))
        depths = torch.from_numpy(np.stack(depths)).double().view(frames, views, height, width)
        intrinsics = torch.from_numpy(np.stack(intrinsics)).view(frames, views, 3, 3)
        cam_to_ego = torch.from_numpy(scene.cam_to_ego[frame_ids][:, cameras])
        ego_to_world = torch.from_numpy(scene.ego_to_world[frame_ids])
        ego_to_first = inverse_pose(ego_to_world[:1]) @ ego_to_world  # [T, 4, 4]
        cam_to_first = ego_to_first[:, None] @ cam_to_ego
        valid = depths > 0
        camera_points = unproject_depth(depths, intrinsics)  # [T, V, H, W, 3] in each camera's frame
        points = transform_points(cam_to_first, camera_points) * valid[..., None]
        points_local = transform_points(cam_to_ego, camera_points) * valid[..., None]
        # ego_{t-1} -> ego_t (DVGT-2's relative pose); frame 0 has no predecessor: the identity
        previous_to_current = inverse_pose(ego_to_world) @ ego_to_world[torch.clamp(torch.arange(frames) - 1, min=0)]
        motion = self.motion[scene_index]
        return {
            "images": images.reshape(frames, views, 3, height, width).contiguous(),
            "points": points.float(),
            "point_masks": valid,
            "depths": depths.float(),
            "intrinsics": intrinsics.float(),
            "cam_to_ego": cam_to_ego.float(),
            "ego_to_first": ego_to_first.float(),
            "ego_pose": pose_to_absT_quaR(ego_to_first).float(),
            "points_local": points_local.float(),
            "relative_pose": pose_to_absT_quaR(previous_to_current).float(),
            "ego_status": torch.from_numpy(motion.ego_status()[frame_ids]).float(),
            "future_trajectory": torch.from_numpy(motion.future_trajectory[frame_ids]).float(),
            "future_valid": torch.from_numpy(motion.future_valid[frame_ids]),
            "scene": scene.name,
            "dataset": self.name,
            "image_paths": [str(scene.image_paths[f, c]) for f in frame_ids for c in cameras],  # T*V, frame-major
        }


class MixedClipDataset(torch.utils.data.Dataset):
    """Several ClipDatasets behind one index: ``dataset[request]`` serves ``request.dataset_index``."""

    def __init__(self, datasets: Sequence[ClipDataset]):
        self.datasets = list(datasets)

    def __getitem__(self, request: ClipRequest) -> dict[str, Any]:
        return self.datasets[request.dataset_index][request]


def open_entry(entry: Any, *, frame_stride: int = 1, color_jitter: float = 0.0, config_key: str = "root",
               generate_synthetic: bool = True) -> ClipDataset:
    """A ClipDataset for a config DatasetEntry (name, root, split). An entry named "synthetic" is
    generated on first use (demo size); any other entry must already exist."""
    if entry.name == "synthetic" and generate_synthetic:
        ensure_synthetic_dataset(entry.root, entry.split)
    return ClipDataset(entry.name, entry.root, entry.split, frame_stride=frame_stride, color_jitter=color_jitter,
                       config_key=config_key)


def collate_clips(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new leading batch dimension; strings become lists."""
    return {key: torch.stack([s[key] for s in samples]) if isinstance(samples[0][key], torch.Tensor)
            else [s[key] for s in samples] for key in samples[0]}

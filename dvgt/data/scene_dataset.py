"""One official parquet as a dataset of clips: the sample the official dataset class returns
(dvgt/datasets/scene_dataset.py:DVGTSceneDataset.get_sequence_data of wzzheng/DVGT), same keys,
shapes, dtypes, frames and units (docs/data.md, "A sample").

A dataset is described by a ``DatasetSpec``: our names for the official constructor arguments
(``DatasetSpec.from_official`` maps those). It serves two kinds of index:

- an ``int`` (evaluation): the sequence at that position of the sorted sequence list, all cameras in
  the dataset's order, ``fixed_num_frames`` / ``fixed_aspect_ratio``, no randomness;
- a ``SampleRequest`` (training): the sampler's views, frames and aspect ratio for the step plus a
  seed from which this sample draws its scene, start frame, cameras and per-image augmentation (the
  official code draws the same quantities from the global ``random`` / ``np.random`` state; a seed per
  sample makes a run resumable at any step and independent of the number of loader workers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dvgt.data import format as fmt
from dvgt.data.remote import S3Root, read_file
from dvgt.data.scenes import SceneIndex, Sequence, SequenceIndex, build_scenes, fps_step, split_sequences
from dvgt.data.transforms import RANDOM_RESIZE_MODE, ViewPlan, plan_view, resize_depth, resize_image, resize_jpeg

log = logging.getLogger(__name__)

# Optional outputs (the official enable_* switches); the rest of a sample is always there.
TARGETS = ("depths", "ego_status", "points_in_ego_n", "points_in_ego_first", "ray_depth", "cam", "ego_past_to_ego_curr")
ALL_TARGETS = frozenset(TARGETS)
# gt_scale_factor multiplies these point maps and depths, and the translations of these poses
SCALED_CONTENT = ("points_in_ego_n", "points_in_ego_first", "points_in_cam_first", "ray_depth", "depths")
SCALED_TRANSLATION = (
    "ego_n_to_ego_first",
    "ego_first_to_cam_n",
    "cam_first_to_cam_n",
    "future_ego_n_to_ego_curr",
    "ego_past_to_ego_curr",
)


class SampleRequest(NamedTuple):
    """One training sample of a step, as the sampler asks for it."""

    index: int  # type: ignore[assignment]  # sequence index (used when inside_random is off); shadows tuple.index
    views: int
    frames: int
    aspect_ratio: float
    seed: int


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that defines one dataset of a mix. Field comments give the official argument name."""

    root: (
        Path  # the tree's root: the folder holding data_annotation/ (of an s3:// root: its mirror in the node's cache)
    )
    parquet: Path  # parquet_path (absolute)
    mode: str = "val"  # mode: train | val
    original_fps: int = 2  # original_fps: stored frame rate (nuScenes, OpenScene 2; KITTI, Waymo, DDAD 10)
    target_fps: int = 2  # target_fps: the rate clips are built at
    image_width: int = 512  # image_width
    patch_size: int = 16  # patch_size: the image height is a multiple of it
    clip_split: str = "default_train"  # clip_split_type
    fixed_num_frames: int = 0  # fixed_num_frames (0 = the sampler's)
    fixed_num_views: int = 0  # fixed_num_views (0 = the sampler's; training then takes all cameras in order)
    fixed_aspect_ratio: float = 0.0  # fixed_aspect_ratio (0 = the sampler's)
    future_frames: int = 0  # future_frame_num: frames after the clip whose poses are targets
    frame_num_max: int = 99999  # frame_num_max: most frames per clip (future frames included)
    dataset_len: int = -1  # dataset_len: sampling weight in a mix (-1 = number of sequences)
    inside_random: bool = True  # inside_random: training picks a random scene each time
    aug_pixel_aspect_range: tuple[float, float] | None = None  # aug_pixel_aspect_range
    aug_safe_scales: tuple[float, float] | None = None  # aug_safe_scales (fx/fy ratio kept within)
    random_resize: bool = False  # enable_random_resize
    filter_lidar: bool = False  # filter_lidar: rows flagged use_lidar_proj_depth get no depth
    eval_lidar_proj_depth: bool = False  # eval_lidar_proj_depth: always read projected LiDAR depth
    gt_scale_factor: float = 1.0  # gt_scale_factor
    max_ray_depth: float = 100.0  # max_ray_depth (metres, before scaling)
    targets: frozenset = ALL_TARGETS  # the enable_* switches that are on (TARGETS)
    scene_filter: Path | None = None  # NavSim scene filter yaml (navtrain / navtest)
    fast_decode: bool = (
        False  # not official: JPEG DCT-scaled decoding (transforms.resize_jpeg); pixels within JPEG tolerance
    )
    remote: S3Root | None = None  # the s3:// root whose files fill ``root`` (dvgt/data/remote.py); None: a local tree

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "parquet", Path(self.parquet))

    @property
    def dataset(self) -> str:
        return fmt.dataset_of(self.parquet)

    @property
    def location(self) -> str:
        """The tree's root as configured: a local folder, or the s3:// URI the cache mirrors."""
        return self.remote.uri if self.remote is not None else str(self.root)

    @staticmethod
    def from_official(args: Mapping[str, Any], root: str | Path, remote: S3Root | None = None) -> DatasetSpec:
        """The spec of an official DVGTSceneDataset constructor call (paths relative to ``root``, the
        official working directory; ``remote``: the s3:// root it mirrors). Arguments left out take the
        official defaults."""
        root = Path(root)
        enabled = {
            "depths": "enable_depth",
            "ego_status": "enable_ego_status",
            "points_in_ego_n": "enable_point_in_ego_n",
            "points_in_ego_first": "enable_point_in_ego_first",
            "ray_depth": "enable_ray_depth",
            "cam": "enable_cam",
            "ego_past_to_ego_curr": "enable_past_ego",
        }
        unknown = set(args) - set(OFFICIAL_DEFAULTS) - set(enabled.values()) - {"parquet_path", "len", "sequence_list"}
        if unknown:
            raise ValueError(f"official dataset argument(s) {sorted(unknown)} are not supported")
        a = {**OFFICIAL_DEFAULTS, **args}
        dataset = fmt.dataset_of(a["parquet_path"])
        split_type = a["clip_split_type"]
        return DatasetSpec(
            root=root,
            parquet=root / a["parquet_path"],
            mode="train" if a["mode"] == "train" else "val",
            original_fps=a["original_fps"],
            target_fps=a["target_fps"],
            image_width=a["image_width"],
            patch_size=a["patch_size"],
            clip_split=split_type,
            fixed_num_frames=a["fixed_num_frames"],
            fixed_num_views=a["fixed_num_views"],
            fixed_aspect_ratio=a["fixed_aspect_ratio"],
            future_frames=a["future_frame_num"],
            frame_num_max=a["frame_num_max"],
            dataset_len=a["dataset_len"],
            inside_random=a["inside_random"],
            aug_pixel_aspect_range=_pair(a["aug_pixel_aspect_range"]),
            aug_safe_scales=_pair(a["aug_safe_scales"]),
            random_resize=a["enable_random_resize"],
            filter_lidar=a["filter_lidar"],
            eval_lidar_proj_depth=a["eval_lidar_proj_depth"],
            gt_scale_factor=a["gt_scale_factor"],
            max_ray_depth=a["max_ray_depth"],
            targets=frozenset(t for t, name in enabled.items() if args.get(name, False)),
            scene_filter=fmt.Tree(root, dataset).scene_filter(split_type) if split_type.startswith("nav") else None,
            remote=remote,
        )


# The official constructor's defaults (scene_dataset.py:DVGTSceneDataset.__init__), for from_official.
OFFICIAL_DEFAULTS = dict(
    frame_num_max=99999,
    dataset_len=-1,
    image_width=512,
    patch_size=16,
    target_fps=2,
    original_fps=2,
    clip_split_type="default_train",
    mode="train",
    filter_lidar=False,
    eval_lidar_proj_depth=False,
    aug_pixel_aspect_range=None,
    aug_safe_scales=None,
    rescale=True,
    enable_random_resize=True,
    gt_scale_factor=1.0,
    max_ray_depth=100.0,
    future_frame_num=0,
    inside_random=True,
    fixed_num_frames=0,
    fixed_num_views=0,
    fixed_aspect_ratio=0.0,
)


def _pair(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def target_shape(image_width: int, aspect_ratio: float, patch_size: int) -> tuple[int, int]:
    """(height, width): height = int(width / aspect) floored to a multiple of the patch size."""
    if aspect_ratio <= 0:
        raise ValueError(f"aspect ratio must be > 0, got {aspect_ratio} (set fixed_aspect_ratio for evaluation)")
    height = int(image_width / aspect_ratio)
    return (height // patch_size) * patch_size, image_width


def to_homogeneous(matrix: np.ndarray) -> np.ndarray:
    """[..., 3, 4] -> [..., 4, 4]."""
    bottom = np.zeros((*matrix.shape[:-2], 1, 4), dtype=matrix.dtype)
    bottom[..., 3] = 1
    return np.concatenate([matrix, bottom], axis=-2)


def inverse_rigid(pose: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms [..., 3|4, 4] as [..., 4, 4] (R^T, -R^T t), in the input's dtype."""
    rotation_t = np.swapaxes(pose[..., :3, :3], -1, -2)
    inverse = np.zeros((*pose.shape[:-2], 4, 4), dtype=pose.dtype)
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3:4] = -rotation_t @ pose[..., :3, 3:4]
    inverse[..., 3, 3] = 1
    return inverse


def transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """points [..., 3] @ R^T + t with pose [..., 4, 4] broadcast over the points' leading dims."""
    return points @ np.swapaxes(pose[..., :3, :3], -1, -2) + pose[..., None, :3, 3]


class SceneDataset:
    """The sequences of one official parquet and the samples built from them (module docstring)."""

    def __init__(self, spec: DatasetSpec, config_key: str = "data"):
        fmt.check_dataset_name(spec.dataset, f"{config_key} (parquet '{spec.parquet.name}')")
        self.spec = spec
        self.tree = fmt.Tree(spec.root, spec.dataset)
        self.cameras = list(fmt.CAMERAS[spec.dataset])  # raw names, official order
        self.table = self._read(partial(fmt.read_table, config_key=config_key), spec.parquet)
        self.scenes: SceneIndex = build_scenes(self.table, spec.dataset)  # flat arrays, no object per scene
        self.step = fps_step(spec.original_fps, spec.target_fps)
        scene_filter = spec.scene_filter  # NavSim's token list, read once here (of an s3:// root: fetched first)
        if scene_filter is not None and spec.remote is not None:
            scene_filter = spec.remote.fetch(scene_filter)
        self.sequences: SequenceIndex = split_sequences(
            self.scenes,
            self.table,
            spec.dataset,
            spec.clip_split,
            step=self.step,
            fixed_num_frames=spec.fixed_num_frames,
            future_frames=spec.future_frames,
            scene_filter=scene_filter,
        )
        if not self.sequences:
            raise ValueError(
                f"{config_key}: parquet '{spec.parquet}' yields no '{spec.clip_split}' sequence (too few "
                f"frames for fixed_num_frames={spec.fixed_num_frames} + "
                f"future_frames={spec.future_frames}?)"
            )
        if "ego_status" in spec.targets:
            absent = [c for c in fmt.EGO_STATUS_COLUMNS if c not in self.table.ego]
            if absent:
                raise ValueError(
                    f"{config_key}: parquet '{spec.parquet}' has no {', '.join(absent)} column(s), which "
                    f"the ego status needs; set model.enable_ego_status=false for dataset "
                    f"'{spec.dataset}'"
                )
        self.lengths = -(-self.sequences.count // self.step)  # len(sequence.frames[::step]): frames at the target rate
        # frames a training clip may have: the longest sequence minus its future frames
        self.max_frames = int(self.lengths.max()) - spec.future_frames
        self.frame_num_max = spec.frame_num_max - spec.future_frames

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.dataset

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    def __len__(self) -> int:
        """The sampling weight of the official mix: dataset_len, or the number of sequences."""
        return self.spec.dataset_len if self.spec.dataset_len > 0 else len(self.sequences)

    # -- samples ---------------------------------------------------------------------------------
    def __getitem__(self, index: int | SampleRequest) -> dict[str, Any]:
        spec = self.spec
        if isinstance(index, SampleRequest):
            if spec.mode != "train":
                raise ValueError("a SampleRequest (training draw) needs a dataset in train mode")
            rng = np.random.default_rng(index.seed)
            views = spec.fixed_num_views or index.views
            frames = spec.fixed_num_frames or index.frames
            aspect = spec.fixed_aspect_ratio or index.aspect_ratio
            sequence, inputs, future = self._draw_clip(index.index, frames, rng)
            cameras = (
                list(range(self.num_cameras))
                if spec.fixed_num_views > 0
                else [int(c) for c in rng.choice(self.num_cameras, views, replace=False)]
            )
            sample = self.build(sequence, inputs, future, cameras, aspect, rng)
            sample["filenames"] = self.filenames(sequence, inputs, cameras)  # which images (the feature cache)
            return sample
        sequence = self.sequences[index]
        future = spec.future_frames
        inputs, later = (sequence.frames[:-future], sequence.frames[-future:]) if future else (sequence.frames, [])
        return self.build(
            sequence, inputs, np.asarray(later), list(range(self.num_cameras)), spec.fixed_aspect_ratio, None
        )

    def filenames(self, sequence: Sequence, frames: np.ndarray, cameras: list[int]) -> list[str]:
        """The table's file names of a clip's images, frame-major."""
        rows = self.scenes[sequence.scene].rows[np.searchsorted(self.scenes[sequence.scene].frames, frames)]
        return [self.table.filename[int(row)].as_py() for row in rows[:, cameras].reshape(-1)]

    def _draw_clip(self, index: int, frames: int, rng: np.random.Generator):
        """(sequence, input frames, future frames) of a training clip: a sequence long enough for
        ``frames`` + future frames at the target rate (random with inside_random, else the first from
        ``index`` on) and a random start."""
        span = frames + self.spec.future_frames
        long_enough = np.flatnonzero(self.lengths >= span)
        if not len(long_enough):
            raise ValueError(
                f"dataset '{self.name}' ({self.spec.parquet}) has no sequence of {span} frames at "
                f"{self.spec.target_fps} Hz; lower the frames per clip or frame_num_max"
            )
        if self.spec.inside_random:
            chosen = int(long_enough[rng.integers(len(long_enough))])
        else:  # the sampler's sequence, or the next long enough one
            later = long_enough[long_enough >= index % len(self.sequences)]
            chosen = int(later[0] if len(later) else long_enough[0])
        sequence = self.sequences[chosen]
        available = sequence.frames[:: self.step]
        start = int(rng.integers(len(available) - span + 1))
        return sequence, available[start : start + frames], available[start + frames : start + span]

    def build(
        self,
        sequence: Sequence,
        frames: np.ndarray,
        future: np.ndarray,
        cameras: list[int],
        aspect_ratio: float,
        rng: np.random.Generator | None,
    ) -> dict[str, Any]:
        """The official sample of ``frames`` x ``cameras`` of a sequence (docs/data.md, "A sample").
        ``rng`` drives the training augmentation (None: none)."""
        spec, scene = self.spec, self.scenes[sequence.scene]
        height, width = target_shape(spec.image_width, aspect_ratio, spec.patch_size)
        T, V = len(frames), len(cameras)
        rows = scene.rows[np.searchsorted(scene.frames, frames)][:, cameras]  # [T, V]
        images = np.zeros((T, V, height, width, 3), dtype=np.uint8)
        depths = np.zeros((T, V, height, width), dtype=np.float32)
        intrinsics = np.zeros((T, V, 3, 3), dtype=np.float32)
        world_points = np.zeros((T, V, height, width, 3), dtype=np.float64)
        masks = np.zeros((T, V, height, width), dtype=bool)
        for t in range(T):
            for v in range(V):
                view = self._load_view(int(rows[t, v]), (height, width), rng)
                images[t, v], depths[t, v], intrinsics[t, v], world_points[t, v], masks[t, v] = view
        table = self.table
        ego_to_world = to_homogeneous(table.ego_to_world[rows[:, 0]])  # [T, 4, 4] float64, first camera's row
        world_to_camera = to_homogeneous(table.extrinsics[rows])  # [T, V, 4, 4]

        # Everything relative to the first frame's ego (removes the world frame; official order of ops)
        world_to_ego0 = inverse_rigid(ego_to_world[0])
        sample: dict[str, Any] = {
            "seq_name": sequence.name,
            "images": images,
            "point_masks": masks,
            "cam_types": [fmt.CAMERAS[self.name][self.cameras[c]] for c in cameras],
            "intrinsics": intrinsics,
        }
        if "depths" in spec.targets:
            sample["depths"] = depths
        if "ego_status" in spec.targets:
            first = rows[:, 0]
            sample["ego_status"] = np.concatenate(
                [table.ego[c][first] for c in fmt.EGO_STATUS_COLUMNS], axis=-1
            ).astype(np.float32)
        ego_n_to_ego_first = (world_to_ego0[None] @ ego_to_world).astype(np.float32)
        points_in_ego_first = transform(world_points, world_to_ego0[None, None, None]).astype(np.float32)
        sample["ego_n_to_ego_first"] = ego_n_to_ego_first
        ego_first_to_cam_n = (world_to_camera @ ego_to_world[0][None, None]).astype(np.float32)
        sample["ego_first_to_cam_n"] = ego_first_to_cam_n
        if "cam" in spec.targets:
            sample["cam_first_to_cam_n"] = ego_first_to_cam_n @ inverse_rigid(ego_first_to_cam_n[0, 0])[None, None]
            sample["points_in_cam_first"] = transform(points_in_ego_first, ego_first_to_cam_n[0, 0][None, None, None])
        ego_to_ego_n = inverse_rigid(ego_n_to_ego_first)  # ego_first -> ego_t
        points_in_ego_n = transform(points_in_ego_first, ego_to_ego_n[:, None, None]).astype(np.float32)
        if "points_in_ego_n" in spec.targets:
            sample["points_in_ego_n"] = points_in_ego_n
        if "points_in_ego_first" in spec.targets:
            sample["points_in_ego_first"] = points_in_ego_first
        ray_depth = np.linalg.norm(points_in_ego_n, axis=-1)
        sample["point_masks"] = masks & (ray_depth < spec.max_ray_depth)
        if "ray_depth" in spec.targets:
            sample["ray_depth"] = ray_depth
            sample["ray_direction"] = points_in_ego_n / (ray_depth[..., None] + 1e-6)
        if spec.future_frames > 0 and len(future):
            future_rows = scene.rows[np.searchsorted(scene.frames, future), cameras[0]]
            future_to_world = to_homogeneous(table.ego_to_world[future_rows])
            poses = np.concatenate([ego_to_world, future_to_world])  # [T + F, 4, 4] float64
            targets = poses[np.arange(T)[:, None] + np.arange(1, len(future) + 1)[None]]  # [T, F, 4, 4]
            sample["future_ego_n_to_ego_curr"] = (inverse_rigid(ego_to_world)[:, None] @ targets).astype(np.float32)
        if "ego_past_to_ego_curr" in spec.targets:
            past = inverse_rigid(ego_n_to_ego_first[1:]) @ ego_n_to_ego_first[:-1]
            sample["ego_past_to_ego_curr"] = np.concatenate([np.eye(4, dtype=np.float32)[None], past])
        return scale_sample(sample, spec.gt_scale_factor)

    def _read(self, reader, path: Path):
        """``reader(path)`` of one file of the tree (of an s3:// root: once it is in the node's cache)."""
        return read_file(reader, path, self.spec.remote)

    def view_image(self, row: int, target: tuple[int, int]) -> np.ndarray:
        """One table row's image at the target (height, width) as a sample without augmentation holds it:
        uint8 [H, W, 3] (what a feature cache encodes)."""
        return self._load_image(row, target, None)[0]

    def _load_image(
        self, row: int, target: tuple[int, int], rng: np.random.Generator | None
    ) -> tuple[np.ndarray, ViewPlan, tuple[int, int]]:
        """(image [H, W, 3] uint8 at the target size, its ViewPlan, the stored (height, width)) of one row;
        ``rng`` draws the training augmentation (None: none)."""
        intrinsics = self.table.intrinsics[row]

        def decode(path: Path) -> tuple[np.ndarray, ViewPlan, tuple[int, int]]:
            with fmt.open_image(path) as jpeg:  # header read, pixels not yet
                stored = (jpeg.height, jpeg.width)
                plan = plan_view(stored, intrinsics, target, *self._augmentation(stored, intrinsics, target, rng))
                if self.spec.fast_decode:
                    return resize_jpeg(jpeg, plan), plan, stored
                return resize_image(np.asarray(jpeg.convert("RGB")), plan), plan, stored

        return self._read(decode, self.tree.image(self.table.filename[row].as_py()))

    def _load_view(self, row: int, target: tuple[int, int], rng: np.random.Generator | None):
        """(image, depth, intrinsics, world points, valid mask) of one table row at the target size."""
        spec, table = self.spec, self.table
        filename = table.filename[row].as_py()
        image, plan, stored = self._load_image(row, target, rng)
        lidar_row = bool(table.use_lidar_proj_depth[row])
        if lidar_row and spec.filter_lidar:
            depth = np.zeros(stored, dtype=np.float32)
        else:
            depth = self._read(
                fmt.read_depth, self.tree.depth(filename, projected=lidar_row or spec.eval_lidar_proj_depth)
            )
            if depth.shape != stored:
                raise fmt.DataFileError(
                    f"depth of '{filename}' is {depth.shape[1]}x{depth.shape[0]} but its image "
                    f"is {stored[1]}x{stored[0]}; re-copy both from the release"
                )
        depth = np.nan_to_num(depth, nan=0, posinf=0, neginf=0)
        depth[depth < fmt.MIN_DEPTH_M] = 0
        depth, intrinsics = resize_depth(depth, plan), plan.intrinsics
        points_camera, valid = unproject(depth, intrinsics)
        camera_to_world = inverse_rigid(table.extrinsics[row])
        world = points_camera @ camera_to_world[:3, :3].T + camera_to_world[:3, 3]  # float64
        return image, depth, intrinsics, world, valid

    def _augmentation(
        self, stored: tuple[int, int], intrinsics: np.ndarray, target: tuple[int, int], rng: np.random.Generator | None
    ) -> tuple[tuple[int, int] | None, float]:
        """(first crop size, extra resize margin) of a training view: the pixel-aspect crop and the random
        resize, drawn from ``rng`` in the official order (None: no augmentation)."""
        spec = self.spec
        aug_size, margin = None, 0.0
        if rng is not None and spec.aug_pixel_aspect_range is not None:
            rand_h, rand_w = rng.uniform(*spec.aug_pixel_aspect_range, 2)
            ratio = (rand_w / rand_h) * (intrinsics[0, 0] / intrinsics[1, 1])
            if spec.aug_safe_scales and not spec.aug_safe_scales[0] <= ratio <= spec.aug_safe_scales[1]:
                rand_h, rand_w = 1.0, 1.0
            aug_size = tuple((np.array(stored) * np.array([rand_h, rand_w])).astype(np.int32))
        if rng is not None and spec.random_resize:
            margin = rng.triangular(0, 0, RANDOM_RESIZE_MODE) * max(target)
        return aug_size, margin


def unproject(depth: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points [H, W, 3] (float32) of a z-depth map and the valid mask (depth > 1e-8)."""
    height, width = depth.shape
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    x = (u - intrinsics[0, 2]) * depth / intrinsics[0, 0]
    y = (v - intrinsics[1, 2]) * depth / intrinsics[1, 1]
    return np.stack([x, y, depth], axis=-1).astype(np.float32), depth > 1e-8


def scale_sample(sample: dict[str, Any], factor: float) -> dict[str, Any]:
    """Multiply point maps and depths, and pose translations, by gt_scale_factor (ego status: velocity and
    acceleration only)."""
    if factor == 1.0:
        return sample
    for key in SCALED_CONTENT:
        if key in sample:
            sample[key] = sample[key] * np.float32(factor)
    for key in SCALED_TRANSLATION:
        if key in sample:
            sample[key] = sample[key].copy()
            sample[key][..., :3, 3] *= factor
    if "ego_status" in sample:
        sample["ego_status"][..., :4] *= factor
    return sample

"""The DVGT preprocessed layout: what a dataset root holds, and its reader and writer.

::

    <root>/<split>/<scene>.parquet                         one row per (frame, camera)
    <root>/<split>/<scene>/<camera>/<frame:06d>.jpg         image (JPEG or PNG)
    <root>/<split>/<scene>/<camera>/<frame:06d>_depth.png   z-depth, 16-bit PNG, 0 = invalid

The columns are listed in ``COLUMNS``; docs/data.md explains them and the conventions. The same
reader serves every source dataset (nuScenes, OpenScene, KITTI, Waymo, DDAD, synthetic): only the
dataset label and the camera names differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

# Depth PNG units: 1/256 m gives 4 mm steps up to 256 m (the KITTI depth convention).
DEFAULT_DEPTH_SCALE = 1.0 / 256.0

COLUMNS: dict[str, pa.DataType] = {
    "scene": pa.string(),
    "frame_index": pa.int64(),  # time order within the scene
    "timestamp": pa.float64(),  # seconds
    "camera": pa.string(),  # e.g. CAM_FRONT; a frame's first row is its reference (front) camera
    "image_path": pa.string(),  # relative to the root
    "depth_path": pa.string(),  # relative to the root
    "depth_scale": pa.float64(),  # metres per depth-PNG unit
    "width": pa.int32(),  # of the stored image
    "height": pa.int32(),
    "intrinsics": pa.list_(pa.float64(), 9),  # 3x3 row-major, for the stored image
    "cam_to_ego": pa.list_(pa.float64(), 16),  # 4x4 row-major, OpenCV camera -> ego
    "ego_to_world": pa.list_(pa.float64(), 16),  # 4x4 row-major, ego -> world; same on all rows of a frame
}
MATRIX_SHAPES = {"intrinsics": (3, 3), "cam_to_ego": (4, 4), "ego_to_world": (4, 4)}
# Measured ego status (e.g. CAN bus, route command); when absent it is derived from the poses
# (dvgt/data/ego_motion.py). One value per frame: all rows of a frame carry the same value.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "ego_velocity": pa.list_(pa.float64(), 2),  # m/s in the ego frame: [forward, left]
    "ego_acceleration": pa.list_(pa.float64(), 2),  # m/s^2 in the ego frame: [forward, left]
    "driving_command": pa.int64(),  # 0 left, 1 straight, 2 right, 3 unknown (NAVSIM order)
}


class DataFileError(OSError):
    """An image or depth file listed in a scene table cannot be read."""


@dataclass
class SceneRecord:
    """One scene's metadata as arrays over frames F and cameras C (nothing decoded yet)."""

    name: str
    table_path: Path
    root: Path
    cameras: list[str]  # rig order; cameras[0] is the reference (front) camera
    frame_indices: np.ndarray  # [F] int64
    timestamps: np.ndarray  # [F] float64
    ego_to_world: np.ndarray  # [F, 4, 4]
    intrinsics: np.ndarray  # [F, C, 3, 3]
    cam_to_ego: np.ndarray  # [F, C, 4, 4]
    image_paths: np.ndarray  # [F, C] str, relative to root
    depth_paths: np.ndarray  # [F, C] str, relative to root
    depth_scales: np.ndarray  # [F, C] float64
    image_sizes: np.ndarray  # [F, C, 2] int (width, height)
    measured: dict[str, np.ndarray] = field(default_factory=dict)  # optional columns present, per frame [F, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def scene_table_path(root: str | Path, split: str, scene: str) -> Path:
    return Path(root) / split / f"{scene}.parquet"


def image_relpath(split: str, scene: str, camera: str, frame_index: int, suffix: str = ".jpg") -> str:
    return f"{split}/{scene}/{camera}/{frame_index:06d}{suffix}"


def depth_relpath(split: str, scene: str, camera: str, frame_index: int) -> str:
    return f"{split}/{scene}/{camera}/{frame_index:06d}_depth.png"


def split_has_scenes(root: str | Path, split: str) -> bool:
    split_dir = Path(root) / split
    return split_dir.is_dir() and any(split_dir.glob("*.parquet"))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def list_scene_tables(root: str | Path, split: str, config_key: str = "root") -> list[Path]:
    """The split's scene tables, sorted; errors name the path and the config key to fix."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root '{root}' does not exist; fix {config_key} (it must point at a "
                                f"dataset in the DVGT preprocessed layout, see docs/data.md)")
    tables = sorted((root / split).glob("*.parquet"))
    if not tables:
        raise FileNotFoundError(f"no scene tables '<scene>.parquet' under '{root / split}'; fix {config_key} "
                                f"or the dataset's split '{split}' (docs/data.md describes the layout)")
    return tables


def _matrix_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    values = table.column(column).combine_chunks()
    rows, cols = MATRIX_SHAPES[column]
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if not np.all(lengths == rows * cols):
        raise ValueError(f"scene table '{path}': column '{column}' must hold {rows * cols} numbers per row "
                         f"({rows}x{cols} row-major), found rows with {sorted(set(lengths.tolist()))}")
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, rows, cols)


def _check_columns(table: pa.Table, path: Path) -> None:
    for column in COLUMNS:
        if column not in table.column_names:
            raise ValueError(f"scene table '{path}' is missing column '{column}' (required columns: "
                             f"{', '.join(COLUMNS)}; see docs/data.md)")
        if table.column(column).null_count:
            raise ValueError(f"scene table '{path}': column '{column}' has empty (null) values")


def read_scene_table(path: str | Path, root: str | Path) -> SceneRecord:
    """Read and validate one scene table; rows become a complete frames x cameras grid."""
    path = Path(path)
    table = pq.read_table(path)
    _check_columns(table, path)
    if table.num_rows == 0:
        raise ValueError(f"scene table '{path}' has no rows")
    column = {name: table.column(name).to_numpy(zero_copy_only=False) for name in COLUMNS if name not in MATRIX_SHAPES}
    matrices = {name: _matrix_column(table, name, path) for name in MATRIX_SHAPES}

    cameras = list(dict.fromkeys(column["camera"].tolist()))  # order of first appearance = rig order
    frames = np.unique(column["frame_index"])
    frame_pos = np.searchsorted(frames, column["frame_index"])
    camera_pos = np.array([cameras.index(c) for c in column["camera"]])
    cell = frame_pos * len(cameras) + camera_pos
    counts = np.bincount(cell, minlength=len(frames) * len(cameras))
    if not np.all(counts == 1):
        bad = int(np.flatnonzero(counts != 1)[0])
        frame, camera = frames[bad // len(cameras)], cameras[bad % len(cameras)]
        raise ValueError(f"scene table '{path}': every frame needs exactly one row per camera {cameras}; frame "
                         f"{frame} has {counts[bad]} row(s) for camera '{camera}'")
    order = np.argsort(cell)
    grid = (len(frames), len(cameras))

    def as_grid(values: np.ndarray) -> np.ndarray:
        return values[order].reshape(*grid, *values.shape[1:])

    ego_to_world = as_grid(matrices["ego_to_world"])
    if not np.allclose(ego_to_world, ego_to_world[:, :1], atol=1e-5):
        raise ValueError(f"scene table '{path}': ego_to_world differs between the cameras of a frame; write one "
                         f"pose per frame and fold per-camera timing into cam_to_ego (docs/data.md)")
    measured = {name: _optional_column(table, name, path, as_grid) for name in OPTIONAL_COLUMNS
                if name in table.column_names}
    scene_names = set(column["scene"].tolist())
    if len(scene_names) != 1:
        raise ValueError(f"scene table '{path}' holds several scenes {sorted(scene_names)}; write one table per scene")
    return SceneRecord(
        name=scene_names.pop(), table_path=path, root=Path(root), cameras=cameras, frame_indices=frames,
        timestamps=as_grid(column["timestamp"])[:, 0], ego_to_world=ego_to_world[:, 0],
        intrinsics=as_grid(matrices["intrinsics"]), cam_to_ego=as_grid(matrices["cam_to_ego"]),
        image_paths=as_grid(column["image_path"]), depth_paths=as_grid(column["depth_path"]),
        depth_scales=as_grid(column["depth_scale"]),
        image_sizes=np.stack([as_grid(column["width"]), as_grid(column["height"])], axis=-1), measured=measured)


def _optional_column(table: pa.Table, name: str, path: Path, as_grid) -> np.ndarray:
    """An optional per-frame column as [F, ...] (the frame's first row), validated."""
    values = table.column(name).combine_chunks()
    if values.null_count:
        raise ValueError(f"scene table '{path}': optional column '{name}' has empty (null) values; fill every "
                         f"row or drop the column (it is then derived from the poses)")
    if pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type):
        width = OPTIONAL_COLUMNS[name].list_size
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if not np.all(lengths == width):
            raise ValueError(f"scene table '{path}': column '{name}' must hold {width} numbers per row")
        per_row = values.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
    else:
        per_row = values.to_numpy(zero_copy_only=False)
    if name == "driving_command" and not np.isin(per_row, np.arange(4)).all():
        raise ValueError(f"scene table '{path}': driving_command must be 0 (left), 1 (straight), 2 (right) or "
                         f"3 (unknown), found {sorted(set(per_row.tolist()) - {0, 1, 2, 3})}")
    return as_grid(per_row)[:, 0]


def read_split(root: str | Path, split: str, config_key: str = "root") -> list[SceneRecord]:
    """Every scene of a split, sorted by table name."""
    return [read_scene_table(path, root) for path in list_scene_tables(root, split, config_key)]


def read_image(path: str | Path) -> Image.Image:
    """Decode an RGB image; any failure becomes a DataFileError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFileError(f"cannot read image file '{path}': {error}") from error


def read_depth(path: str | Path, depth_scale: float) -> np.ndarray:
    """Decode a 16-bit depth PNG into metres (float32, 0 = invalid)."""
    try:
        with Image.open(path) as image:
            units = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFileError(f"cannot read depth file '{path}': {error}") from error
    if units.ndim != 2 or units.dtype not in (np.uint16, np.int32):
        raise DataFileError(f"depth file '{path}' must be a single-channel 16-bit PNG, got {units.dtype} "
                            f"values of shape {units.shape}")
    return units.astype(np.float32) * np.float32(depth_scale)


# --------------------------------------------------------------------------------------------
# Writing (used by the synthetic generator; converters of real datasets can use it too)
# --------------------------------------------------------------------------------------------


def write_image(path: str | Path, rgb: np.ndarray, quality: int = 92) -> None:
    """Save uint8 RGB [H, W, 3]; the suffix picks JPEG or PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=quality)


def write_depth(path: str | Path, depth: np.ndarray, depth_scale: float = DEFAULT_DEPTH_SCALE) -> None:
    """Save z-depth in metres as a 16-bit PNG; 0 and depths beyond the 16-bit range become invalid (0)."""
    units = np.round(np.asarray(depth, dtype=np.float64) / depth_scale)
    units[~np.isfinite(units) | (units > np.iinfo(np.uint16).max) | (units < 0)] = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(units.astype(np.uint16)).save(path)


def write_scene_table(root: str | Path, split: str, scene: str, rows: Sequence[Mapping]) -> Path:
    """Write one scene's table; ``rows`` are mappings with every column (matrices may be 2-D arrays),
    and optionally the OPTIONAL_COLUMNS (written when every row has them)."""
    missing = [c for c in COLUMNS if any(c not in row for row in rows)]
    if missing:
        raise ValueError(f"scene '{scene}': rows are missing column(s) {missing}")
    arrays = {}
    for name, dtype in COLUMNS.items():
        values = [row[name] for row in rows]
        if name in MATRIX_SHAPES:
            values = [np.asarray(v, dtype=np.float64).reshape(-1).tolist() for v in values]
        arrays[name] = pa.array(values, type=dtype)
    for name, dtype in OPTIONAL_COLUMNS.items():
        if all(name in row for row in rows):
            arrays[name] = pa.array([np.asarray(row[name]).tolist() for row in rows], type=dtype)
    path = scene_table_path(root, split, scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path

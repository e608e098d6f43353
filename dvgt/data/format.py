"""The official DVGT preprocessed data format: where each file of a tree lives, what the parquet
columns mean, and the readers of images, depth PNGs and parquet tables.

A tree is what the official preprocessing (wzzheng/DVGT, tools/data_process) writes, read unchanged::

    <root>/data_annotation/meta/moge_v2_large_correct_focal/moge_pred_filter_parquet/<dataset>_<split>.parquet
    <root>/data_annotation/image/moge_v2_large_correct_focal/<dataset>/<filename>.jpg
    <root>/data_annotation/align_depth/moge_v2_large_correct_focal/<dataset>/<filename>.png   dense depth
    <root>/data_annotation/proj_depth/moge_v2_large_correct_focal/<dataset>/<filename>.png    projected LiDAR
    <root>/data_annotation/anchors/train_total_20/{future,past}_anchors_20_rdf.npz           DVGT-2 anchors

The dataset name is the parquet stem up to its first "_" (scene_dataset.py:DVGTSceneDataset.__init__),
so ``nuscene_val.parquet`` reads its images from ``image/.../nuscene/``. docs/data.md lists every
convention with its source in the official code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

VARIANT = "moge_v2_large_correct_focal"  # the depth-model variant every official path is named after
META_DIR = f"data_annotation/meta/{VARIANT}"
FILTERED_META_DIR = f"{META_DIR}/moge_pred_filter_parquet"  # what training and evaluation read
IMAGE_DIR = f"data_annotation/image/{VARIANT}"
ALIGN_DEPTH_DIR = f"data_annotation/align_depth/{VARIANT}"
PROJ_DEPTH_DIR = f"data_annotation/proj_depth/{VARIANT}"
ANCHOR_DIR = "data_annotation/anchors/train_total_20"
FUTURE_ANCHORS_FILE, PAST_ANCHORS_FILE = "future_anchors_20_rdf.npz", "past_anchors_20_rdf.npz"
# The NavSim scene filters (token lists) the navtrain / navtest clip splits read, relative to the root
# (the official code opens them relative to its working directory, which is the tree's root).
SCENE_FILTER_DIR = "third_party/navsim_v1_1/navsim/planning/script/config/common/train_test_split/scene_filter"

# Camera order and canonical names per dataset (scene_dataset.py:DVGTSceneDataset.CAM_TYPE_MAP). The
# order is the order of the views of an evaluation clip; the first camera supplies the ego pose.
_OPENSCENE_CAMERAS = {
    "CAM_F0": "FRONT",
    "CAM_B0": "BACK",
    "CAM_L0": "FRONT_LEFT",
    "CAM_L1": "LEFT",
    "CAM_L2": "BACK_LEFT",
    "CAM_R0": "FRONT_RIGHT",
    "CAM_R1": "RIGHT",
    "CAM_R2": "BACK_RIGHT",
}
CAMERAS: dict[str, dict[str, str]] = {
    "nuscene": {
        "CAM_FRONT": "FRONT",
        "CAM_FRONT_RIGHT": "FRONT_RIGHT",
        "CAM_FRONT_LEFT": "FRONT_LEFT",
        "CAM_BACK": "BACK",
        "CAM_BACK_RIGHT": "BACK_RIGHT",
        "CAM_BACK_LEFT": "BACK_LEFT",
    },
    "kitti": {"2": "FRONT", "3": "FRONT_RIGHT"},
    "openscene": _OPENSCENE_CAMERAS,
    "waymo": {
        "FRONT": "FRONT",
        "FRONT_LEFT": "FRONT_LEFT",
        "FRONT_RIGHT": "FRONT_RIGHT",
        "SIDE_LEFT": "LEFT",
        "SIDE_RIGHT": "RIGHT",
    },
    "ddad": {
        "camera_01": "FRONT",
        "camera_05": "FRONT_LEFT",
        "camera_06": "FRONT_RIGHT",
        "camera_07": "BACK_LEFT",
        "camera_08": "BACK_RIGHT",
        "camera_09": "BACK",
    },
    "argoverse": {
        "ring_front_center": "FRONT",
        "ring_front_left": "FRONT_LEFT",
        "ring_side_left": "LEFT",
        "ring_rear_left": "BACK_LEFT",
        "ring_front_right": "FRONT_RIGHT",
        "ring_side_right": "RIGHT",
        "ring_rear_right": "BACK_RIGHT",
    },
    "navtest": _OPENSCENE_CAMERAS,
    "navtrain": _OPENSCENE_CAMERAS,
    "demo": _OPENSCENE_CAMERAS,  # the official demo trees; our synthetic generator writes this dataset
}
DATASETS = tuple(CAMERAS)

# The driving_command one-hot of each dataset, in its own order: the official trainer feeds it to the
# model unchanged, so a checkpoint finetuned on one dataset expects that dataset's order.
# nuScenes: OccWorld's pose_mode (right, left, straight) + a 0 (nuscene_loader.py); NavSim / OpenScene:
# preprocess/nuplan/helpers/driving_command.py; KITTI: always unknown; Waymo, DDAD, Argoverse: none.
COMMAND_ORDER: dict[str, tuple[str, ...] | None] = {
    "nuscene": ("right", "left", "straight", "none"),
    "openscene": ("left", "forward", "right", "unknown"),
    "navtest": ("left", "forward", "right", "unknown"),
    "navtrain": ("left", "forward", "right", "unknown"),
    "demo": ("left", "forward", "right", "unknown"),
    "kitti": ("left", "forward", "right", "unknown"),  # written as [0, 0, 0, 1] (unknown) on every row
    "waymo": None,
    "ddad": None,
    "argoverse": None,
}

# Parquet columns (tools/data_process/main.py:process_meta_batch, filter_data.py): name -> values per row.
REQUIRED_COLUMNS = {
    "scene_id": 0,
    "frame_idx": 0,
    "cam_type": 0,
    "filename": 0,
    "intrinsics": 9,
    "extrinsics": 12,
    "ego_to_world": 12,
}
OPTIONAL_COLUMNS = {
    "ego_velocity": 2,
    "ego_acceleration": 2,
    "driving_command": 4,
    "frame_token": 0,
    "use_lidar_proj_depth": 0,
}
EGO_STATUS_COLUMNS = ("ego_velocity", "ego_acceleration", "driving_command")

DEPTH_UNKNOWN, DEPTH_INFINITE = 0, 65535  # the depth PNG's reserved codes (utils/io.py)
MIN_DEPTH_M, MAX_DEPTH_M = 1.0, 150.0  # the writer stores depths outside this range as infinite


class DataFileError(OSError):
    """A file of the tree is missing or cannot be decoded; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def dataset_of(parquet_path: str | Path) -> str:
    """The official dataset name of a parquet: its stem up to the first '_' (nuscene_val -> nuscene)."""
    return Path(parquet_path).stem.split("_")[0]


@dataclass(frozen=True)
class Tree:
    """The files of one dataset in an official tree rooted at ``root``."""

    root: Path
    dataset: str

    def parquet(self, split: str, filtered: bool = True) -> Path:
        return self.root / (FILTERED_META_DIR if filtered else META_DIR) / f"{self.dataset}_{split}.parquet"

    def image(self, filename: str) -> Path:
        return self.root / IMAGE_DIR / self.dataset / f"{filename}.jpg"

    def depth(self, filename: str, projected: bool) -> Path:
        return self.root / (PROJ_DEPTH_DIR if projected else ALIGN_DEPTH_DIR) / self.dataset / f"{filename}.png"

    def scene_filter(self, split_type: str) -> Path:
        return self.root / SCENE_FILTER_DIR / f"{split_type}.yaml"


def anchor_files(anchor_dir: str | Path) -> tuple[Path, Path]:
    """(future trajectory anchors, past translation anchors) of an anchor folder."""
    return Path(anchor_dir) / FUTURE_ANCHORS_FILE, Path(anchor_dir) / PAST_ANCHORS_FILE


def check_dataset_name(dataset: str, where: str) -> None:
    if dataset not in CAMERAS:
        raise ValueError(
            f"{where}: unknown dataset '{dataset}'; the official datasets are {', '.join(DATASETS)} "
            f"(the parquet prefix, e.g. nuscene_val.parquet is dataset 'nuscene', split 'val')"
        )


# --------------------------------------------------------------------------------------------
# Images and depth
# --------------------------------------------------------------------------------------------


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """A JPEG opened lazily: its header (size, mode) is read, its pixels are decoded when the block asks
    for them. A missing or broken file, also when it fails to decode inside the block, is a
    DataFileError naming it."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DataFileError(
            f"image file '{path}' is missing; restore it from the preprocessed release "
            f"(or re-run the official preprocessing for this dataset)"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFileError(f"cannot decode image file '{path}' ({error}); re-copy it from the release") from None
    with image:
        try:
            yield image
        except DataFileError:
            raise
        except OSError as error:  # a truncated or corrupt JPEG fails when its pixels are decoded
            raise DataFileError(f"cannot decode image file '{path}' ({error}); re-copy it from the release") from None


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a JPEG; a missing or broken file is a DataFileError naming it."""
    with open_image(path) as image:
        return np.asarray(image.convert("RGB"))


def write_image(path: str | Path, rgb: np.ndarray, quality: int = 95) -> None:
    """Save uint8 RGB [H, W, 3] as JPEG (the official writer uses quality 95)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=quality)


def decode_depth(codes: np.ndarray, near: float, far: float) -> np.ndarray:
    """Log-encoded 16-bit depth codes -> metres (float32): 0 unknown (NaN), 65535 infinite, else
    near^(1-x) far^x with x = (code - 1) / 65533 (utils/io.py:read_depth)."""
    x = (codes.astype(np.float32) - 1) / 65533
    depth = near ** (1 - x) * far**x
    depth[codes == DEPTH_UNKNOWN] = np.nan
    depth[codes == DEPTH_INFINITE] = np.inf
    return depth.astype(np.float32)


def read_depth(path: str | Path) -> np.ndarray:
    """Depth in metres [H, W] float32 of a 16-bit log-encoded PNG, NaN unknown, inf infinite.

    The near and far values are the PNG's tEXt chunks ``near`` and ``far``; a PNG without them was
    not written by the official preprocessing (a linear-depth PNG would be misread by orders of
    magnitude), so it is refused.
    """
    try:
        with Image.open(path) as image:
            info = dict(image.info)
            codes = np.asarray(image)
    except FileNotFoundError:
        raise DataFileError(f"depth file '{path}' is missing; restore it from the preprocessed release") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataFileError(f"cannot decode depth file '{path}' ({error}); re-copy it from the release") from None
    if "near" not in info or "far" not in info:
        raise DataFileError(
            f"depth file '{path}' has no 'near'/'far' text chunks: it is not a log-encoded depth "
            f"PNG of the official preprocessing (utils/io.py:write_depth); regenerate it with that "
            f"writer (dvgt.data.format.write_depth)"
        )
    if codes.ndim != 2 or codes.dtype.kind not in "ui":
        raise DataFileError(
            f"depth file '{path}' must be a single-channel 16-bit PNG, got {codes.dtype} values of shape {codes.shape}"
        )
    return decode_depth(codes, float(info["near"]), float(info["far"]))


def encode_depth(depth: np.ndarray, max_range: float = 1e5) -> tuple[np.ndarray, float, float]:
    """(uint16 codes, near, far) of depth in metres, as utils/io.py:write_depth stores it: depths below
    1 m or above 150 m become infinite, NaN unknown; near/far span the finite values."""
    depth = np.array(depth, dtype=np.float32)
    depth[(depth < MIN_DEPTH_M) | (depth > MAX_DEPTH_M)] = np.inf
    finite, unknown, infinite = np.isfinite(depth), np.isnan(depth), np.isinf(depth)
    if finite.any():
        near = max(float(depth[finite].min()), 1e-5)
        far = max(near * 1.1, min(float(depth[finite].max()), near * max_range))
    else:
        near, far = 1e-5, max_range
    x = np.log(np.nan_to_num(depth, nan=0).clip(near, far) / near) / math.log(far / near)
    codes = 1 + np.round(x.clip(0, 1) * 65533).astype(np.uint16)
    codes[unknown] = DEPTH_UNKNOWN
    codes[infinite] = DEPTH_INFINITE
    return codes, np.float32(near).item(), np.float32(far).item()


def write_depth(path: str | Path, depth: np.ndarray) -> None:
    """Save depth in metres as the official 16-bit log-encoded PNG with near/far text chunks."""
    from PIL.PngImagePlugin import PngInfo

    codes, near, far = encode_depth(depth)
    info = PngInfo()
    info.add_text("near", str(near))
    info.add_text("far", str(far))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(codes).save(path, pnginfo=info, compress_level=7)  # uint16 -> mode I;16


# --------------------------------------------------------------------------------------------
# Parquet tables
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    """One parquet's rows as columns (no per-row Python objects): matrices as float64 arrays, strings as
    arrow arrays. Column meaning and frames: docs/data.md and SPEC.md section 2."""

    path: Path
    scene_id: pa.Array  # [N] string
    frame_idx: np.ndarray  # [N] int64, the frame's index at the stored rate
    cam_type: pa.Array  # [N] string, the raw camera name
    filename: pa.Array  # [N] string, relative path without extension
    intrinsics: np.ndarray  # [N, 3, 3] of the stored JPEG (pixels)
    extrinsics: np.ndarray  # [N, 3, 4] camera-from-world, OpenCV camera axes
    ego_to_world: np.ndarray  # [N, 3, 4] world-from-ego, ego axes RDF (x right, y down, z forward)
    use_lidar_proj_depth: np.ndarray  # [N] bool (False when the column is absent)
    ego: dict[str, np.ndarray]  # the ego-status columns present: ego_velocity, ego_acceleration [N, 2],
    #                             driving_command [N, 4]
    frame_token: pa.Array | None  # [N] string (nuScenes / NavSim only)

    @property
    def num_rows(self) -> int:
        return len(self.frame_idx)


def _list_column(table: pa.Table, name: str, width: int, path: Path) -> np.ndarray:
    values = table.column(name).combine_chunks()
    if values.null_count:
        raise ValueError(
            f"parquet '{path}': column '{name}' has {values.null_count} empty (null) value(s); "
            f"re-run the official preprocessing for the affected rows"
        )
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if not np.all(lengths == width):
        raise ValueError(
            f"parquet '{path}': column '{name}' must hold {width} numbers per row, found rows with "
            f"{sorted(set(lengths.tolist()) - {width})}"
        )
    # no copy for doubles: a read-only view of the combined arrow buffer (shared, never written)
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False).reshape(-1, width)


def read_table(path: str | Path, config_key: str = "data") -> Table:
    """Read and check one official parquet (columns matched by name: their order is not stable)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"parquet '{path}' does not exist; fix {config_key} (root, dataset and split must "
            f"name <root>/{FILTERED_META_DIR}/<dataset>_<split>.parquet of an official tree)"
        )
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise DataFileError(
            f"cannot read parquet '{path}' ({error}); it is truncated or not a parquet file: "
            f"re-copy it from the preprocessed release"
        ) from None
    names = set(table.column_names)
    if {"scene", "frame_index", "camera", "image_path"} <= names:
        raise ValueError(
            f"parquet '{path}' is in dvgt's former per-scene layout, which is gone: point "
            f"{config_key} at a tree in the official DVGT format (docs/data.md); regenerate synthetic "
            f"data with `dvgt data synth`"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"parquet '{path}' lacks column(s) {missing}: not an official DVGT parquet (required: "
            f"{', '.join(REQUIRED_COLUMNS)}; see docs/data.md)"
        )
    if table.num_rows == 0:
        raise ValueError(f"parquet '{path}' has no rows")
    for name in ("scene_id", "frame_idx", "cam_type", "filename"):
        if table.column(name).null_count:
            raise ValueError(f"parquet '{path}': column '{name}' has empty (null) values")
    matrices = {
        name: _list_column(table, name, REQUIRED_COLUMNS[name], path)
        for name in ("intrinsics", "extrinsics", "ego_to_world")
    }
    if not all(np.isfinite(m).all() for m in matrices.values()):
        bad = next(name for name, m in matrices.items() if not np.isfinite(m).all())
        row = int(np.flatnonzero(~np.isfinite(matrices[bad]).all(-1))[0])
        raise ValueError(
            f"parquet '{path}': column '{bad}' holds a non-finite value in row {row} (scene "
            f"{table.column('scene_id')[row]}, frame {table.column('frame_idx')[row]}); fix or drop "
            f"that row"
        )
    ego = {
        name: _list_column(table, name, OPTIONAL_COLUMNS[name], path) for name in EGO_STATUS_COLUMNS if name in names
    }
    lidar = (
        table.column("use_lidar_proj_depth").to_numpy(zero_copy_only=False).astype(bool)
        if "use_lidar_proj_depth" in names
        else np.zeros(table.num_rows, dtype=bool)
    )
    result = Table(
        path=path,
        scene_id=pc.cast(table.column("scene_id").combine_chunks(), pa.string()),  # the filter casts it to str
        frame_idx=table.column("frame_idx").to_numpy(zero_copy_only=False).astype(np.int64),
        cam_type=pc.cast(table.column("cam_type").combine_chunks(), pa.string()),
        filename=table.column("filename").combine_chunks(),
        intrinsics=matrices["intrinsics"].reshape(-1, 3, 3),
        extrinsics=matrices["extrinsics"].reshape(-1, 3, 4),
        ego_to_world=matrices["ego_to_world"].reshape(-1, 3, 4),
        use_lidar_proj_depth=lidar,
        ego=ego,
        frame_token=table.column("frame_token").combine_chunks() if "frame_token" in names else None,
    )
    del table
    pa.default_memory_pool().release_unused()  # the freed decode buffers (GBs for millions of rows) back to the OS
    return result


def write_table(path: str | Path, columns: Mapping[str, object]) -> Path:
    """Write a parquet the way the official preprocessing does (list<double> matrices, zstd)."""
    arrays = {}
    for name, values in columns.items():
        width = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.get(name, 0)
        if width:
            values = np.asarray(values, dtype=np.float64).reshape(-1, width)
            offsets = np.arange(0, values.size + 1, width, dtype=np.int32)  # [N + 1]: row i is values[i]
            arrays[name] = pa.ListArray.from_arrays(offsets, values.reshape(-1))  # list<double>, no object per row
        else:
            arrays[name] = pa.array(values)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, compression="zstd")
    return path

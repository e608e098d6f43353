"""Scenes and clips of one official parquet: which rows form a scene, and how scenes are cut into the
sequences a dataset serves, exactly as the official dataset class does (scene_dataset.py and
transforms/sequence_utils.py of wzzheng/DVGT).

Split types (``clip_split``):

- ``default_train``: whole scenes; training samples a start frame in each step.
- ``DVGT1``: consecutive non-overlapping clips of ``fixed_num_frames`` frames after frame-rate
  subsampling, the last one may be shorter; named ``{dataset}#{scene}#{k}#cliplen#{n}``.
- ``DVGT2``: sliding windows of ``fixed_num_frames + future_frames``, stride 1, shorter scenes dropped;
  named ``{dataset}#{scene}#{i}#window#{w}``.
- ``long``: the first DVGT1 clip of ``fixed_num_frames + future_frames`` frames of each scene.
- ``nuscenes_planning``: windows of 4 history + 6 future frames, stride 1, named by the frame token of
  the 4th (current) frame.
- ``navtrain`` / ``navtest``: one clip per token of the NavSim scene filter, frames (by value) from
  ``token - (H - 1)`` to ``token + F``; clips lacking a frame are dropped with a warning.
  ``navtrain`` always uses H = 4, F = 8 (the official code passes no window), ``navtest`` takes H =
  ``fixed_num_frames`` and F = ``future_frames``.

Sequences are sorted by name, as the official ``sequence_list``.

Both lists are flat columnar arrays (``SceneIndex``, ``SequenceIndex``: offsets into numpy arrays,
names as arrow string arrays), built with vectorised numpy / arrow operations: a few objects whatever
the number of rows, which forked DataLoader workers read without copying (docs/data.md, "Indexes that
scale"). Indexing one returns a ``Scene`` / ``Sequence`` of views.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from dvgt.data.format import CAMERAS, Table

SPLIT_TYPES = ("default_train", "DVGT1", "DVGT2", "long", "nuscenes_planning", "navtrain", "navtest")
PLANNING_HISTORY, PLANNING_FUTURE = 4, 6  # nuscenes_planning windows (sequence_utils.get_nuscenes_logs)
NAVTRAIN_HISTORY, NAVTRAIN_FUTURE = 4, 8  # navtrain clips (get_navtest_logs defaults)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scene:
    """One scene of a table: its frames (sorted frame_idx values) and the table row of every
    (frame, camera) cell, cameras in the dataset's official order (views into a SceneIndex)."""

    name: str  # the parquet's scene_id
    frames: np.ndarray  # [F] int64 frame_idx values, sorted
    rows: np.ndarray  # [F, C] int64 row numbers into the table


@dataclass(frozen=True)
class Sequence:
    """What the dataset serves at one index: a scene and the frames (by value) of its clip."""

    name: str
    scene: int  # index into the scene list
    frames: np.ndarray  # [n] frame_idx values, sorted


@dataclass(frozen=True)
class SceneIndex:
    """All scenes of a table as flat arrays: scene ``s`` owns positions ``offsets[s]:offsets[s + 1]``
    of ``frames`` and ``rows``. A handful of arrays instead of an object per scene, so that forked
    DataLoader workers read the index without writing to (reference counting) its memory."""

    names: pa.StringArray  # [S] scene_id, sorted
    offsets: np.ndarray  # [S + 1] int64 start of each scene's frames
    frames: np.ndarray  # [P] int64 frame_idx values, sorted within each scene
    rows: np.ndarray  # [P, C] int64 table rows, cameras in the dataset's official order

    def __post_init__(self) -> None:
        for array in (self.offsets, self.frames, self.rows):
            array.flags.writeable = False  # shared by forked workers: a write would copy its pages

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, scene: int) -> Scene:
        if not -len(self) <= scene < len(self):
            raise IndexError(f"scene {scene} of {len(self)}")
        scene %= len(self)
        span = slice(self.offsets[scene], self.offsets[scene + 1])
        return Scene(self.names[scene].as_py(), self.frames[span], self.rows[span])

    def __iter__(self) -> Iterator[Scene]:
        return (self[s] for s in range(len(self)))

    def scene_of(self, positions: np.ndarray) -> np.ndarray:
        """The scene of each position into ``frames``."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def find(self, scenes: np.ndarray, frames: np.ndarray, side: Literal["left", "right"] = "left") -> np.ndarray:
        """np.searchsorted of each frame value within its scene's frames, as a position into ``frames``."""
        low, high = int(self.frames.min()) - 1, int(self.frames.max()) + 1
        span = high - low + 1  # frame values clipped to [low, high] keep their order against every stored frame
        keys = np.repeat(np.arange(len(self)), np.diff(self.offsets)) * span + (self.frames - low)
        return np.searchsorted(keys, scenes * span + (np.clip(frames, low, high) - low), side=side)


@dataclass(frozen=True)
class SequenceIndex:
    """All sequences as flat arrays, sorted by name: sequence ``i`` is scene ``scene[i]``'s frames at
    positions ``start[i], start[i] + stride, ...`` (``count[i]`` of them) of ``scenes.frames``."""

    names: pa.StringArray  # [N] sorted
    scene: np.ndarray  # [N] int64
    start: np.ndarray  # [N] int64 position of the first frame in scenes.frames
    count: np.ndarray  # [N] int64 frames
    stride: int  # the same for every sequence of a split type
    scenes: SceneIndex

    def __post_init__(self) -> None:
        for array in (self.scene, self.start, self.count):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sequence:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} of {len(self)}")
        index %= len(self)
        start = self.start[index]
        frames = self.scenes.frames[start : start + self.stride * self.count[index] : self.stride]
        return Sequence(self.names[index].as_py(), int(self.scene[index]), frames)

    def __iter__(self) -> Iterator[Sequence]:
        return (self[i] for i in range(len(self)))


def build_scenes(table: Table, dataset: str) -> SceneIndex:
    """Group the rows by scene; every frame must have one row per camera of the dataset, as the official
    dataset reads each (frame, camera) cell it may sample. Scenes are sorted by name."""
    cameras = list(CAMERAS[dataset])
    camera_ids = pc.index_in(table.cam_type, pa.array(cameras)).fill_null(-1).to_numpy(zero_copy_only=False)
    unknown = camera_ids < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ValueError(
            f"parquet '{table.path}': camera '{table.cam_type[row]}' (row {row}) is not a camera of "
            f"dataset '{dataset}' ({', '.join(cameras)}); the dataset name comes from the parquet "
            f"name's prefix"
        )
    camera_ids = camera_ids.astype(np.int64)
    encoded = table.scene_id.dictionary_encode()  # [N] indices into the distinct names, in order of appearance
    by_name = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(by_name), dtype=np.int64)
    rank[by_name] = np.arange(len(by_name))
    scene_ids = rank[encoded.indices.to_numpy(zero_copy_only=False)]  # [N] position of the row's scene by name
    order = np.lexsort((camera_ids, table.frame_idx, scene_ids))  # by scene, frame, camera
    scene_ids, frame_idx, camera_ids = scene_ids[order], table.frame_idx[order], camera_ids[order]
    # (scene, frame) cells: each must hold the dataset's cameras exactly once, i.e. cameras 0..C-1 in order
    new_frame = np.flatnonzero(np.diff(scene_ids) | np.diff(frame_idx)) + 1
    first = np.concatenate([[0], new_frame])
    sizes = np.diff(np.concatenate([first, [len(order)]]))
    misplaced = camera_ids != np.arange(len(order)) - np.repeat(first, sizes)  # camera != position in its cell
    bad = (sizes != len(cameras)) | np.logical_or.reduceat(misplaced, first)
    if bad.any():
        scene = int(scene_ids[first[np.flatnonzero(bad)[0]]])
        _raise_incomplete_frame(
            table,
            dataset,
            encoded.dictionary[int(by_name[scene])].as_py(),
            frame_idx[scene_ids == scene],
            camera_ids[scene_ids == scene],
        )
    frame_scenes = scene_ids[first]
    return SceneIndex(
        names=encoded.dictionary.take(by_name),
        frames=frame_idx[first],
        offsets=np.searchsorted(frame_scenes, np.arange(len(by_name) + 1)).astype(np.int64),
        rows=order.reshape(-1, len(cameras)),
    )


def _raise_incomplete_frame(
    table: Table, dataset: str, name: str, frame_idx: np.ndarray, camera_ids: np.ndarray
) -> None:
    """The error for the first (frame, camera) cell of a scene without exactly one row."""
    cameras = list(CAMERAS[dataset])
    frames, frame_pos = np.unique(frame_idx, return_inverse=True)
    counts = np.bincount(frame_pos * len(cameras) + camera_ids, minlength=len(frames) * len(cameras))
    cell = int(np.flatnonzero(counts != 1)[0])
    frame, camera = frames[cell // len(cameras)], cameras[cell % len(cameras)]
    problem = "no row" if counts[cell] == 0 else f"{counts[cell]} rows"
    raise ValueError(
        f"parquet '{table.path}': scene '{name}' frame {frame} has {problem} for camera "
        f"'{camera}'; every frame needs exactly one row per camera of '{dataset}' "
        f"({', '.join(cameras)})"
    )


def fps_step(original_fps: int, target_fps: int = 2) -> int:
    """Frame-rate subsampling step: every k-th stored frame (by position) is used."""
    return max(1, original_fps // target_fps)


def split_sequences(
    scenes: SceneIndex,
    table: Table,
    dataset: str,
    split_type: str,
    *,
    step: int,
    fixed_num_frames: int,
    future_frames: int,
    scene_filter: Path | None = None,
) -> SequenceIndex:
    """The sequences of a split type (module docstring), sorted by name."""
    if split_type not in SPLIT_TYPES:
        raise ValueError(f"unknown clip split '{split_type}'; choose one of {', '.join(SPLIT_TYPES)}")
    if split_type in ("navtrain", "navtest"):
        history, future = (
            (NAVTRAIN_HISTORY, NAVTRAIN_FUTURE) if split_type == "navtrain" else (fixed_num_frames, future_frames)
        )
        return _navsim_clips(scenes, table, scene_filter, history, future)
    lengths = np.diff(scenes.offsets)  # [S] stored frames
    sampled = -(-lengths // step)  # [S] frames after subsampling
    if split_type == "default_train":
        return _sorted(scenes.names, np.arange(len(scenes)), scenes.offsets[:-1], lengths, 1, scenes)
    if split_type in ("DVGT1", "long"):
        length = fixed_num_frames + (future_frames if split_type == "long" else 0)
        if length < 1:
            raise ValueError(f"clip split '{split_type}' needs fixed_num_frames >= 1 (the clip length)")
        clips = np.minimum(-(-sampled // length), 1) if split_type == "long" else -(-sampled // length)
        scene, k = _enumerate(clips)
        count = np.minimum(length, sampled[scene] - k * length)
        names = _join(dataset, scenes.names.take(scene), k, "cliplen", count)
        return _sorted(names, scene, scenes.offsets[scene] + k * length * step, count, step, scenes)
    window = fixed_num_frames + future_frames if split_type == "DVGT2" else PLANNING_HISTORY + PLANNING_FUTURE
    scene, i = _enumerate(np.maximum(sampled - window + 1, 0))
    start = scenes.offsets[scene] + i * step
    if split_type == "DVGT2":
        names = _join(dataset, scenes.names.take(scene), i, "window", np.full(len(i), window))
    else:
        names = _frame_tokens(table, dataset, scenes, start + (PLANNING_HISTORY - 1) * step)
    return _sorted(names, scene, start, np.full(len(i), window), step, scenes)


def _enumerate(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, k) for k in range(counts[owner]) for every owner, in that order."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


def _join(dataset: str, scene_names: pa.Array, number: np.ndarray, kind: str, size: np.ndarray) -> pa.Array:
    """{dataset}#{scene}#{number}#{kind}#{size} for every element."""
    text = lambda values: pc.cast(pa.array(values, type=pa.int64()), pa.string())  # noqa: E731
    return pc.binary_join_element_wise(dataset, scene_names, text(number), kind, text(size), "#")


def _sorted(
    names: pa.Array, scene: np.ndarray, start: np.ndarray, count: np.ndarray, stride: int, scenes: SceneIndex
) -> SequenceIndex:
    order = pc.sort_indices(names).to_numpy()  # stable, by code point as Python sorts strings
    return SequenceIndex(
        names=names.take(order),
        scene=np.asarray(scene, np.int64)[order],
        start=np.asarray(start, np.int64)[order],
        count=np.asarray(count, np.int64)[order],
        stride=stride,
        scenes=scenes,
    )


def _frame_tokens(table: Table, dataset: str, scenes: SceneIndex, positions: np.ndarray) -> pa.Array:
    """The frame token of frames (positions into scenes.frames), from the frame's first row in
    (frame_idx, cam_type) order as the official code names a clip (the camera with the smallest name)."""
    if not len(positions):
        return pa.array([], pa.string())
    if table.frame_token is None:
        raise ValueError(
            f"parquet '{table.path}' has no frame_token column, which clip split 'nuscenes_planning' names its clips by"
        )
    cameras = list(CAMERAS[dataset])
    return table.frame_token.take(scenes.rows[positions, cameras.index(min(cameras))])


def _navsim_clips(
    scenes: SceneIndex, table: Table, scene_filter: Path | None, history: int, future: int
) -> SequenceIndex:
    """One clip per token of the NavSim scene filter yaml (its ``tokens:`` list)."""
    if scene_filter is None or not Path(scene_filter).is_file():
        raise FileNotFoundError(
            f"NavSim scene filter '{scene_filter}' does not exist; the navtrain/navtest clip "
            f"splits read its token list (the official file is "
            f"third_party/navsim_v1_1/.../scene_filter/<split>.yaml under the tree's root)"
        )
    if table.frame_token is None:
        raise ValueError(f"parquet '{table.path}' has no frame_token column, which NavSim clips are selected by")
    with open(scene_filter, encoding="utf-8") as file:
        tokens = set((yaml.safe_load(file) or {}).get("tokens") or [])
    # every token's first cell in (scene, frame, camera) order
    cell_tokens = pc.cast(table.frame_token, pa.string()).take(scenes.rows.reshape(-1))
    wanted = pc.is_in(cell_tokens, value_set=pa.array(sorted(tokens), pa.string()))
    cells = pa.table(
        {"token": cell_tokens.filter(wanted), "cell": np.flatnonzero(wanted.to_numpy(zero_copy_only=False))}
    )
    found = cells.group_by("token").aggregate([("cell", "min")])
    absent = sorted(tokens - set(found.column("token").to_pylist()))
    if absent:
        raise ValueError(
            f"{len(absent)} token(s) of the scene filter '{scene_filter}' are not in parquet "
            f"'{table.path}' (first: {absent[0]}); use a scene filter reduced to the parquet's logs"
        )
    names = found.column("token").combine_chunks()
    position = found.column("cell_min").to_numpy() // scenes.rows.shape[1]  # [T] the token's frame
    scene, centre = scenes.scene_of(position), scenes.frames[position]
    start = scenes.find(scene, centre - (history - 1))
    count = scenes.find(scene, centre + future, side="right") - start
    complete = count == max(history + future, 0)  # frames are distinct integers: all present iff all counted
    for t in np.flatnonzero(~complete):
        present = set(scenes[int(scene[t])].frames.tolist())
        log.warning(
            "NavSim token %s of scene %s lacks frame(s) %s: dropped",
            names[t].as_py(),
            scenes.names[int(scene[t])].as_py(),
            sorted(set(range(centre[t] - (history - 1), centre[t] + future + 1)) - present),
        )
    keep = np.flatnonzero(complete)
    return _sorted(names.take(keep), scene[keep], start[keep], count[keep], 1, scenes)

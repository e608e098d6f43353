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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from dvgt.data.format import CAMERAS, Table

SPLIT_TYPES = ("default_train", "DVGT1", "DVGT2", "long", "nuscenes_planning", "navtrain", "navtest")
PLANNING_HISTORY, PLANNING_FUTURE = 4, 6  # nuscenes_planning windows (sequence_utils.get_nuscenes_logs)
NAVTRAIN_HISTORY, NAVTRAIN_FUTURE = 4, 8  # navtrain clips (get_navtest_logs defaults)

log = logging.getLogger(__name__)


@dataclass
class Scene:
    """One scene of a table: its frames (sorted frame_idx values) and the table row of every
    (frame, camera) cell, cameras in the dataset's official order."""

    name: str  # the parquet's scene_id
    frames: np.ndarray  # [F] int64 frame_idx values, sorted
    rows: np.ndarray  # [F, C] int64 row numbers into the table


@dataclass(frozen=True)
class Sequence:
    """What the dataset serves at one index: a scene and the frames (by value) of its clip."""

    name: str
    scene: int  # index into the scene list
    frames: np.ndarray  # [n] frame_idx values, sorted


def build_scenes(table: Table, dataset: str) -> list[Scene]:
    """Group the rows by scene; every frame must have one row per camera of the dataset, as the official
    dataset reads each (frame, camera) cell it may sample. Scenes are sorted by name."""
    cameras = list(CAMERAS[dataset])
    camera_ids = pc.index_in(table.cam_type, pa.array(cameras)).fill_null(-1).to_numpy(zero_copy_only=False)
    unknown = camera_ids < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ValueError(f"parquet '{table.path}': camera '{table.cam_type[row]}' (row {row}) is not a camera of "
                         f"dataset '{dataset}' ({', '.join(cameras)}); the dataset name comes from the parquet "
                         f"name's prefix")
    camera_ids = camera_ids.astype(np.int64)
    scene_names, scene_ids = np.unique(table.scene_id.to_numpy(zero_copy_only=False), return_inverse=True)
    order = np.lexsort((camera_ids, table.frame_idx, scene_ids))  # by scene, frame, camera
    scenes = []
    bounds = np.searchsorted(scene_ids[order], np.arange(len(scene_names) + 1))
    for s, name in enumerate(scene_names):
        rows = order[bounds[s]:bounds[s + 1]]
        frames, frame_pos = np.unique(table.frame_idx[rows], return_inverse=True)
        grid = np.full((len(frames), len(cameras)), -1, dtype=np.int64)
        cells = frame_pos * len(cameras) + camera_ids[rows]
        counts = np.bincount(cells, minlength=grid.size)
        if (counts != 1).any():
            cell = int(np.flatnonzero(counts != 1)[0])
            frame, camera = frames[cell // len(cameras)], cameras[cell % len(cameras)]
            problem = "no row" if counts[cell] == 0 else f"{counts[cell]} rows"
            raise ValueError(f"parquet '{table.path}': scene '{name}' frame {frame} has {problem} for camera "
                             f"'{camera}'; every frame needs exactly one row per camera of '{dataset}' "
                             f"({', '.join(cameras)})")
        grid.reshape(-1)[cells] = rows
        scenes.append(Scene(str(name), frames, grid))
    return scenes


def fps_step(original_fps: int, target_fps: int = 2) -> int:
    """Frame-rate subsampling step: every k-th stored frame (by position) is used."""
    return max(1, original_fps // target_fps)


def split_sequences(scenes: list[Scene], table: Table, dataset: str, split_type: str, *, step: int,
                    fixed_num_frames: int, future_frames: int, scene_filter: Path | None = None) -> list[Sequence]:
    """The sequences of a split type (module docstring), sorted by name."""
    if split_type not in SPLIT_TYPES:
        raise ValueError(f"unknown clip split '{split_type}'; choose one of {', '.join(SPLIT_TYPES)}")
    sequences: list[Sequence] = []
    for index, scene in enumerate(scenes):
        sampled = scene.frames[::step]
        if split_type == "default_train":
            sequences.append(Sequence(scene.name, index, scene.frames))
        elif split_type in ("DVGT1", "long"):
            length = fixed_num_frames + (future_frames if split_type == "long" else 0)
            if length < 1:
                raise ValueError(f"clip split '{split_type}' needs fixed_num_frames >= 1 (the clip length)")
            starts = range(0, len(sampled), length)[:1 if split_type == "long" else None]
            for k, start in enumerate(starts):
                clip = sampled[start:start + length]
                sequences.append(Sequence(f"{dataset}#{scene.name}#{k}#cliplen#{len(clip)}", index, clip))
        elif split_type in ("DVGT2", "nuscenes_planning"):
            window = fixed_num_frames + future_frames if split_type == "DVGT2" else PLANNING_HISTORY + PLANNING_FUTURE
            for i in range(len(sampled) - window + 1):
                clip = sampled[i:i + window]
                if split_type == "DVGT2":
                    name = f"{dataset}#{scene.name}#{i}#window#{window}"
                else:
                    name = _frame_token(table, scene, clip[PLANNING_HISTORY - 1])
                sequences.append(Sequence(name, index, clip))
    if split_type in ("navtrain", "navtest"):
        history, future = ((NAVTRAIN_HISTORY, NAVTRAIN_FUTURE) if split_type == "navtrain"
                           else (fixed_num_frames, future_frames))
        sequences = _navsim_clips(scenes, table, scene_filter, history, future)
    return sorted(sequences, key=lambda s: s.name)


def _frame_token(table: Table, scene: Scene, frame: int) -> str:
    if table.frame_token is None:
        raise ValueError(f"parquet '{table.path}' has no frame_token column, which clip split 'nuscenes_planning' "
                         f"names its clips by")
    rows = scene.rows[np.searchsorted(scene.frames, frame)]
    # the official code names the clip by the frame's first row in (frame_idx, cam_type) order
    first = min(rows, key=lambda row: table.cam_type[int(row)].as_py())
    return table.frame_token[int(first)].as_py()


def _navsim_clips(scenes: list[Scene], table: Table, scene_filter: Path | None, history: int,
                  future: int) -> list[Sequence]:
    """One clip per token of the NavSim scene filter yaml (its ``tokens:`` list)."""
    if scene_filter is None or not Path(scene_filter).is_file():
        raise FileNotFoundError(f"NavSim scene filter '{scene_filter}' does not exist; the navtrain/navtest clip "
                                f"splits read its token list (the official file is "
                                f"third_party/navsim_v1_1/.../scene_filter/<split>.yaml under the tree's root)")
    if table.frame_token is None:
        raise ValueError(f"parquet '{table.path}' has no frame_token column, which NavSim clips are selected by")
    with open(scene_filter, encoding="utf-8") as file:
        tokens = set((yaml.safe_load(file) or {}).get("tokens") or [])
    location = {}  # token -> (scene index, frame_idx)
    for index, scene in enumerate(scenes):
        for f, frame in enumerate(scene.frames):
            for row in scene.rows[f]:
                token = table.frame_token[int(row)].as_py()
                if token in tokens and token not in location:
                    location[token] = (index, int(frame))
    absent = sorted(tokens - set(location))
    if absent:
        raise ValueError(f"{len(absent)} token(s) of the scene filter '{scene_filter}' are not in parquet "
                         f"'{table.path}' (first: {absent[0]}); use a scene filter reduced to the parquet's logs")
    sequences = []
    for token in tokens:
        index, centre = location[token]
        scene = scenes[index]
        wanted = np.arange(centre - (history - 1), centre + future + 1)
        present = scene.frames[np.isin(scene.frames, wanted)]
        if len(present) != len(wanted):
            log.warning("NavSim token %s of scene %s lacks frame(s) %s: dropped", token, scene.name,
                        sorted(set(wanted.tolist()) - set(present.tolist())))
            continue
        sequences.append(Sequence(token, index, present))
    return sequences

"""The flat data index (dvgt/data/scenes.py): the same scenes and sequences as a plain per-row grouping
and the official clip rules written as loops, on the official fixture tree and a generator tree, and a
fixed number of Python objects whatever the number of rows (what keeps forked workers' memory flat)."""

import gc
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import OFFICIAL_TREE

from dvgt.data import format as fmt
from dvgt.data.scene_dataset import DatasetSpec, SceneDataset
from dvgt.data.scenes import (
    NAVTRAIN_FUTURE,
    NAVTRAIN_HISTORY,
    PLANNING_FUTURE,
    PLANNING_HISTORY,
    build_scenes,
    split_sequences,
)
from dvgt.data.synthetic import generate_synthetic_dataset

CLIPS = [
    ("default_train", 1, 0, 0),
    ("DVGT1", 1, 4, 0),
    ("DVGT1", 5, 3, 0),
    ("long", 2, 2, 1),
    ("DVGT2", 1, 3, 2),
    ("DVGT2", 5, 1, 1),
    ("nuscenes_planning", 1, 0, 0),
]  # (split type, step, fixed_num_frames, future_frames)


def reference_scenes(table: fmt.Table, dataset: str) -> list[tuple[str, list[int], list[list[int]]]]:
    """(name, frames, rows [F][C]) per scene by name, from a dict of every row."""
    cells: dict = {}
    for row, (scene, frame, camera) in enumerate(
        zip(table.scene_id.to_pylist(), table.frame_idx.tolist(), table.cam_type.to_pylist())
    ):
        cells.setdefault(scene, {}).setdefault(frame, {})[camera] = row
    return [
        (name, sorted(frames), [[frames[f][c] for c in fmt.CAMERAS[dataset]] for f in sorted(frames)])
        for name, frames in sorted(cells.items())
    ]


def reference_sequences(
    scenes,
    table: fmt.Table,
    dataset: str,
    split_type: str,
    step: int,
    frames: int,
    future: int,
    scene_filter: Path | None,
) -> list[tuple[str, int, list[int]]]:
    """The module docstring's clip rules, one loop per scene (navtrain: per filter token)."""
    tokens = table.frame_token.to_pylist() if table.frame_token is not None else None
    first_camera = int(np.argmin(list(fmt.CAMERAS[dataset])))  # the smallest raw camera name
    out = []
    for index, (scene, scene_frames, rows) in enumerate(scenes):
        sampled = scene_frames[::step]
        if split_type == "default_train":
            out.append((scene, index, scene_frames))
        elif split_type in ("DVGT1", "long"):
            length = frames + (future if split_type == "long" else 0)
            chunks = [sampled[k : k + length] for k in range(0, len(sampled), length)]
            for k, clip in enumerate(chunks[:1] if split_type == "long" else chunks):
                out.append((f"{dataset}#{scene}#{k}#cliplen#{len(clip)}", index, clip))
        elif split_type == "DVGT2":
            window = frames + future
            for i in range(len(sampled) - window + 1):
                out.append((f"{dataset}#{scene}#{i}#window#{window}", index, sampled[i : i + window]))
        elif split_type == "nuscenes_planning":
            for i in range(len(sampled) - PLANNING_HISTORY - PLANNING_FUTURE + 1):
                clip = sampled[i : i + PLANNING_HISTORY + PLANNING_FUTURE]
                current = rows[scene_frames.index(clip[PLANNING_HISTORY - 1])]
                out.append((tokens[current[first_camera]], index, clip))
    if split_type == "navtrain":
        wanted = set(yaml.safe_load(scene_filter.read_text())["tokens"])
        first = {}
        for index, (_, scene_frames, rows) in enumerate(scenes):
            for frame, cells in zip(scene_frames, rows):
                for row in cells:
                    first.setdefault(tokens[row], (index, frame))
        for token in wanted:
            index, centre = first[token]
            clip = list(range(centre - NAVTRAIN_HISTORY + 1, centre + NAVTRAIN_FUTURE + 1))
            if set(clip) <= set(scenes[index][1]):
                out.append((token, index, clip))
    return sorted(out, key=lambda s: s[0])


@pytest.fixture(scope="module")
def generated_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    generate_synthetic_dataset(root, "val", num_scenes=3, num_frames=9, height=16, width=32, seed=5)
    return root


def parquets(generated_tree: Path) -> list[tuple[Path, Path]]:
    """(tree root, parquet) of every official fixture parquet and the generator's."""
    return [
        (tree, path)
        for tree in (OFFICIAL_TREE, generated_tree)
        for path in sorted((tree / fmt.FILTERED_META_DIR).glob("*.parquet"))
    ]


def test_the_flat_index_holds_the_scenes_and_sequences_of_per_row_loops(generated_tree):
    checked = set()
    for tree, path in parquets(generated_tree):
        dataset, table = fmt.dataset_of(path), fmt.read_table(path)
        scenes = build_scenes(table, dataset)
        expected = reference_scenes(table, dataset)
        assert [(s.name, s.frames.tolist(), s.rows.tolist()) for s in scenes] == expected, path.name
        clips = CLIPS + ([("navtrain", 1, 0, 0)] if dataset == "openscene" else [])
        for split_type, step, frames, future in clips:
            if split_type in ("nuscenes_planning", "navtrain") and table.frame_token is None:
                continue
            scene_filter = fmt.Tree(tree, dataset).scene_filter(split_type)
            sequences = split_sequences(
                scenes,
                table,
                dataset,
                split_type,
                step=step,
                fixed_num_frames=frames,
                future_frames=future,
                scene_filter=scene_filter,
            )
            ours = [(s.name, s.scene, s.frames.tolist()) for s in sequences]
            assert ours == reference_sequences(
                expected, table, dataset, split_type, step, frames, future, scene_filter
            ), (path.name, split_type, step)
            if ours:
                checked.add((dataset, split_type))
    assert {d for d, _ in checked} == {"nuscene", "kitti", "openscene", "demo"}
    assert {s for _, s in checked} == {c[0] for c in CLIPS} | {"navtrain"}  # every rule produced clips somewhere


def python_objects(root: object) -> int:
    """Python objects reachable from ``root`` (types, modules and functions aside)."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def write_demo_table(root: Path, scenes: int, frames: int) -> Path:
    cameras = list(fmt.CAMERAS["demo"])
    n = scenes * frames * len(cameras)
    cells = np.arange(n)
    pose = np.tile(np.eye(4)[:3].reshape(-1), (n, 1))
    return fmt.write_table(
        fmt.Tree(root, "demo").parquet("val"),
        {
            "scene_id": [f"scene-{c // (frames * len(cameras))}" for c in cells],
            "frame_idx": cells // len(cameras) % frames,
            "cam_type": [cameras[c % len(cameras)] for c in cells],
            "filename": [f"f{c}" for c in cells],
            "intrinsics": np.tile(np.eye(3).reshape(-1), (n, 1)),
            "extrinsics": pose,
            "ego_to_world": pose,
        },
    )


def test_the_index_holds_the_same_number_of_python_objects_for_any_number_of_rows(tmp_path):
    """No object per row, scene or sequence: what a forked DataLoader worker touches (and so copies on
    write through reference counts) does not grow with the table (benchmarks/data_index.py measures it)."""
    counts = []
    for scenes, frames in ((1, 6), (30, 20)):
        root = tmp_path / f"{scenes}x{frames}"
        write_demo_table(root, scenes, frames)
        dataset = SceneDataset(
            DatasetSpec(
                root=root,
                parquet=fmt.Tree(root, "demo").parquet("val"),
                clip_split="DVGT2",
                fixed_num_frames=2,
                future_frames=1,
                targets=frozenset({"depths"}),
            )
        )
        counts.append((len(dataset.sequences), python_objects(dataset)))
    assert counts[0][0] == 4 and counts[1][0] == 30 * 18
    assert counts[0][1] == counts[1][1]

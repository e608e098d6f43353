"""How long the quick `dvgt data check` (what the trainer runs at every start) takes on a large tree,
and what deciding file presence by directory listings saves over one stat per file, side by side.

    .venv/bin/python benchmarks/data_check.py [--rows 1000000] [--frames-per-scene 40]

Writes a synthetic official-format tree (dataset openscene: 8 cameras, files laid out as the OpenScene
release, <log>/<camera>/<frame>) of --rows rows with an empty JPEG and depth PNG per row (the quick check
opens no file), then times, on the same tree in one run:
1. the whole quick check of the parquet (read_table, build_scenes, counts, presence of every file);
2. presence of all image and depth files by listing (dvgt.data.check.present) vs by os.path.isfile per file.
Each timing is the fastest of 3. The page cache is warm (the tree was just written); on a network filesystem (a PVC over NFS) each stat is a
round trip unless attributes are cached, so the ratio there is larger than here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dvgt.data import format as fmt
from dvgt.data.check import Target, check_target, present


def matrices(rows: int, template: np.ndarray) -> pa.Array:
    """A list<double> column (the official writer's type) of one matrix repeated on every row."""
    values = np.tile(template.reshape(-1), rows)
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * template.size + 1, template.size, dtype=np.int32)), pa.array(values)
    )


def write_tree(root: Path, rows: int, frames_per_scene: int) -> Target:
    cameras = list(fmt.CAMERAS["openscene"])
    per_scene = frames_per_scene * len(cameras)
    scenes = -(-rows // per_scene)
    scene = np.repeat(np.arange(scenes), per_scene)[:rows]
    frame = np.tile(np.repeat(np.arange(frames_per_scene), len(cameras)), scenes)[:rows]
    camera = np.tile(np.arange(len(cameras)), rows // len(cameras) + 1)[:rows]
    scene_names = np.array([f"2021.05.12.22.00.38_veh-35_{s:05d}" for s in range(scenes)])
    camera_names = np.array(cameras)
    filenames = [f"{scene_names[s]}/{camera_names[c]}/{f:06d}" for s, c, f in zip(scene, camera, frame)]
    intrinsics = np.array([[500.0, 0, 480], [0, 500, 270], [0, 0, 1]])
    pose = np.hstack([np.eye(3), np.zeros((3, 1))])
    table = pa.table(
        {
            "scene_id": pa.array(scene_names[scene]),
            "frame_idx": pa.array(frame),
            "cam_type": pa.array(camera_names[camera]),
            "filename": pa.array(filenames),
            "intrinsics": matrices(rows, intrinsics),
            "extrinsics": matrices(rows, pose),
            "ego_to_world": matrices(rows, pose),
        }
    )
    target = Target(root, "openscene", "bench")
    target.parquet.parent.mkdir(parents=True)
    pq.write_table(table, target.parquet, compression="zstd")
    tree = fmt.Tree(root, "openscene")
    for name in filenames:
        for path in (tree.image(name), tree.depth(name, projected=False)):
            try:
                open(path, "wb").close()
            except FileNotFoundError:
                path.parent.mkdir(parents=True)
                open(path, "wb").close()
    return target


def timed(function, repeats: int = 1):
    """(result, the fastest of ``repeats`` timings in seconds)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--frames-per-scene", type=int, default=40)
    parser.add_argument("--dir", default=None, help="where to write the tree (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dvgt-check-bench-", dir=args.dir))
    try:
        target, seconds = timed(lambda: write_tree(root, args.rows, args.frames_per_scene))
        print(f"tree: {args.rows:,} rows, {2 * args.rows:,} files, written in {seconds:.1f} s ({root})")
        report, quick = timed(lambda: check_target(target), repeats=3)
        assert report.ok and report.images.present == args.rows, report.problems[:3]
        print(f"quick check: {quick:.2f} s ({report.scenes:,} scenes, {report.frames:,} frames, {report.rows:,} rows)")

        tree = fmt.Tree(root, "openscene")
        folders = [str(tree.image("x").parent), str(tree.depth("x", projected=False).parent)]
        filenames = fmt.read_table(target.parquet).filename
        names = {suffix: pa.array([f"{n}{suffix}" for n in filenames.to_pylist()]) for suffix in (".jpg", ".png")}
        _, listing = timed(lambda: [present(Path(folder), names[s]) for folder, s in zip(folders, names)], repeats=3)
        by_stat, stat = timed(
            lambda: [
                [os.path.isfile(f"{folder}/{n}") for n in names[s].to_pylist()] for folder, s in zip(folders, names)
            ],
            repeats=3,
        )
        assert all(all(found) for found in by_stat)
        print(
            f"presence of {2 * args.rows:,} files: listing {listing:.2f} s, stat per file {stat:.2f} s "
            f"(listing is {stat / listing:.1f}x faster)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

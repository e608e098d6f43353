"""Index build time and DataLoader worker memory on a multi-million-row official parquet, this tree vs a baseline.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/data_index.py [--rows 5000000] [--workers 8]
        [--clip-split DVGT2] [--baseline f3139bb] [--work runs/bench/data-index]

1. Writes (once, kept under --work) a synthetic official-format parquet of --rows rows: dataset
   'openscene' (8 cameras), scenes of --frames-per-scene frames at 2 Hz, every official column with
   random values (no images: the index never opens them).
2. For this tree and for the --baseline git revision (default f3139bb, the per-scene / per-sequence
   Python objects the flat index replaced; 'none' skips it), each in its own fresh process, one after
   the other: builds the SceneDataset (read_table, build_scenes, split_sequences timed apart), then makes
   --passes passes over every sequence, in a new random order each pass as training draws them, with
   --workers forked DataLoader workers (persistent), each item reading what SceneDataset.build and
   .filenames read from the index and the table (sequence, scene, rows, the rows' extrinsics and ego
   poses, file names) but no file.
3. Memory from /proc/PID/smaps_rollup: RSS, and USS = Private_Clean + Private_Dirty (the pages only that
   process holds: what copy-on-write after fork has duplicated). Workers: right after the fork (in
   worker_init_fn, before any item) and after each pass, mean and max over the workers.

Goals (docs/data.md, "Indexes that scale"): index build under 10 s on 5 million rows; workers' USS flat
after the first pass (no growth in later passes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET, SPLIT = "openscene", "bench"
MIB = 2**20


# ---- the table --------------------------------------------------------------------------------


def write_parquet(root: Path, rows: int, frames_per_scene: int, seed: int = 0) -> Path:
    """A synthetic official parquet of ``rows`` rows (scene-major, then frame, then camera)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dvgt.data import format as fmt

    cameras = list(fmt.CAMERAS[DATASET])
    frames = rows // len(cameras)
    rng = np.random.default_rng(seed)
    frame = np.arange(frames)
    scene, frame_idx = frame // frames_per_scene, frame % frames_per_scene
    text = lambda values: pc.cast(pa.array(values), pa.string())  # noqa: E731
    scene_names = pc.binary_join_element_wise("log", text(np.repeat(scene, len(cameras))), "-")
    cam_type = pa.array(np.tile(cameras, frames))
    frame_text = text(np.repeat(frame_idx, len(cameras)))
    n = frames * len(cameras)
    columns = {
        "scene_id": scene_names,
        "frame_idx": np.repeat(frame_idx, len(cameras)),
        "cam_type": cam_type,
        "filename": pc.binary_join_element_wise(scene_names, cam_type, frame_text, "/"),
        "frame_token": pc.binary_join_element_wise("token", text(np.repeat(frame, len(cameras))), "-"),
        "intrinsics": rng.random((n, 9)),
        "extrinsics": rng.random((n, 12)),
        "ego_to_world": rng.random((n, 12)),
        "ego_velocity": rng.random((n, 2)),
        "ego_acceleration": rng.random((n, 2)),
        "driving_command": rng.random((n, 4)),
        "use_lidar_proj_depth": rng.random(n) < 0.1,
    }
    return fmt.write_table(fmt.Tree(root, DATASET).parquet(SPLIT), columns)


# ---- one implementation, in its own process -----------------------------------------------------


def smaps(pid: int | str = "self") -> dict[str, float]:
    """RSS and USS (Private_Clean + Private_Dirty) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"] / MIB, "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / MIB}


class IndexPass:
    """Sequence i -> what building its sample reads from the index and the table, reduced to a number."""

    def __init__(self, dataset, report_dir: str):
        self.dataset, self.report_dir = dataset, report_dir

    def __len__(self) -> int:
        return len(self.dataset.sequences)

    def __getitem__(self, index: int) -> float:
        d = self.dataset
        sequence = d.sequences[index]
        scene = d.scenes[sequence.scene]
        rows = scene.rows[np.searchsorted(scene.frames, sequence.frames)]  # [T, C]
        names = d.filenames(sequence, sequence.frames, list(range(d.num_cameras)))
        return float(d.table.extrinsics[rows].sum() + d.table.ego_to_world[rows[:, 0]].sum() + len(names[-1]))

    def worker_started(self, worker_id: int) -> None:
        """worker_init_fn: the worker's memory right after the fork, before any item."""
        Path(self.report_dir, f"{os.getpid()}.json").write_text(json.dumps(smaps()))


def measure(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import dvgt
    from dvgt.data import format as fmt
    from dvgt.data import scene_dataset

    timings: dict[str, float] = {}

    def timed(name, function):
        def run(*a, **k):
            started = time.perf_counter()
            result = function(*a, **k)
            timings[name] = time.perf_counter() - started
            return result

        return run

    fmt.read_table = timed("read_table", fmt.read_table)
    scene_dataset.build_scenes = timed("build_scenes", scene_dataset.build_scenes)
    scene_dataset.split_sequences = timed("split_sequences", scene_dataset.split_sequences)
    root = Path(args.root)
    started = time.perf_counter()
    dataset = scene_dataset.SceneDataset(
        scene_dataset.DatasetSpec(
            root=root,
            parquet=fmt.Tree(root, DATASET).parquet(SPLIT),
            clip_split=args.clip_split,
            fixed_num_frames=args.frames,
            future_frames=args.future,
            fixed_aspect_ratio=1.77,
        )
    )
    timings["dataset"] = time.perf_counter() - started
    gc.collect()
    result = {
        "module": dvgt.__file__,
        "rows": dataset.table.num_rows,
        "scenes": len(dataset.scenes),
        "sequences": len(dataset.sequences),
        "timings": timings,
        "main": smaps(),
        "passes": [],
    }
    with tempfile.TemporaryDirectory() as reports:
        served = IndexPass(dataset, reports)
        loader = DataLoader(
            served,
            batch_size=args.batch,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            num_workers=args.workers,
            persistent_workers=True,
            multiprocessing_context="fork",
            worker_init_fn=served.worker_started,
        )
        for _ in range(args.passes):
            started = time.perf_counter()
            total = sum(float(batch.sum()) for batch in loader)
            workers = [smaps(int(p.stem)) for p in Path(reports).glob("*.json")]
            result["passes"].append(
                {"seconds": time.perf_counter() - started, "checksum": total, "workers": workers, "main": smaps()}
            )
        result["forked"] = [json.loads(p.read_text()) for p in Path(reports).glob("*.json")]
        del loader
    return result


def run_implementation(code_root: Path, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh interpreter that imports dvgt from ``code_root``."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        "--root",
        str(args.root),
        "--workers",
        str(args.workers),
        "--passes",
        str(args.passes),
        "--batch",
        str(args.batch),
        "--clip-split",
        args.clip_split,
        "--frames",
        str(args.frames),
        "--future",
        str(args.future),
    ]
    with tempfile.TemporaryDirectory() as cwd:  # not the repository: its dvgt/ would shadow code_root's
        done = subprocess.run(
            command,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(code_root)},
            stdout=subprocess.PIPE,
            check=True,
            text=True,
        )
    result = json.loads(done.stdout.splitlines()[-1])
    if not result["module"].startswith(str(code_root)):
        raise RuntimeError(f"the measurement imported {result['module']}, not dvgt from {code_root}")
    return result


def baseline_tree(revision: str, into: Path) -> Path:
    """The dvgt package of a git revision, extracted under ``into``."""
    archive = into / "dvgt.tar"
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "archive", "-o", str(archive), revision, "dvgt"],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            f"--baseline {revision}: git archive failed ({error.stderr.strip()}); pass a revision of "
            f"this repository or --baseline none"
        ) from None
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


# ---- report -------------------------------------------------------------------------------------


def summary(workers: list[dict], key: str) -> str:
    values = [w[key] for w in workers]
    return f"{np.mean(values):7.1f} ({np.max(values):7.1f})"


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    first = next(iter(results.values()))
    print(
        f"{first['rows']:,} rows ({DATASET}, 8 cameras, {first['scenes']:,} scenes of {args.frames_per_scene} "
        f"frames), clip split {args.clip_split} (frames {args.frames}, future {args.future}): "
        f"{first['sequences']:,} sequences; {args.workers} forked workers, {args.passes} passes"
    )
    names = list(results)
    print(f"{'':44}" + "".join(f"{n:>22}" for n in names) + ("   ratio" if len(names) == 2 else ""))

    def line(label: str, values: list[float], fmt: str = "{:22.2f}") -> None:
        ratio = f"   {values[1] / values[0]:5.2f}" if len(values) == 2 and values[0] else ""
        print(f"{label:44}" + "".join(fmt.format(v) for v in values) + ratio)

    for key, label in (
        ("read_table", "read_table (s)"),
        ("build_scenes", "build_scenes (s)"),
        ("split_sequences", "split_sequences (s)"),
    ):
        line(label, [r["timings"][key] for r in results.values()])
    line(
        "index build: build_scenes + split_sequences (s)",
        [r["timings"]["build_scenes"] + r["timings"]["split_sequences"] for r in results.values()],
    )
    line("SceneDataset total (s)", [r["timings"]["dataset"] for r in results.values()])
    line("main RSS after build (MiB)", [r["main"]["rss"] for r in results.values()], "{:22.1f}")
    line("main USS after build (MiB)", [r["main"]["uss"] for r in results.values()], "{:22.1f}")
    for p in range(args.passes):
        line(f"pass {p + 1} time (s)", [r["passes"][p]["seconds"] for r in results.values()])
    print("workers, mean (max) MiB:")
    stages = [("forked", lambda r: r["forked"])] + [
        (f"after pass {p + 1}", lambda r, p=p: r["passes"][p]["workers"]) for p in range(args.passes)
    ]
    for key in ("uss", "rss"):
        for stage, workers in stages:
            print(f"  {key.upper()} {stage:39}" + "".join(f"{summary(workers(r), key):>22}" for r in results.values()))
    checksums = {round(r["passes"][0]["checksum"], 3) for r in results.values()}
    print("same items served by every implementation:", len(checksums) == 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--frames-per-scene", type=int, default=40, help="40: a 20 s nuScenes-like scene at 2 Hz")
    parser.add_argument("--clip-split", default="DVGT2", help="the split type whose sequences are indexed")
    parser.add_argument("--frames", type=int, default=4, help="fixed_num_frames")
    parser.add_argument("--future", type=int, default=4, help="future_frames")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--baseline", default="f3139bb", help="git revision to compare with, or 'none'")
    parser.add_argument("--work", default=str(REPO / "runs/bench/data-index"), help="where the table is kept")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    if args.write:
        started = time.perf_counter()
        path = write_parquet(Path(args.root), args.rows, args.frames_per_scene)
        print(f"wrote {path} ({path.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - started:.1f} s")
        return
    args.root = Path(args.work) / f"{args.rows}-rows-{args.frames_per_scene}-frames"
    if not (args.root / "done").is_file():  # written in its own process, whose memory is gone before measuring
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--write",
                "--root",
                str(args.root),
                "--rows",
                str(args.rows),
                "--frames-per-scene",
                str(args.frames_per_scene),
            ],
            check=True,
        )
        (args.root / "done").touch()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        if args.baseline != "none":
            results[f"baseline {args.baseline}"] = run_implementation(baseline_tree(args.baseline, Path(tmp)), args)
        results["this tree"] = run_implementation(REPO, args)
    report(results, args)


if __name__ == "__main__":
    main()

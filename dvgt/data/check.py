"""`dvgt data check`: scan an official tree before anyone spends GPU hours on it.

Two depths of checking, both per parquet (one dataset and split):

- quick (the default, and what the trainer runs at every start): the parquet is read and checked by the
  reader itself (``format.read_table``: readable, the official columns, finite matrices; then
  ``scenes.build_scenes``: every frame has one row per camera), and every image and depth file the rows
  name is present. Presence is decided from one directory listing per folder compared against the expected
  names (one ``listdir`` per folder instead of one ``stat`` per file: benchmarks/data_check.py measures the
  two), so a tree of millions of rows is checked in seconds.
- deep (``--deep``): also decodes every image and depth PNG with the reader's own functions (a depth PNG
  without near/far is refused there), checks that depth and image have the same size, and that every
  rotation (camera extrinsics, ego poses) is orthonormal with determinant +1.

Which depth file a row needs follows the reader (scene_dataset.py:_load_view): ``proj_depth`` where the
row's ``use_lidar_proj_depth`` is set or the split evaluates on LiDAR depth (``eval_lidar_proj_depth``),
else ``align_depth``; none where ``filter_lidar`` drops the row's depth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dvgt.data import format as fmt
from dvgt.data.remote import S3Root, open_root, read_file
from dvgt.data.scenes import build_scenes

ROTATION_TOLERANCE = (
    1e-3  # |R R^T - I| and |det R - 1|: float32-stored rotations pass, a scaled or sheared one does not
)
KEPT_PROBLEMS = 1000  # problems remembered per parquet (all are counted)


class DataCheckError(ValueError):
    """A tree failed the check; the message names the first offending file and how to see them all."""


@dataclass(frozen=True)
class Target:
    """One parquet to check and how the reader will read its depth."""

    root: Path  # the tree's folder (of an s3:// root: its mirror in the node cache)
    dataset: str
    split: str
    filter_lidar: bool = False  # rows flagged use_lidar_proj_depth get no depth (data.<split>.filter_lidar)
    projected: bool = False  # every row reads proj_depth (data.<split>.eval_lidar_proj_depth)
    remote: S3Root | None = field(default=None, compare=False)  # the s3:// root the files come from
    config_key: str | None = field(default=None, compare=False)  # the config entry it comes from, for errors

    @property
    def location(self) -> str:
        """The root as the user named it (a path or s3://bucket/prefix)."""
        return self.remote.uri if self.remote is not None else str(self.root)

    def name(self, path: Path) -> str:
        """A file of the tree as the user can find it (its s3:// address for an s3:// root)."""
        return self.remote.object_uri(path) if self.remote is not None else str(path)

    @property
    def parquet(self) -> Path:
        return fmt.Tree(Path(self.root), self.dataset).parquet(self.split)


@dataclass
class Files:
    """Counts of one kind of file (images or depths) of a parquet."""

    present: int = 0
    missing: int = 0
    unreadable: int | None = None  # None: not decoded (quick check)


@dataclass
class Report:
    """What the check found in one parquet."""

    target: Target
    scenes: int = 0
    frames: int = 0  # (scene, frame) pairs
    cameras: int = 0
    rows: int = 0
    images: Files = field(default_factory=Files)
    depths: Files = field(default_factory=Files)
    problems: list[str] = field(default_factory=list)  # the first KEPT_PROBLEMS, one line each
    num_problems: int = 0

    @property
    def ok(self) -> bool:
        return self.num_problems == 0

    def add(self, problems: Iterable[str]) -> None:
        for problem in problems:
            self.num_problems += 1
            if len(self.problems) < KEPT_PROBLEMS:
                self.problems.append(problem)


# --------------------------------------------------------------------------------------------
# What to check
# --------------------------------------------------------------------------------------------


def targets_of_tree(root: str | Path, dataset: str | None = None, split: str | None = None) -> list[Target]:
    """Every filtered parquet of a tree (the ones training and evaluation read), optionally one dataset
    and/or split; a tree with none of them is an error naming where they were looked for. An s3://
    root is listed in S3 (its files are fetched into the node cache, data.s3_cache's defaults)."""
    if dataset is not None:
        fmt.check_dataset_name(dataset, "--dataset")
    local, remote = open_root(root)
    folder = local / fmt.FILTERED_META_DIR
    names = remote.listing(folder) if remote is not None else [p.name for p in folder.glob("*_*.parquet")]
    found = []
    for parquet in sorted(n for n in names if "/" not in n and n.endswith(".parquet") and "_" in n):
        name, _, its_split = parquet.removesuffix(".parquet").partition("_")
        if (dataset is None or name == dataset) and (split is None or its_split == split):
            found.append(Target(local, name, its_split, remote=remote))
    if not found:
        wanted = f"{dataset or '<dataset>'}_{split or '<split>'}.parquet"
        where = f"{remote.uri}/{fmt.FILTERED_META_DIR}" if remote is not None else str(folder)
        raise FileNotFoundError(
            f"no {wanted} under '{where}'; pass the folder that holds data_annotation/ (an "
            f"official DVGT tree, docs/data.md){' or another --dataset/--split' if dataset or split else ''}"
        )
    return found


def targets_of_config(data_cfg: Any, splits: Iterable[str] = ("train", "val")) -> list[Target]:
    """The parquets a training config reads (data.train and data.val), with each split's depth settings.
    Synthetic entries are skipped: the trainer generates them itself."""
    from dvgt.data.loader import open_entry_root

    targets: dict[Target, None] = {}  # ordered, without repeats
    for split in splits:
        s = data_cfg[split]
        for i, entry in enumerate(s.datasets):
            if not entry.synthetic:
                root, remote = open_entry_root(data_cfg, entry)
                targets[
                    Target(
                        root,
                        entry.dataset,
                        entry.split,
                        filter_lidar=bool(s.filter_lidar),
                        projected=bool(s.eval_lidar_proj_depth),
                        remote=remote,
                        config_key=f"data.{split}.datasets[{i}]",
                    )
                ] = None
    return list(targets)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def present(folder: Path, names: pa.Array, remote: S3Root | None = None) -> np.ndarray:
    """Which of ``names`` (relative paths under ``folder``) exist: one listing per sub-folder that the
    names use (of an s3:// root: one paginated listing of ``folder``), compared against the expected
    names, instead of one stat or request per file."""
    if remote is not None:
        return pc.is_in(names, value_set=pa.array(remote.listing(folder), pa.string())).to_numpy(zero_copy_only=False)
    parents = pc.replace_substring_regex(names, r"(^|/)[^/]*$", "")  # "a/b/c.jpg" -> "a/b"; "c.jpg" -> ""
    listed: list[str] = []  # every entry of those folders, as a path relative to ``folder``
    for parent in pc.unique(parents).to_pylist():
        try:
            entries = os.listdir(folder / parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        prefix = f"{parent}/" if parent else ""
        listed += [prefix + entry for entry in entries]
    return pc.is_in(names, value_set=pa.array(listed, pa.string())).to_numpy(zero_copy_only=False)


def _missing_problems(target: Target, kind: str, folder: Path, names: pa.Array, found: np.ndarray) -> Iterator[str]:
    for i in np.flatnonzero(~found):
        yield f"{kind} file '{target.name(folder / names[int(i)].as_py())}' is missing"


def _rotation_problems(table: fmt.Table) -> Iterator[str]:
    for column in ("extrinsics", "ego_to_world"):
        rotation = getattr(table, column)[:, :, :3]  # [N, 3, 3]
        off = np.abs(rotation @ np.swapaxes(rotation, -1, -2) - np.eye(3)).max(axis=(-1, -2))
        off = np.maximum(off, np.abs(np.linalg.det(rotation) - 1))
        for row in np.flatnonzero(~(off <= ROTATION_TOLERANCE)):
            yield (
                f"parquet '{table.path}': the rotation of column '{column}' in row {row} (scene "
                f"{table.scene_id[int(row)]}, frame {table.frame_idx[row]}) is not orthonormal with determinant 1 "
                f"(off by {off[row]:.2g}); fix or drop that row"
            )


def _decode(image: Path | None, depth: Path | None, remote: S3Root | None) -> tuple[str | None, str | None]:
    """(image problem, depth problem) of one row, decoded by the reader's own functions (None: not read)."""
    image_problem = depth_problem = shape = None
    if image is not None:
        try:
            shape = read_file(fmt.read_image, image, remote).shape[:2]
        except fmt.DataFileError as error:
            image_problem = str(error)
    if depth is not None:
        try:
            depth_shape = read_file(fmt.read_depth, depth, remote).shape
        except fmt.DataFileError as error:
            depth_problem = str(error)
        else:
            if shape is not None and depth_shape != shape:
                depth_problem = (
                    f"depth file '{depth}' is {depth_shape[1]}x{depth_shape[0]} but its image is "
                    f"{shape[1]}x{shape[0]}; re-copy both from the release"
                )
    return image_problem, depth_problem


def check_target(target: Target, deep: bool = False, jobs: int | None = None, progress=None) -> Report:
    """Check one parquet (module docstring). ``progress(advance)`` is called as deep decoding goes."""
    report = Report(target)
    try:
        table = read_file(
            partial(fmt.read_table, config_key=target.config_key or f"the tree '{target.location}'"),
            target.parquet,
            target.remote,
        )
        build_scenes(table, target.dataset)
    except (OSError, ValueError) as error:  # the reader's one-line errors name the file and the fix
        report.add([str(error)])
        return report
    scene_codes = pc.dictionary_encode(table.scene_id).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    report.rows = table.num_rows
    report.scenes = len(np.unique(scene_codes))
    report.frames = len(np.unique(np.stack([scene_codes, table.frame_idx], axis=1), axis=0))
    report.cameras = len(pc.unique(table.cam_type))

    tree = fmt.Tree(Path(target.root), target.dataset)
    image_folder = tree.image("x").parent
    image_names = pc.binary_join_element_wise(table.filename, ".jpg", "")
    images = present(image_folder, image_names, target.remote)
    needs_depth = ~(table.use_lidar_proj_depth & target.filter_lidar)
    projected = table.use_lidar_proj_depth | target.projected
    depth_names = pc.binary_join_element_wise(table.filename, ".png", "")
    depths = np.zeros(table.num_rows, dtype=bool)
    for is_projected in (False, True):
        rows = np.flatnonzero(needs_depth & (projected == is_projected))
        if len(rows):
            folder = tree.depth("x", projected=is_projected).parent
            names = depth_names.take(pa.array(rows))
            depths[rows] = present(folder, names, target.remote)
            report.add(_missing_problems(target, "depth", folder, names, depths[rows]))
    report.images = Files(int(images.sum()), int((~images).sum()))
    report.depths = Files(int(depths[needs_depth].sum()), int((~depths[needs_depth]).sum()))
    report.add(_missing_problems(target, "image", image_folder, image_names, images))
    if not deep:
        return report

    report.add(_rotation_problems(table))
    report.images.unreadable = report.depths.unreadable = 0
    filenames = table.filename.to_pylist()

    def decode(row: int) -> tuple[str | None, str | None]:
        image = tree.image(filenames[row]) if images[row] else None
        depth = tree.depth(filenames[row], projected=bool(projected[row])) if depths[row] else None
        return _decode(image, depth, target.remote)

    rows = np.flatnonzero(images | depths)  # every row with a file to decode
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:  # PIL decodes without the GIL
        for image_problem, depth_problem in pool.map(decode, rows.tolist(), chunksize=64):
            report.images.unreadable += image_problem is not None
            report.depths.unreadable += depth_problem is not None
            report.add(p for p in (image_problem, depth_problem) if p is not None)
            if progress is not None:
                progress(1)
    return report


def check(targets: list[Target], deep: bool = False, jobs: int | None = None, progress=None) -> list[Report]:
    return [check_target(t, deep=deep, jobs=jobs, progress=progress) for t in targets]


def require_clean(data_cfg: Any, splits: Iterable[str] = ("train", "val")) -> str:
    """The trainer's pre-flight: the quick check of every non-synthetic parquet of the config's ``splits``.
    Returns a one-line summary; raises DataCheckError naming the root, the first problem and their number."""
    started = time.perf_counter()
    reports = check(targets_of_config(data_cfg, splits))
    bad = [r for r in reports if not r.ok]
    if bad:
        total = sum(r.num_problems for r in bad)
        first = bad[0]
        raise DataCheckError(
            f"data root '{first.target.location}' fails the data check ({total} problem(s) in "
            f"{', '.join(f'{r.target.dataset}_{r.target.split}' for r in bad)}), first: {first.problems[0]}; "
            f"`dvgt data check {first.target.location}` lists them (data.check=false skips this check)"
        )
    files = sum(r.images.present + r.depths.present for r in reports)
    return (
        f"Data check: {len(reports)} parquet(s), {sum(r.rows for r in reports):,} rows, {files:,} files present "
        f"({time.perf_counter() - started:.1f} s)"
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def summary_table(reports: list[Report], deep: bool):
    """A rich Table: one line per parquet."""
    from rich.table import Table

    table = Table(title=f"dvgt data check ({'deep' if deep else 'quick'})")
    for name in ("dataset", "split", "status"):
        table.add_column(name, no_wrap=True)
    for name in (
        "scenes",
        "frames",
        "cameras",
        "rows",
        "images\npresent",
        "images\nmissing",
        "images\nunreadable",
        "depths\npresent",
        "depths\nmissing",
        "depths\nunreadable",
    ):
        table.add_column(name, justify="right")
    for r in reports:
        counts = []
        for files in (r.images, r.depths):
            counts += [
                f"{files.present:,}",
                f"{files.missing:,}",
                "-" if files.unreadable is None else f"{files.unreadable:,}",
            ]
        status = "[green]ok[/green]" if r.ok else f"[red]{r.num_problems:,} problem(s)[/red]"
        table.add_row(
            r.target.dataset,
            r.target.split,
            status,
            f"{r.scenes:,}",
            f"{r.frames:,}",
            str(r.cameras),
            f"{r.rows:,}",
            *counts,
        )
    return table


def first_problems(reports: list[Report], limit: int) -> list[str]:
    """The first ``limit`` problems over all parquets, in order."""
    return [p for r in reports for p in r.problems][:limit]

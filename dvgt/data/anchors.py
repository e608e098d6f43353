"""DVGT-2's decoder anchors, as the official files hold them and as the official tool makes them
(tools/data_process/anchors/k_means_anchors.py of wzzheng/DVGT).

``future_anchors_20_rdf.npz``: key ``centers`` [20, 8, 2], the (right, forward) positions of the next 8
poses (2 Hz) in the current ego frame (RDF axes), metres. ``past_anchors_20_rdf.npz``: key ``centers``
[20, 3], the translation of ego_{t-1} -> ego_t (x right, y down, z forward), metres.

``dvgt anchors --config <stage>`` clusters, over every dataset of the stage's ``data.train``: every
window of 9 frames (at 2 Hz) for the future trajectories and every pair of consecutive frames for the
past translations, with k-means (scikit-learn; k = 20, 50 initialisations, seed 42, as the official
tool), and writes the two files plus a plot into the anchor folder a config names with
``model.anchor_dir``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dvgt.data import format as fmt
from dvgt.data.scenes import build_scenes, fps_step
from dvgt.models.dvgt2 import PLANNING_STEPS

NUM_ANCHORS = 20
KMEANS = dict(random_state=42, n_init=50, max_iter=1000)  # the official tool's settings
PLOT_FILE = "anchors.png"


def read_anchor_dir(anchor_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(future trajectory centers [K, 8, 2], past translation centers [K, 3]) in metres, from the two
    official files; plain arrays only (nothing is unpickled)."""
    arrays = []
    for path in fmt.anchor_files(anchor_dir):
        if not path.is_file():
            raise FileNotFoundError(
                f"anchor file '{path}' does not exist; model.anchor_dir must hold the official "
                f"{fmt.FUTURE_ANCHORS_FILE} and {fmt.PAST_ANCHORS_FILE} (the release's "
                f"{fmt.ANCHOR_DIR}, or make them with `dvgt anchors --config <stage>`)"
            )
        with np.load(path, allow_pickle=False) as data:
            if "centers" not in data.files:
                raise ValueError(f"anchor file '{path}' has no 'centers' array (it has {data.files})")
            arrays.append(data["centers"])
    return arrays[0], arrays[1]


def collect_motion(tables: Sequence[tuple[fmt.Table, str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(future trajectories [N, 8, 2], past translations [M, 3]) over (table, dataset, original_fps) triples."""
    futures, pasts = [], []
    for table, dataset, original_fps in tables:
        step = fps_step(original_fps)
        for scene in build_scenes(table, dataset):
            rows = scene.rows[::step, 0]  # one pose per frame (the first camera's), at 2 Hz
            poses = np.concatenate([table.ego_to_world[rows], np.tile([[[0, 0, 0, 1.0]]], (len(rows), 1, 1))], 1)
            inverse = np.linalg.inv(poses)
            for start in range(len(rows) - PLANNING_STEPS):
                relative = inverse[start] @ poses[start + 1 : start + 1 + PLANNING_STEPS]  # [8, 4, 4]
                futures.append(relative[:, [0, 2], 3])
            if len(rows) > 1:
                pasts.append((inverse[1:] @ poses[:-1])[:, :3, 3])
    if not futures or not pasts:
        raise ValueError("the training data has no window of 9 frames at 2 Hz, which the anchors are clustered from")
    return np.stack(futures), np.concatenate(pasts)


def kmeans_centers(samples: np.ndarray, k: int, what: str) -> np.ndarray:
    from sklearn.cluster import KMeans

    if len(samples) < k:
        raise ValueError(f"{k} {what} anchors need at least {k} samples, the data has {len(samples)}; add scenes")
    flat = samples.reshape(len(samples), -1)
    return KMeans(n_clusters=k, **KMEANS).fit(flat).cluster_centers_.reshape(k, *samples.shape[1:])


def write_anchors(tables: Sequence[tuple[fmt.Table, str, int]], out_dir: str | Path, k: int = NUM_ANCHORS) -> Path:
    """Cluster and write the two official anchor files and a plot into out_dir; returns out_dir.

    Each file is written under a temporary name and renamed into place, so processes racing to create
    it (several ranks) never read half a file.
    """
    futures, pasts = collect_motion(tables)
    centers = {
        fmt.FUTURE_ANCHORS_FILE: kmeans_centers(futures, k, "trajectory"),
        fmt.PAST_ANCHORS_FILE: kmeans_centers(pasts, k, "past-translation"),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_anchors(centers[fmt.FUTURE_ANCHORS_FILE], centers[fmt.PAST_ANCHORS_FILE], futures, pasts, out_dir / PLOT_FILE)
    for name, value in centers.items():
        scratch = out_dir / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        np.savez(scratch, centers=value)
        os.replace(scratch, out_dir / name)
    return out_dir


def training_tables(cfg: Any) -> list[tuple[fmt.Table, str, int]]:
    """The (table, dataset, original_fps) of every dataset of a config's data.train."""
    from dvgt.data.loader import open_entry_root
    from dvgt.data.remote import read_file

    tables = []
    for i, entry in enumerate(cfg.data.train.datasets):
        root, remote = open_entry_root(cfg.data, entry)
        parquet = fmt.Tree(root, entry.dataset).parquet(entry.split, entry.filtered)
        tables.append(
            (
                read_file(partial(fmt.read_table, config_key=f"data.train.datasets[{i}]"), parquet, remote),
                entry.dataset,
                entry.original_fps,
            )
        )
    return tables


def ensure_anchors(cfg: Any) -> Path:
    """model.anchor_dir; when its files are missing and the training data is synthetic, they are clustered
    from it on first use (like the synthetic data itself). Otherwise a missing file is an error saying how
    to make it."""
    from dvgt.data.loader import entry_root
    from dvgt.data.remote import is_s3
    from dvgt.data.synthetic import ensure_synthetic_dataset

    anchor_dir = Path(cfg.model.anchor_dir)
    if all(path.is_file() for path in fmt.anchor_files(anchor_dir)):
        return anchor_dir
    entries = cfg.data.train.datasets
    if len(entries) and all(entry.synthetic and not is_s3(entry_root(cfg.data, entry)) for entry in entries):
        for entry in entries:
            ensure_synthetic_dataset(entry_root(cfg.data, entry), entry.split)
        return write_anchors(training_tables(cfg), anchor_dir)
    read_anchor_dir(anchor_dir)  # raises the error naming the missing file
    return anchor_dir


def plot_anchors(
    futures: np.ndarray,
    pasts: np.ndarray,
    future_data: np.ndarray,
    past_data: np.ndarray,
    out_png: str | Path,
    max_samples: int = 2000,
) -> Path:
    """Bird's-eye views (x right, forward up) of both anchor sets over (a subsample of) their data."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    fig = Figure(figsize=(12, 6), layout="constrained")
    traj_ax, pose_ax = fig.subplots(1, 2)
    for sample in future_data[rng.permutation(len(future_data))[:max_samples]]:
        traj_ax.plot(sample[:, 0], sample[:, 1], color="0.8", linewidth=0.5)
    for anchor in futures:
        traj_ax.plot(np.r_[0, anchor[:, 0]], np.r_[0, anchor[:, 1]], marker=".", linewidth=1.5)
    traj_ax.set(
        title=f"{len(futures)} trajectory anchors (4 s, 2 Hz) over {len(future_data)} futures",
        xlabel="right (m)",
        ylabel="forward (m)",
    )
    traj_ax.set_aspect("equal", adjustable="datalim")
    shown = past_data[rng.permutation(len(past_data))[:max_samples]]
    pose_ax.scatter(shown[:, 0], shown[:, 2], s=3, color="0.7", label="ego_{t-1} in ego_t")
    pose_ax.scatter(pasts[:, 0], pasts[:, 2], s=40, color="tab:red", label="anchors")
    pose_ax.set(
        title=f"{len(pasts)} past-translation anchors over {len(past_data)} frames",
        xlabel="right (m)",
        ylabel="forward (m)",
    )
    pose_ax.legend(loc="best")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png

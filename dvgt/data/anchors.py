"""DVGT-2's decoder anchors: k-means of the dataset's future trajectories and past relative translations.

``dvgt anchors --data <root> [<root> ...] [--split train] [--out DIR] [--k 20]`` clusters, over every
annotated frame of the split of every root (at the annotation rate, 2 Hz):

* the future trajectories of the frames whose whole 4 s future is known (8 waypoints,
  [right, forward] in metres, in the frame's ego frame; dvgt/data/ego_motion.py), into K anchors;
* the translations of the relative poses ego_{t-1} -> ego_t (metres, ego axes x right, y down,
  z forward) of every frame after the first, into K anchors.

It writes ``anchors.npz`` (``trajectory`` [K, 8, 2], ``pose_translation`` [K, 3], float32, metres;
the file the DVGT-2 configs point to) and ``anchors.png`` (both anchor sets over the data).
k-means is scikit-learn's, with a fixed seed: the same data always gives the same anchors.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dvgt.data import layout
from dvgt.data.ego_motion import scene_ego_motion

ANCHORS_FILE, PLOT_FILE = "anchors.npz", "anchors.png"
NUM_ANCHORS = 20
KMEANS_SEED = 0
Roots = str | Path | Sequence[str | Path]  # one dataset root, or several clustered together


def collect_motion(roots: Roots, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(future trajectories [N, 8, 2] of the frames with a complete future, relative translations [M, 3])
    over the split of one dataset root or several."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    trajectories, translations = [], []
    for scene in (scene for root in roots for scene in layout.read_split(root, split, "--data")):
        motion = scene_ego_motion(scene.ego_to_world, scene.timestamps, scene.measured)
        trajectories.append(motion.future_trajectory[motion.future_valid.all(-1), :, :2])
        previous_to_current = np.linalg.inv(scene.ego_to_world[1:]) @ scene.ego_to_world[:-1]
        translations.append(previous_to_current[:, :3, 3])
    return np.concatenate(trajectories), np.concatenate(translations)


def kmeans_centres(samples: np.ndarray, k: int, what: str) -> np.ndarray:
    """k-means centres [k, ...] of samples [N, ...] (flattened per sample), deterministic."""
    from sklearn.cluster import KMeans

    if len(samples) < k:
        raise ValueError(f"{k} {what} anchors need at least {k} samples, the data has {len(samples)}; lower --k "
                         f"or add scenes (a frame counts for trajectories when its whole 4 s future is annotated)")
    flat = samples.reshape(len(samples), -1)
    centres = KMeans(n_clusters=k, n_init=10, random_state=KMEANS_SEED).fit(flat).cluster_centers_
    return centres.reshape(k, *samples.shape[1:])


def compute_anchors(roots: Roots, split: str = "train", k: int = NUM_ANCHORS) -> dict[str, np.ndarray]:
    """The anchors of one or several datasets: ``trajectory`` [k, 8, 2] and ``pose_translation`` [k, 3] (metres)."""
    trajectories, translations = collect_motion(roots, split)
    return {"trajectory": kmeans_centres(trajectories, k, "trajectory").astype(np.float32),
            "pose_translation": kmeans_centres(translations, k, "pose-translation").astype(np.float32)}


def write_anchors(roots: Roots, out_dir: str | Path, split: str = "train", k: int = NUM_ANCHORS) -> Path:
    """Compute the anchors and write ``anchors.npz`` and ``anchors.png`` into out_dir; returns the npz path.

    The npz is written under a temporary name and renamed into place, so processes racing to create
    it (several ranks) never read half a file.
    """
    anchors = compute_anchors(roots, split, k)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_anchors(anchors, *collect_motion(roots, split), out_dir / PLOT_FILE)
    scratch = out_dir / f".{ANCHORS_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
    np.savez(scratch, **anchors)
    os.replace(scratch, out_dir / ANCHORS_FILE)
    return out_dir / ANCHORS_FILE


def read_anchors(path: str | Path) -> dict[str, np.ndarray]:
    """An anchor file's arrays (plain arrays only: nothing is unpickled)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in ("trajectory", "pose_translation")}


def ensure_anchors(path: str | Path, entry: Any, config_key: str) -> Path:
    """The anchor file ``path``; for a synthetic dataset entry it is computed on first use from the
    entry's (generated) data, like the synthetic data itself. Otherwise a missing file is an error
    that says how to make it."""
    from dvgt.data.synthetic import ensure_synthetic_dataset

    path = Path(path)
    if path.is_file():
        return path
    if entry is not None and entry.name == "synthetic":
        ensure_synthetic_dataset(entry.root, entry.split)
        written = write_anchors(entry.root, path.parent, entry.split)
        if written != path:
            os.replace(written, path)
        return path
    raise FileNotFoundError(f"anchor file '{path}' ({config_key}) does not exist; create it from the training data "
                            f"with `dvgt anchors --data <annotation root> --out {path.parent}`, or set "
                            f"{config_key}=null when the weights you load carry their anchors")


def plot_anchors(anchors: dict[str, np.ndarray], trajectories: np.ndarray, translations: np.ndarray,
                 out_png: str | Path, max_samples: int = 2000) -> Path:
    """Bird's-eye views (x right, forward up) of the trajectory anchors and the pose-translation anchors
    over (a subsample of) the data they were clustered from."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    fig = Figure(figsize=(12, 6), layout="constrained")
    traj_ax, pose_ax = fig.subplots(1, 2)
    for sample in trajectories[rng.permutation(len(trajectories))[:max_samples]]:
        traj_ax.plot(sample[:, 0], sample[:, 1], color="0.8", linewidth=0.5)
    for anchor in anchors["trajectory"]:
        traj_ax.plot(anchor[:, 0], anchor[:, 1], marker=".", linewidth=1.5)
    traj_ax.set(title=f"{len(anchors['trajectory'])} trajectory anchors (4 s, 2 Hz) over {len(trajectories)} "
                      f"futures", xlabel="right (m)", ylabel="forward (m)")
    traj_ax.set_aspect("equal", adjustable="datalim")
    shown = translations[rng.permutation(len(translations))[:max_samples]]
    pose_ax.scatter(shown[:, 0], shown[:, 2], s=3, color="0.7", label="ego_{t-1} in ego_t")
    pose_ax.scatter(anchors["pose_translation"][:, 0], anchors["pose_translation"][:, 2], s=40, color="tab:red",
                    label="anchors")
    pose_ax.set(title=f"{len(anchors['pose_translation'])} past-translation anchors over {len(translations)} "
                      f"frames", xlabel="right (m)", ylabel="forward (m)")
    pose_ax.legend(loc="best")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png

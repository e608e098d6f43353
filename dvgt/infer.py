"""`dvgt infer`: streaming DVGT-2 inference over a folder of multi-camera frames.

    frames/frame_0/CAM_F0.jpg, frames/frame_0/CAM_L0.jpg, ..., frames/frame_1/..., ...

Frames are ordered by their number and cameras by name (every frame must have the same cameras).
Each image is resized to `width` with its aspect kept, the height rounded to a multiple of 16 and
centre-cropped to at most `width` (the upstream demo's "crop" preprocessing). The model consumes the
frames one at a time (KV cache, sliding window of `window` frames). Written to the output folder:

    predictions.npz   points [T,V,H,W,3] (metres, each frame's own ego frame), points_conf [T,V,H,W],
                      points_first [T,V,H,W,3] (in the first frame's ego frame), relative_pose [T,7]
                      (ego_{t-1} -> ego_t, absT_quaR, metres), ego_to_first [T,4,4], and for DVGT-2
                      trajectory [T,8,3] (best-scoring mode per frame: [right, forward] metres, heading
                      rad, in that frame's ego frame), trajectory_modes [T,20,8,3], trajectory_scores [T,20]
    predictions.json  the same poses and trajectories, frame and camera names, the planned trajectory
                      of the last frame (top 3 modes with their scores)
    bev.png           bird's-eye view of the accumulated point cloud, the ego path and the planned trajectory
Coordinates are OpenCV/RDF (x right, y down, z forward); a pose a_to_b maps points of a into b.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from dvgt.config import load_config
from dvgt.data.geometry import absT_quaR_to_pose, inverse_pose, transform_points

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FRAME_DIR = re.compile(r"^frame_(\d+)$")
CONF_QUANTILE = 0.5  # the BEV keeps points above this quantile of confidence per frame


@dataclass
class FrameFolder:
    frames: list[Path]  # frame_k folders, by k
    cameras: list[str]  # image file names, the same in every frame


def list_frames(root: str | Path) -> FrameFolder:
    """The frame_k folders under `root` (numeric order) and their camera images (name order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--frames: folder '{root}' does not exist")
    numbered = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := FRAME_DIR.match(p.name))]
    frames = [p for _, p in sorted(numbered)]
    if not frames:
        raise ValueError(f"--frames: '{root}' has no frame_<k> folders (expected {root}/frame_0/CAM_*.jpg, ...)")
    cameras: list[str] = []
    for frame in frames:
        names = sorted(p.name for p in frame.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise ValueError(f"--frames: {frame} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if cameras and names != cameras:
            raise ValueError(
                f"--frames: {frame} has cameras {names} but {frames[0].name} has {cameras}; "
                f"every frame needs the same camera images"
            )
        cameras = names
    return FrameFolder(frames, cameras)


def load_image(path: Path, width: int, patch_size: int = 16) -> Tensor:
    """[3, H, W] in [0, 1]: resized to `width` (aspect kept, height a multiple of the patch size), height
    centre-cropped to at most `width`."""
    with Image.open(path) as file:
        image = file.convert("RGB")
        height = max(patch_size, round(image.height * width / image.width / patch_size) * patch_size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    if height > width:
        top = (height - width) // 2
        pixels = pixels[:, top : top + width]
    return pixels


def load_frame(folder: Path, cameras: Sequence[str], width: int, patch_size: int = 16) -> Tensor:
    """[V, 3, H, W]: one frame's camera images; smaller images are centre-padded with white to the largest."""
    images = [load_image(folder / name, width, patch_size) for name in cameras]
    height = max(i.shape[1] for i in images)
    padded = []
    for image in images:
        gap = height - image.shape[1]
        padded.append(F.pad(image, (0, 0, gap // 2, gap - gap // 2), value=1.0))
    return torch.stack(padded)


def _training_config(config: str | None, checkpoint_config: str | None, overrides: Sequence[str]) -> DictConfig:
    """The training config that describes the architecture: --config, else the one stored in the checkpoint."""
    if config is not None:
        return load_config(config, overrides)
    if checkpoint_config is None:
        raise ValueError(
            "--config is required with a weights file (it names the architecture, e.g. train/dvgt2/default.yaml)"
        )
    with tempfile.TemporaryDirectory() as folder:
        stored = Path(folder) / "config.yaml"
        stored.write_text(checkpoint_config)
        return load_config(stored, overrides)


def load_model(
    checkpoint: str, config: str | None = None, overrides: Sequence[str] = ()
) -> tuple[Any, DictConfig, str]:
    """(model in eval mode with the weights, training config, description of the source).

    `checkpoint`: a checkpoint location of ours (latest committed step), one step folder
    (.../step_NNNNNNNN), or a weights file (.pt/.pth state_dict or dict with 'model', or .safetensors).
    """
    from dvgt.checkpoint.manager import STEP_DIR, CheckpointManager
    from dvgt.families import build_model, get, names
    from dvgt.models import load_weights

    path = Path(checkpoint)
    weights_file = path.suffix in (".pt", ".pth", ".safetensors") or path.is_file()
    state, source, checkpoint_config = None, checkpoint, None
    if not weights_file:
        step = STEP_DIR.match(path.name)
        manager = CheckpointManager(str(path.parent) if step else checkpoint)
        found = manager.open(int(step.group(1))) if step else manager.latest()
        if found is None:
            raise FileNotFoundError(
                f"--checkpoint: no committed checkpoint under '{checkpoint}' (expected "
                f"step_NNNNNNNN folders with a manifest.json, or a weights file)"
            )
        state, source = found.model_state(), f"{found.storage.uri}/{found.prefix}"
        checkpoint_config = found.read("config.yaml").decode()
    cfg = _training_config(config, checkpoint_config, overrides)
    if not get(cfg.model.name).streaming_inference:
        streaming = ", ".join(name for name in names() if get(name).streaming_inference)
        raise ValueError(
            f"dvgt infer runs streaming inference, which model '{cfg.model.name}' does not do (models that do: "
            f"{streaming}; use a train/dvgt2/* config)"
        )
    if cfg.model.enable_ego_status:
        raise ValueError(
            "this model plans from the ego status (model.enable_ego_status), which dvgt infer does not "
            "read from a frames folder; use a checkpoint trained without it"
        )
    # Everything comes from the weights: DINOv3 and the anchors are not read from their own files.
    model_cfg = OmegaConf.merge(cfg.model, {"dino_v3_weight_path": None, "anchor_dir": None})
    model = build_model(model_cfg)
    if state is None:
        load_weights(model, path, strict=True)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval(), cfg, source


def _decode_pose(encoding: Tensor, scale: float) -> Tensor:
    """absT_quaR in model units [..., 7] -> 4x4 transforms with the translation in metres."""
    pose = absT_quaR_to_pose(encoding.double())
    pose[..., :3, 3] /= scale
    return pose


def chain_to_first(relative: Tensor) -> Tensor:
    """ego_{t-1} -> ego_t transforms [T, 4, 4] -> ego_t -> ego_0 [T, 4, 4] (frame 0's relative pose is ignored)."""
    ego_to_first = [torch.eye(4, dtype=relative.dtype)]
    for t in range(1, relative.shape[0]):
        ego_to_first.append(ego_to_first[-1] @ inverse_pose(relative[t]))
    return torch.stack(ego_to_first)


@torch.no_grad()
def run_inference(
    model, folder: FrameFolder, width: int, window: int, seed: int = 0, progress=None
) -> dict[str, Tensor]:
    """Stream the frames through the model one at a time; per-frame outputs in model units, batch dim dropped."""
    from dvgt.models.layers import KVCache

    if window < 1:
        raise ValueError(f"--window must be at least 1, got {window}")
    torch.manual_seed(seed)  # the planning decoder's starting noise
    caches = [KVCache() for _ in model.aggregator.cross_frame_blocks]
    ego_cache, steps = None, []
    for t, frame_dir in enumerate(folder.frames):
        frame = load_frame(frame_dir, folder.cameras, width, model.patch_size)[None]  # [1, V, 3, H, W]
        predictions, ego_cache = model.step(frame, t, caches, ego_cache, window)
        steps.append(predictions)
        if progress is not None:
            progress(t, frame_dir)
    out = {}
    for key, value in steps[0].items():
        if isinstance(value, list):  # the last decoder layer is the prediction
            out[key.removesuffix("_list")] = torch.cat([s[key][-1] for s in steps], dim=1)[0]
        else:
            out[key] = torch.cat([s[key] for s in steps], dim=1)[0]
    return out


def summarise(raw: dict[str, Tensor], scale: float) -> dict[str, np.ndarray]:
    """Model outputs -> metres, best-scoring modes and poses chained to the first frame (the npz contents)."""
    frames = torch.arange(raw["points"].shape[0])
    if "diff_poses_reg" in raw:  # DVGT-2: the best-scoring pose anchor per frame
        relative = raw["diff_poses_reg"][frames, raw["diff_poses_cls"].argmax(dim=-1)]  # [T, 7]
    else:
        relative = raw["relative_ego_pose_enc"]
    ego_to_first = chain_to_first(_decode_pose(relative, scale))  # [T, 4, 4]
    points = raw["points"].double() / scale  # [T, V, H, W, 3]
    result = {
        "points": points,
        "points_conf": raw["points_conf"],
        "points_first": transform_points(ego_to_first[:, None], points),
        "relative_pose": torch.cat([relative[:, :3] / scale, relative[:, 3:]], dim=-1),
        "ego_to_first": ego_to_first,
    }
    if "diff_traj_reg" in raw:
        modes = torch.cat([raw["diff_traj_reg"][..., :2] / scale, raw["diff_traj_reg"][..., 2:]], dim=-1)
        result["trajectory_modes"] = modes  # [T, 20, 8, 3]
        result["trajectory_scores"] = raw["diff_traj_cls"]  # [T, 20]
        result["trajectory"] = modes[frames, raw["diff_traj_cls"].argmax(dim=-1)]  # [T, 8, 3]
    return {key: value.float().numpy() for key, value in result.items()}


def trajectory_in_first_frame(trajectory: np.ndarray, ego_to_first: np.ndarray) -> np.ndarray:
    """[N, 3] ([right, forward, heading] in an ego frame) -> [N, 3] points (x, y=0, z) in the first frame."""
    points = np.stack([trajectory[:, 0], np.zeros(len(trajectory)), trajectory[:, 1]], axis=-1)
    return points @ ego_to_first[:3, :3].T + ego_to_first[:3, 3]


def write_outputs(
    out_dir: Path, arrays: dict[str, np.ndarray], folder: FrameFolder, meta: dict[str, Any]
) -> dict[str, Path]:
    from dvgt.viz import render_streaming_bev

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "predictions.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub: a ** could fill allow_pickle
    record: dict[str, Any] = {
        **meta,
        "frames": [f.name for f in folder.frames],
        "cameras": [Path(c).stem for c in folder.cameras],
        "image_size": list(arrays["points"].shape[2:4]),
        "units": "metres; rotations as quaternions xyzw; headings in radians; OpenCV/RDF axes (x right, y down, z forward)",
        "relative_pose": arrays["relative_pose"].round(6).tolist(),
        "ego_to_first": arrays["ego_to_first"].round(6).tolist(),
    }
    planned = None
    if "trajectory" in arrays:
        record["trajectory"] = arrays["trajectory"].round(4).tolist()
        scores = arrays["trajectory_scores"][-1]
        record["planned_trajectory"] = {
            "frame": folder.frames[-1].name,
            "frame_of_reference": "ego frame of that frame: [right, forward] metres and heading (rad)",
            "top3": [
                {
                    "mode": int(m),
                    "score": round(float(scores[m]), 4),
                    "trajectory": arrays["trajectory_modes"][-1, m].round(4).tolist(),
                }
                for m in np.argsort(-scores)[:3]
            ],
        }
        planned = trajectory_in_first_frame(arrays["trajectory"][-1], arrays["ego_to_first"][-1].astype(np.float64))
    (out_dir / "predictions.json").write_text(json.dumps(record, indent=1))

    conf = arrays["points_conf"]
    keep = conf >= np.quantile(conf.reshape(len(conf), -1), CONF_QUANTILE, axis=1)[:, None, None, None]
    frame_index = np.broadcast_to(np.arange(len(conf))[:, None, None, None], conf.shape)
    png = render_streaming_bev(
        arrays["points_first"][keep],
        frame_index[keep],
        arrays["ego_to_first"][:, :3, 3],
        planned,
        out_dir / "bev.png",
        title=f"DVGT-2 streaming inference: {len(folder.frames)} frames x {len(folder.cameras)} cameras, "
        f"window {meta['window']}",
    )
    return {"npz": out_dir / "predictions.npz", "json": out_dir / "predictions.json", "png": png}


def infer(
    checkpoint: str,
    frames: str,
    out: str,
    window: int = 4,
    width: int = 512,
    config: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    log=print,
) -> dict[str, Path]:
    """The whole command: load the model, stream the frames, write npz, json and png."""
    folder = list_frames(frames)
    model, cfg, source = load_model(checkpoint, config, overrides)
    scale = float(cfg.gt_scale_factor)
    log(
        f"model {cfg.model.name} ({cfg.model.size}) from {source}; {len(folder.frames)} frames x "
        f"{len(folder.cameras)} cameras ({', '.join(Path(c).stem for c in folder.cameras)}), window {window}"
    )
    raw = run_inference(
        model, folder, width, window, seed, progress=lambda t, d: log(f"  frame {t + 1}/{len(folder.frames)}: {d.name}")
    )
    meta = {
        "checkpoint": source,
        "model": cfg.model.name,
        "window": window,
        "width": width,
        "seed": seed,
        "gt_scale_factor": scale,
    }
    paths = write_outputs(Path(out), summarise(raw, scale), folder, meta)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths

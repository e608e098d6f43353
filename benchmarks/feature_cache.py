"""Step time of a frozen-prefix finetune with the feature cache vs without, side by side.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/feature_cache.py [--part aggregator] [--size full]
        [--frames 3] [--width 256] [--steps 3]      # about 10 minutes on 2 cores

Two parts can be frozen and cached (docs/feature-cache.md):
- `aggregator`: train/dvgt1/finetune_heads_demo.yaml, the whole aggregator frozen (heads-only finetune),
  one cache entry per clip;
- `backbone`: train/dvgt1/finetune_demo.yaml, the DINOv3 backbone frozen, one cache entry per image.

First, model FLOPs per training step of the full DVGT-1, counted with torch's FlopCounterMode on the
meta device (no memory, no time) at the nuScenes finetune shape (6 cameras x 4 frames of 288 x 512):
with and without each cache. This is the machine-independent bound of the speed-up.

Then, measured: DVGT-1 at --size, one clip of the synthetic demo tree (an official-format tree of the
`demo` dataset, its 8 OpenScene cameras in order, as a clip cache needs: data.train.fixed_num_views) x
--frames frames at --width x --width/2 per step (default 3 frames, 24 images), AdamW as in training. The
cache of the data is built, then each trainer in turn (without, then with the cache: a full-size model
pair does not fit side by side in this machine's memory) trains its first batch for one warm-up and
--steps measured steps (median). The batch is loaded before the clock starts in both cases: reading the
cache is the data loader's job (benchmarks/data_wait.py).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dvgt.config import ModelConfig, load_config
from dvgt.data.synthetic import RIG, generate_synthetic_dataset
from dvgt.families import build_model, get
from dvgt.models.aggregator import precomputed_outputs
from dvgt.models.dvgt1 import run_heads
from dvgt.train.feature_cache import build_cache, frozen_part
from dvgt.train.loop import Trainer

CONFIGS = {"aggregator": "train/dvgt1/finetune_heads_demo.yaml", "backbone": "train/dvgt1/finetune_demo.yaml"}


def step_flops(kind: str, cached: bool, frames: int = 4, views: int = 6, height: int = 288, width: int = 512) -> float:
    """Model FLOPs of one training step (forward, and backward of what trains, activation checkpointing
    included) of the full DVGT-1 with `kind` frozen, with or without its cached outputs; meta device."""
    with torch.device("meta"):
        model = build_model(ModelConfig(name="dvgt1", size="full")).train()
        images = torch.rand(1, frames, views, 3, height, width)
    parts = get("dvgt1").cacheable_parts
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(parts[kind] + "."))
    part = frozen_part(model, kind, parts)
    part.module.eval()
    patch_tokens, aggregated = None, None
    if cached:
        with torch.no_grad():
            outputs = part.outputs(images.flatten(0, 2)[:, None, None] if kind == "backbone" else images)
        if kind == "backbone":
            patch_tokens = outputs.view(1, frames, views, *outputs.shape[1:])
        else:
            aggregated = [outputs[:, part.layers.index(i)] if i in part.layers else None for i in range(part.depth)]
    with FlopCounterMode(display=False) as counter:
        # DVGT1.forward, with the heads given a CPU stand-in for the images (autocast has no meta device)
        tokens, start = (
            model.aggregator(images, patch_tokens=patch_tokens)
            if aggregated is None
            else precomputed_outputs(model.aggregator, aggregated)
        )
        predictions = run_heads(model, torch.empty(images.shape), tokens, start, model.ego_pose_head, "pose")
        (predictions["points"].sum() + predictions["pose"].sum()).backward()
    return counter.get_total_flops()


def stage(kind: str, root: Path, run: Path, args, **extra):
    """The stage config at the benchmark's shape: one clip of all cameras x --frames per step, no evaluation."""
    values = {
        "model.size": args.size,
        "data.root": root,
        "max_epochs": 1,
        "limit_train_batches": 1,
        "limit_val_batches": 0,
        "num_workers": 0,
        "max_img_per_gpu": len(RIG) * args.frames,
        "data.train.fixed_num_views": len(RIG),
        "data.train.fixed_num_frames": args.frames,
        "data.train.aspect_ratio": "[2.0,2.0]",
        "data.train.img_width": args.width,
        "logging.log_dir": run,
        "logging.metrics": "false",
        "logging.progress": "false",
        "checkpoint.uri": run / "ckpts",
        **extra,
    }
    return load_config(CONFIGS[kind], [f"{key}={value}" for key, value in values.items()])


def step_time(cfg, steps: int) -> float:
    """Median train_step time of a fresh trainer on its first batch, after one warm-up step."""
    trainer = Trainer(cfg)
    try:
        batch = next(iter(trainer.train_loader))
        trainer.train_step(batch)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            trainer.train_step(batch)
            trainer.read_steps()  # waits for the device (the step itself does not)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        trainer.close()
        del trainer
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="aggregator", choices=sorted(CONFIGS))
    parser.add_argument("--size", default="full", choices=["tiny", "small", "full"])
    parser.add_argument("--frames", type=int, default=3, help=f"frames per clip ({len(RIG)} cameras each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    print("model FLOPs per training step, full DVGT-1, 6 cameras x 4 frames of 288x512:")
    for kind in ("backbone", "aggregator"):
        live, cached = step_flops(kind, cached=False), step_flops(kind, cached=True)
        print(
            f"  {kind:10s} frozen: {live / 1e12:7.1f} TFLOP without cache, {cached / 1e12:7.1f} with "
            f"({live / cached:.2f}x fewer)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        generate_synthetic_dataset(
            root, "train", num_scenes=1, num_frames=args.frames, height=args.width // 2, width=args.width
        )
        started = time.perf_counter()
        built = build_cache(stage(args.part, root, Path(tmp) / "build", args), str(cache), say=lambda _: None)
        build_s = time.perf_counter() - started
        gc.collect()
        live = step_time(stage(args.part, root, Path(tmp) / "live", args), args.steps)
        cached = step_time(
            stage(args.part, root, Path(tmp) / "cached", args, **{"data.feature_cache": cache}), args.steps
        )

    print(
        f"measured: dvgt1 {args.size}, {args.part} frozen, {len(RIG)} cameras x {args.frames} frames of "
        f"{args.width // 2}x{args.width} per step, "
        f"median of {args.steps} steps"
    )
    print(f"  cache build: {built['items']} items in {build_s:.1f} s")
    print(f"  step without cache: {live * 1e3:9.1f} ms  (1.00x)")
    print(f"  step with cache:    {cached * 1e3:9.1f} ms  ({live / cached:.2f}x faster)")


if __name__ == "__main__":
    main()

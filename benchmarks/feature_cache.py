"""Step time of a frozen-backbone finetune with the feature cache vs without, measured side by side.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/feature_cache.py [--size small] [--width 256] [--steps 8]

The stage is train/dvgt1/finetune_demo.yaml (the DINOv3 backbone, `aggregator.patch_embed`, frozen)
at --size (small: 4 backbone blocks and 4 aggregator steps, the 1:1 depth ratio of the full model's
24 + 24), one clip of 3 views x 2 frames at --width x --width/2. A cache of the data is built first;
then the same batch trains --steps steps after two warm-up steps, without and with the cache, taking turns
(median step time). Also printed: the frozen backbone's forward time alone on that batch, and the speed-up it
bounds (step / (step - backbone)): a cache can save the backbone's forward and nothing else, since a
frozen prefix needs no backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import tiny_overrides  # noqa: E402
from dvgt.config import load_config  # noqa: E402
from dvgt.data.synthetic import generate_synthetic_dataset  # noqa: E402
from dvgt.models.aggregator import normalize_images  # noqa: E402
from dvgt.train.feature_cache import build_cache  # noqa: E402
from dvgt.train.loop import Trainer  # noqa: E402


def stage(root: Path, run: Path, args, **extra):
    return load_config("train/dvgt1/finetune_demo.yaml", tiny_overrides(root, run, **{
        "model.size": args.size, "max_img_per_gpu": 6, "data.train.views": "[3,3]", "data.train.frames": "[2,2]",
        "data.train.aspect_ratio": "[2.0,2.0]", "data.train.img_width": args.width, "data.train.color_jitter": 0.0,
        "logging.metrics": "false", **extra}))


def step_times(trainers, steps: int):
    """Median train_step time of each trainer on its first batch, the trainers taking turns step by step
    (so a change in machine load affects both alike)."""
    batches = [next(iter(t.train_loader)) for t in trainers]
    for _ in range(2):  # warm-up
        for trainer, batch in zip(trainers, batches):
            trainer.train_step(batch)
    times = [[] for _ in trainers]
    for _ in range(steps):
        for trainer, batch, kept in zip(trainers, batches, times):
            started = time.perf_counter()
            trainer.train_step(batch)
            kept.append(time.perf_counter() - started)
    return batches, [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        generate_synthetic_dataset(root, split="train", num_scenes=2, num_frames=4, height=args.width // 2,
                                   width=args.width, seed=0)
        generate_synthetic_dataset(root, split="val", num_scenes=1, num_frames=4, height=args.width // 2,
                                   width=args.width, seed=1)
        started = time.perf_counter()
        built = build_cache(stage(root, Path(tmp) / "build", args), str(cache), say=lambda _: None)
        build_s = time.perf_counter() - started

        trainer, cached_trainer = (Trainer(stage(root, Path(tmp) / "live", args)),
                                   Trainer(stage(root, Path(tmp) / "cached", args, **{"data.feature_cache": cache})))
        (batch, _), (live, cached) = step_times([trainer, cached_trainer], args.steps)
        images = normalize_images(batch["images"].flatten(0, 2))  # [B*T*V, 3, H, W]
        with torch.no_grad():
            trainer.frozen_prefix(images)
            backbone = []
            for _ in range(args.steps):
                started = time.perf_counter()
                trainer.frozen_prefix(images)
                backbone.append(time.perf_counter() - started)
        backbone_s = statistics.median(backbone)
        trainer.close()
        cached_trainer.close()

    print(f"dvgt1 {args.size} finetune (backbone frozen), {images.shape[0]} images of "
          f"{images.shape[-2]}x{images.shape[-1]} per step, median of {args.steps} steps")
    print(f"  cache build: {built['images']} images in {build_s:.1f} s")
    print(f"  step without cache:      {live * 1e3:8.1f} ms  (1.00x)")
    print(f"  step with cache:         {cached * 1e3:8.1f} ms  ({live / cached:.2f}x faster)")
    print(f"  backbone forward alone:  {backbone_s * 1e3:8.1f} ms  ({backbone_s / live:.0%} of the step without "
          f"cache; bound on the speed-up: {live / (live - backbone_s):.2f}x)")


if __name__ == "__main__":
    main()

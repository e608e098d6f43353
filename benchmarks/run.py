"""Training-step benchmarks, measured side by side in one run and printed as ratios to a baseline.

    .venv/bin/python benchmarks/run.py [--size small] [--steps 5]

1. Activation checkpointing: step time with `model.activation_checkpointing` full, selective and
   every_other relative to none (the cost of recomputing the aggregator blocks, or parts of them, in backward).
2. Gradient accumulation: one batch split into 2 chunks relative to one pass (the cost of smaller
   forward passes at the same images per optimizer step).
Timings are medians over --steps steps after one warm-up step; CPU timings are noisy, compare ratios.
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

from conftest import tiny_overrides

from dvgt.config import load_config
from dvgt.data.synthetic import generate_synthetic_dataset
from dvgt.train.loop import Trainer


def median_step_time(data_root: Path, run_dir: Path, size: str, steps: int, **overrides) -> float:
    cfg = load_config(
        "train/dvgt1/demo.yaml",
        tiny_overrides(
            data_root,
            run_dir,
            **{
                "model.size": size,
                "max_img_per_gpu": 8,
                "data.train.views": "[2,2]",
                "data.train.fixed_num_frames": 2,
                "data.train.img_width": 128,
                **overrides,
            },
        ),
    )
    trainer = Trainer(cfg)
    batches = iter(trainer.train_loader)
    batch = next(batches)
    trainer.train_step(batch)  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        trainer.train_step(batch)
        trainer.read_steps()  # waits for the device (the step itself does not)
        times.append(time.perf_counter() - started)
    trainer.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_synthetic_dataset(root, split="train", num_scenes=2, num_frames=4, height=64, width=128, seed=0)
        generate_synthetic_dataset(root, split="val", num_scenes=1, num_frames=4, height=64, width=128, seed=1)
        run = Path(tmp) / "run"
        times = {
            mode: median_step_time(root, run / mode, args.size, args.steps, **{"model.activation_checkpointing": mode})
            for mode in ("none", "full", "selective", "every_other")
        }
        accum = median_step_time(
            root, run / "accum", args.size, args.steps, **{"model.activation_checkpointing": "none", "accum_steps": 2}
        )
    base = times["none"]
    print(f"DVGT-1 {args.size}, 2 views x 2 frames x 64x128, batch 2, CPU threads {torch.get_num_threads()}")
    print(f"  baseline step (no checkpointing, 1 chunk): {base * 1000:8.1f} ms   ratio 1.00")
    for mode in ("full", "selective", "every_other"):
        label = f"activation checkpointing {mode}:"
        print(f"  {label:<42} {times[mode] * 1000:8.1f} ms   ratio {times[mode] / base:.2f}")
    print(f"  accumulation, 2 chunks:                    {accum * 1000:8.1f} ms   ratio {accum / base:.2f}")


if __name__ == "__main__":
    main()

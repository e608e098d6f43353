"""Data wait as a share of step time in the demo stage, with its DataLoader workers vs loading in the loop.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/data_wait.py [--steps 30] [--data runs/data/synthetic-demo]

Trains train/dvgt1/demo.yaml as shipped (small model, the demo's synthetic data at 112x200, views
2-3, frames 2-6, the official augmentation and colour jitter, num_workers=2) for --steps steps, and the same with num_workers=0
(decoding, resizing and geometry in the training loop), side by side. From the per-step train
records (data_time: waiting for the batch; step_time: data wait + the step): the share
sum(data_time) / sum(step_time) over the steps after the first, whose wait includes starting the
workers and is printed apart. Goal for the demo with workers: <= 5%.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dvgt.config import load_config
from dvgt.train.logger import read_log
from dvgt.train.loop import train


def data_wait(data: str, run: Path, steps: int, workers: int) -> dict:
    train(
        load_config(
            "train/dvgt1/demo.yaml",
            [
                f"num_workers={workers}",
                "max_epochs=1",
                f"limit_train_batches={steps}",
                "limit_val_batches=0",
                f"data.root={data}",
                f"logging.log_dir={run}",
                "logging.log_freq=1",
                "logging.progress=false",
                "logging.metrics=false",
                f"checkpoint.uri={run / 'ckpts'}",
                "checkpoint.keep_last=0",
            ],
        )
    )
    records = [r for r in read_log(run / "train_log.jsonl") if r["kind"] == "train"]
    rest = records[1:]
    return {
        "first_wait": records[0]["data_time"],
        "share": sum(r["data_time"] for r in rest) / sum(r["step_time"] for r in rest),
        "wait": sum(r["data_time"] for r in rest) / len(rest),
        "step": sum(r["step_time"] for r in rest) / len(rest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default="runs/data/synthetic-demo", help="the demo data (generated if missing)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        results = {workers: data_wait(args.data, Path(tmp) / f"w{workers}", args.steps, workers) for workers in (2, 0)}
    print(f"dvgt1 demo stage, {args.steps} steps (shares over steps 2..{args.steps})")
    for workers, r in results.items():
        label = "2 workers (demo)" if workers else "in the loop     "
        print(
            f"  {label}: data wait {r['wait'] * 1e3:7.1f} ms of a {r['step'] * 1e3:7.1f} ms step = "
            f"{r['share']:6.1%}   (first step's wait {r['first_wait']:.2f} s)"
        )
    print(f"  wait with workers / wait in the loop: {results[2]['wait'] / results[0]['wait']:.3f}")


if __name__ == "__main__":
    main()

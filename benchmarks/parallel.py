"""Pipeline stages vs DDP vs FSDP on CPU: step time and per-rank memory as ratios to DDP, in one run.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/parallel.py [--size tiny] [--steps 5]

Each layout runs the real trainer (dvgt.train.loop.Trainer) in its own 2-process gloo group, one
thread per rank: DDP, FSDP zero2 and zero3, and 2 pipeline stages (1F1B and GPipe). A step is one
batch of 4 clips (2 frames x 2 views, 64 x 32) split into 4 chunks (accum_steps: the micro-batches
of the pipeline). Measured on every rank, then the largest rank is reported:
- step time: median over --steps steps after one warm-up step;
- model state: bytes of the parameters, gradients (one per trainable parameter held) and AdamW
  state the rank holds;
- activations: the peak bytes autograd keeps saved for backward during a step (saved-tensor hooks
  count each saved tensor until it is freed).
Under DDP and FSDP the 2 ranks train 2 batches per step; a 2-stage pipeline trains 1 (the ranks
share one model), so images per second is the fair throughput measure. CPU timings are noisy and
CPU ranks have no interconnect: compare the ratios, and the memory above all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LAYOUTS = {
    "ddp": {},
    "fsdp zero2": {"distributed.strategy": "fsdp", "distributed.fsdp.mode": "zero2"},
    "fsdp zero3": {"distributed.strategy": "fsdp", "distributed.fsdp.mode": "zero3"},
    "pipeline 1f1b": {"distributed.pipeline.stages": 2},
    "pipeline gpipe": {"distributed.pipeline.stages": 2, "distributed.pipeline.schedule": "gpipe"},
}


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


class SavedActivations:
    """Live and peak bytes of the tensors autograd saves for backward (saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        meter = self

        class Held:
            size = tensor.numel() * tensor.element_size()

            def __init__(self) -> None:
                self.tensor = tensor
                meter.live += self.size
                meter.peak = max(meter.peak, meter.live)

            def __del__(self) -> None:
                meter.live -= self.size

        return Held()

    @staticmethod
    def unpack(held) -> torch.Tensor:
        return held.tensor


def worker(rank: int, world: int, port: int, layout: str, size: str, steps: int, data: str, out: str) -> None:
    from conftest import tiny_overrides

    from dvgt.config import load_config
    from dvgt.train.loop import Trainer, move_to

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    values = {
        "model.size": size,
        "max_img_per_gpu": 16,
        "accum_steps": 4,
        "limit_val_batches": 0,
        "data.train.views": "[2,2]",
        "data.train.fixed_num_frames": 2,
        "logging.metrics": "false",
        **LAYOUTS[layout],
    }
    trainer = Trainer(
        load_config("train/dvgt1/demo.yaml", tiny_overrides(Path(data), Path(out) / f"run{rank}", **values))
    )
    batch = move_to(next(iter(trainer.train_loader)), trainer.device)
    trainer.train_step(batch)  # warm-up (and the optimizer state's allocation)
    meter, times = SavedActivations(), []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            trainer.train_step(batch)
        trainer.read_steps()
        times.append(time.perf_counter() - started)
    params = [p for p in trainer.model.parameters()]
    result = {
        "step_s": statistics.median(times),
        "images": batch["images"].shape[0] * batch["images"].shape[1] * batch["images"].shape[2],
        "params": local_bytes(params),
        "grads": local_bytes(p for p in params if p.requires_grad),
        "optimizer": local_bytes(v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
        "activations": meter.peak,
        "batches_per_step": trainer.data_world,
    }
    trainer.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def measure(layout: str, size: str, steps: int, data: str) -> list[dict]:
    from servers import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(2, free_port(), layout, size, steps, data, out), nprocs=2, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    from dvgt.data.synthetic import generate_synthetic_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        generate_synthetic_dataset(data, split="train", num_scenes=3, num_frames=12, height=64, width=128, seed=0)
        results = {layout: measure(layout, args.size, args.steps, data) for layout in LAYOUTS}
    mib = 1024**2
    base = results["ddp"]
    base_state = max(r["params"] + r["grads"] + r["optimizer"] for r in base)
    base_act = max(r["activations"] for r in base)
    base_step = max(r["step_s"] for r in base)
    base_rate = base[0]["images"] * base[0]["batches_per_step"] / base_step
    print(f"DVGT-1 {args.size}, 2 CPU ranks (gloo), 4 clips of 2x2 images per batch in 4 chunks; largest rank:")
    print(
        f"{'layout':<15} {'step s':>7} {'vs DDP':>7} {'img/s vs DDP':>13} {'state MiB':>10} {'vs DDP':>7} "
        f"{'activ. MiB':>11} {'vs DDP':>7}"
    )
    for layout, ranks in results.items():
        step = max(r["step_s"] for r in ranks)
        state = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
        act = max(r["activations"] for r in ranks)
        rate = ranks[0]["images"] * ranks[0]["batches_per_step"] / step
        print(
            f"{layout:<15} {step:>7.3f} {step / base_step:>7.2f} {rate / base_rate:>13.2f} {state / mib:>10.1f} "
            f"{state / base_state:>7.2f} {act / mib:>11.1f} {act / base_act:>7.2f}"
        )


if __name__ == "__main__":
    main()

"""Per-rank memory of optimizer state + gradients: FSDP zero2 (and zero3) relative to DDP, 2 CPU ranks.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/fsdp_memory.py [--size small] [--ranks 2]

Each strategy runs in its own 2-process gloo group: DVGT-1 of --size, one training step (forward,
backward, AdamW step) on random images with the trainer's own sharding (dvgt/train/fsdp.py) or DDP
wrapping. Measured on each rank: bytes of the gradient tensors it holds after backward (FSDP: its
slices after reduce-scatter; DDP: full gradients, which alias DDP's buckets with
gradient_as_bucket_view) and of its AdamW state after the step; also the parameter bytes it holds
between steps. Goal: zero2 / DDP about 1 / ranks for optimizer state + gradients. Transient
buffers during backward (a block's unsharded gradients before its reduce-scatter) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def local_bytes(tensors) -> int:
    """Bytes this rank holds: a DTensor's local slice, a plain tensor whole."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(rank: int, world: int, port: int, strategy: str, size: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dvgt.config import FSDPConfig
    from dvgt.models.dvgt1 import DVGT1, SIZES
    from dvgt.train.fsdp import shard_model
    from dvgt.train.optim import build_optimizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DVGT1(SIZES[size], activation_checkpointing="full").train()
    if strategy == "ddp":
        wrapped = DDP(model, gradient_as_bucket_view=True)
    else:
        wrapped = shard_model(model, init_device_mesh("cpu", (world,)), FSDPConfig(mode=strategy), None)
    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95))
    images = torch.rand(1, 2, 2, 3, 64, 128)
    outputs = wrapped(images)
    sum(v.float().mean() for v in outputs.values() if torch.is_tensor(v) and v.requires_grad).backward()
    grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    params = local_bytes(model.parameters())
    if rank == 0:
        count = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"grads": grads, "optimizer": state, "params": params, "numel": count}))
    dist.destroy_process_group()


def measure(strategy: str, size: str, ranks: int) -> dict:
    from tests.servers import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(ranks, free_port(), strategy, size, out), nprocs=ranks, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    results = {s: measure(s, args.size, args.ranks) for s in ("ddp", "zero2", "zero3")}
    mib = 1024**2
    print(f"DVGT-1 {args.size}: {results['ddp']['numel']:,} parameters, {args.ranks} CPU ranks (gloo); per rank:")
    print(f"{'strategy':<9} {'grads MiB':>10} {'optim MiB':>10} {'sum MiB':>9} {'vs DDP':>7} {'params MiB':>11}")
    base = results["ddp"]["grads"] + results["ddp"]["optimizer"]
    for name, r in results.items():
        total = r["grads"] + r["optimizer"]
        print(
            f"{name:<9} {r['grads'] / mib:>10.1f} {r['optimizer'] / mib:>10.1f} {total / mib:>9.1f} "
            f"{total / base:>7.3f} {r['params'] / mib:>11.1f}"
        )


if __name__ == "__main__":
    main()

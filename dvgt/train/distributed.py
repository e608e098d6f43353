"""Process-group set-up: env:// under torchrun (or the Training Operator), a plain single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' asked for, but no CUDA GPU is visible; set device=cpu or device=auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_mins: int = 30,
                     single_process_group: bool = False) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    `single_process_group`: a process alone still gets a group of one (FSDP needs one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=timeout_mins),
                                device_id=torch_device if torch_device.type == "cuda" else None)
    elif single_process_group and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank only if flag is true on every rank (keeps ranks in lockstep on skips)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""Process-group set-up: env:// under torchrun (or the Training Operator), a plain single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


def init_distributed(
    device: str = "auto",
    backend: str = "auto",
    timeout_mins: int = 30,
    single_process_group: bool = False,
    gpus_per_process: int = 1,
) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    `single_process_group`: a process alone still gets a group of one (FSDP needs one).
    `gpus_per_process` k (model.device_map): local rank r owns GPUs r*k .. r*k+k-1; its device is the first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank * gpus_per_process)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=timedelta(minutes=timeout_mins),
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    elif single_process_group and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch_device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """`flag` (a bool tensor on the device) AND-ed over every rank, still on the device: the ranks stay
    in lockstep on skipped steps without the host reading anything."""
    if not dist.is_initialized():
        return flag
    value = flag.to(torch.float32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value > 0.5


class StopVote:
    """Whether any rank asked to stop (SIGTERM), agreed by every rank after the same step without
    involving the device or waiting: each step's flag travels in an asynchronous all-reduce on a CPU
    (gloo) group of its own, started at the end of one step and read at the end of the next, by which
    time it has long arrived. So every rank stops after the same step, at most two steps after the
    signal. Collective: every rank creates it and calls `cast` once per step, in step."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._flag = torch.zeros(1, dtype=torch.int32)  # a host tensor: reading it involves no device
        self._pending: dist.Work | None = None

    def cast(self, stop: bool) -> bool:
        """Vote `stop` for this step; returns the outcome of the previous step's vote (False at first)."""
        if self.group is None:
            return stop
        decided = self.result()
        self._flag = torch.tensor([int(stop)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def result(self) -> bool:
        """The outcome of the vote in flight (waits for it; False when none is)."""
        if self._pending is None:
            return False
        self._pending.wait()
        self._pending = None
        return bool(self._flag.numpy()[0])  # host memory, through numpy: no tensor is synchronised


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

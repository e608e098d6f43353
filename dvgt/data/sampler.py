"""Grouped dynamic batch sampler: one shape per step, the same on every rank.

At step s of epoch e, a generator seeded with (seed, e, s) picks the dataset (by weight), the
number of cameras V, of frames T and the aspect ratio (hence H x W), so every sample of the step
has the same shape and can be stacked; the batch size follows from the image budget:
``max(1, max_img_per_gpu // (V * T))`` clips per rank. The same generator draws the clips of the
global batch (batch x world_size), and each rank keeps its own slice, so ranks agree on the shape
(DDP needs the same graph) but see different clips. Nothing depends on the past, so a run resumed
at step k yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from dvgt.data.dataset import ClipRequest


class ClipSource(Protocol):
    """What the sampler needs to know about a dataset (ClipDataset provides it)."""

    num_cameras: int
    max_frames: int

    def num_clips(self, frames: int) -> int: ...


def image_height(width: int, aspect_ratio: float, patch_size: int) -> int:
    """Height for a width / height ratio, rounded down to a multiple of the patch size (at least one patch)."""
    return max(patch_size, math.floor(width / aspect_ratio / patch_size) * patch_size)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Yields, per step, this rank's list of ClipRequests (use it as a DataLoader ``batch_sampler``)."""

    def __init__(self, datasets: Sequence[ClipSource], weights: Sequence[float], *, views: Sequence[int],
                 frames: Sequence[int], aspect_ratio: Sequence[float], img_width: int, patch_size: int,
                 max_img_per_gpu: int, steps_per_epoch: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        if img_width % patch_size:
            raise ValueError(f"img_width {img_width} must be a multiple of the patch size {patch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.datasets = list(datasets)
        self.probabilities = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.views, self.frames, self.aspect_ratio = tuple(views), tuple(frames), tuple(aspect_ratio)
        self.img_width, self.patch_size = img_width, patch_size
        self.max_img_per_gpu, self.steps_per_epoch = max_img_per_gpu, steps_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.step = 0  # next step to yield in this epoch
        self._resume_step = 0  # where the next iteration starts

    # ---- one step ------------------------------------------------------------------------

    def global_batch(self, epoch: int, step: int) -> list[ClipRequest]:
        """Every rank's requests for one step (batch x world_size), from the shared generator."""
        rng = np.random.default_rng([self.seed, epoch, step])
        dataset_index = int(rng.choice(len(self.datasets), p=self.probabilities))
        dataset = self.datasets[dataset_index]
        views = _draw_capped(rng, self.views, dataset.num_cameras)
        frames = _draw_capped(rng, self.frames, dataset.max_frames)
        height = image_height(self.img_width, rng.uniform(*self.aspect_ratio), self.patch_size)
        batch = max(1, self.max_img_per_gpu // (views * frames))
        total = batch * self.world_size
        num_clips = dataset.num_clips(frames)
        clips = rng.choice(num_clips, size=total, replace=num_clips < total)
        seeds = rng.integers(0, 2**31, size=total)
        return [ClipRequest(dataset_index, int(c), views, frames, height, self.img_width, int(s))
                for c, s in zip(clips, seeds)]

    def batch(self, epoch: int, step: int) -> list[ClipRequest]:
        """This rank's share of the step's global batch."""
        requests = self.global_batch(epoch, step)
        share = len(requests) // self.world_size
        return requests[self.rank * share:(self.rank + 1) * share]

    # ---- iteration and resumption --------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at step 0, the current one keeps a pending resume step."""
        if epoch != self.epoch:
            self.epoch, self.step, self._resume_step = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        """{epoch, step}: step = batches this sampler has yielded in the epoch. With DataLoader workers
        the sampler runs ahead of training by the prefetched batches; a trainer resuming exactly should
        save the number of batches it consumed as ``step`` instead."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration continues epoch ``state['epoch']`` at step ``state['step']``."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._resume_step = self.step

    def __iter__(self) -> Iterator[list[ClipRequest]]:
        start, self._resume_step = self._resume_step, 0  # a resume point is used once
        for step in range(start, self.steps_per_epoch):
            self.step = step + 1
            yield self.batch(self.epoch, step)

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than steps_per_epoch after resuming mid-epoch)."""
        return self.steps_per_epoch - self._resume_step


def capped_range(bounds: Sequence[int], cap: int) -> range:
    """The counts (of frames or cameras) drawn from bounds [min, max], both ends capped at what the dataset offers."""
    return range(min(bounds[0], cap), min(bounds[1], cap) + 1)


def _draw_capped(rng: np.random.Generator, bounds: Sequence[int], cap: int) -> int:
    """Uniform integer in capped_range(bounds, cap)."""
    counts = capped_range(bounds, cap)
    return int(rng.integers(counts.start, counts.stop))

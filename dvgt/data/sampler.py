"""Which samples each rank loads: the official grouped dynamic batches in training, a deterministic
enumeration shared out between ranks in evaluation.

Training (``GroupedBatchSampler``, after dvgt/datasets/sampler.py:GroupedDynamicBatchSampler of
wzzheng/DVGT). Every step, a generator seeded with (seed, epoch, step), the same on every rank, draws:

1. the dataset, with probability proportional to its length (``dataset_len``, or its number of
   sequences), as the official weighting;
2. V cameras uniformly in [views_min, min(views_max, the dataset's cameras)];
3. T frames uniformly in [min_frames, min(max_img_per_gpu // V, frame_num_max - future, the longest
   sequence)];
4. the aspect ratio uniformly in [min, max], rounded to 0.01;
5. ``max(1, max_img_per_gpu // (V * T))`` samples per rank, each with its own seed (scene, start frame,
   cameras and augmentation are drawn by the dataset from it); rank r takes the r-th slice.

Nothing depends on the past, so a run resumed at step k yields exactly the batches an uninterrupted
run would have (the official sampler keeps no such guarantee). An epoch is ``steps_per_epoch`` steps.

Evaluation (``EvaluationSampler``): the sequences of every dataset in order (at most ``limit`` per
dataset), dealt to the ranks round-robin, one per batch, as the official DistributedSampler does. Ranks
with fewer sequences repeat one whose metrics are not counted, so every rank runs the same number of
forward passes (FSDP gathers parameters collectively in each).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from dvgt.data.scene_dataset import SampleRequest


class Source(Protocol):
    """What the sampler needs to know about a dataset (SceneDataset provides it)."""

    @property
    def name(self) -> str: ...
    @property
    def num_cameras(self) -> int: ...
    @property
    def max_frames(self) -> int: ...  # the longest training clip its sequences allow
    @property
    def frame_num_max(self) -> int: ...  # frame_num_max minus the future frames

    def __len__(self) -> int: ...


class TrainIndex(NamedTuple):
    dataset: int
    request: SampleRequest


class EvalIndex(NamedTuple):
    dataset: int
    sequence: int
    counted: bool  # False for the repeats that even out the ranks


SourceT = TypeVar("SourceT", bound=Source)


class GroupedBatchSampler(torch.utils.data.Sampler[list[TrainIndex]], Generic[SourceT]):
    """Yields, per step, this rank's list of TrainIndex (use it as a DataLoader ``batch_sampler``)."""

    def __init__(
        self,
        datasets: Sequence[SourceT],
        *,
        views: Sequence[int],
        min_frames: int,
        aspect_ratio: Sequence[float],
        max_img_per_gpu: int,
        steps_per_epoch: int,
        seed: int,
        fixed_num_views: int = 0,
        fixed_num_frames: int = 0,
        fixed_aspect_ratio: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not datasets:
            raise ValueError("the grouped sampler needs at least one dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.datasets = list(datasets)
        weights = np.array([len(d) for d in self.datasets], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.views, self.min_frames, self.aspect_ratio = tuple(views), min_frames, tuple(aspect_ratio)
        self.fixed_num_views, self.fixed_num_frames = fixed_num_views, fixed_num_frames
        self.fixed_aspect_ratio = fixed_aspect_ratio
        self.max_img_per_gpu, self.steps_per_epoch = max_img_per_gpu, steps_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.step = 0  # next step to yield in this epoch
        self._resume_step = 0  # where the next iteration starts
        for index in range(len(self.datasets)):  # fail at start-up, not at the first step that draws it
            for count in self.views_range(index):
                self.frame_range(index, count)

    # ---- one step ------------------------------------------------------------------------

    def views_range(self, index: int) -> range:
        if self.fixed_num_views:
            return range(self.fixed_num_views, self.fixed_num_views + 1)
        return range(self.views[0], min(self.views[1], self.datasets[index].num_cameras) + 1)

    def frame_range(self, index: int, views: int) -> range:
        """The frame counts a step with ``views`` cameras may draw from dataset ``index``."""
        if self.fixed_num_frames:
            return range(self.fixed_num_frames, self.fixed_num_frames + 1)
        dataset = self.datasets[index]
        high = min(self.max_img_per_gpu // views, dataset.frame_num_max, dataset.max_frames)
        if high < self.min_frames:
            raise ValueError(
                f"dataset '{dataset.name}': no clip length fits between min_frames={self.min_frames} and "
                f"{high} (max_img_per_gpu // {views} views, frame_num_max, the longest sequence); lower "
                f"min_frames or the views, or raise max_img_per_gpu"
            )
        return range(self.min_frames, high + 1)

    def global_batch(self, epoch: int, step: int) -> list[TrainIndex]:
        """Every rank's samples for one step (batch x world_size), from the shared generator."""
        rng = np.random.default_rng([self.seed, epoch, step])
        index = int(rng.choice(len(self.datasets), p=self.probabilities))
        views_range = self.views_range(index)
        views = int(rng.integers(views_range.start, views_range.stop))
        frames_range = self.frame_range(index, views)
        frames = int(rng.integers(frames_range.start, frames_range.stop))
        aspect = self.fixed_aspect_ratio or round(float(rng.uniform(self.aspect_ratio[0], self.aspect_ratio[1])), 2)
        total = max(1, self.max_img_per_gpu // (views * frames)) * self.world_size
        sequences = rng.integers(0, 2**31, size=total)
        seeds = rng.integers(0, 2**63 - 1, size=total)
        return [
            TrainIndex(index, SampleRequest(int(s), views, frames, aspect, int(seed)))
            for s, seed in zip(sequences, seeds)
        ]

    def batch(self, epoch: int, step: int) -> list[TrainIndex]:
        """This rank's share of the step's global batch."""
        samples = self.global_batch(epoch, step)
        share = len(samples) // self.world_size
        return samples[self.rank * share : (self.rank + 1) * share]

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

    def __iter__(self) -> Iterator[list[TrainIndex]]:
        start, self._resume_step = self._resume_step, 0  # a resume point is used once
        for step in range(start, self.steps_per_epoch):
            self.step = step + 1
            yield self.batch(self.epoch, step)

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than steps_per_epoch after resuming mid-epoch)."""
        return self.steps_per_epoch - self._resume_step


class EvaluationSampler(torch.utils.data.Sampler):
    """This rank's evaluation sequences, one per batch (module docstring)."""

    def __init__(self, sizes: Sequence[int], limit: int | None = None, rank: int = 0, world_size: int = 1):
        """``sizes``: the number of sequences of each dataset; ``limit``: at most this many per dataset."""
        self.items = [
            (d, s) for d, size in enumerate(sizes) for s in range(size if limit is None else min(size, limit))
        ]
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[EvalIndex]]:
        per_rank = math.ceil(len(self.items) / self.world_size)
        for k in range(per_rank):
            position = k * self.world_size + self.rank
            counted = position < len(self.items)
            dataset, sequence = self.items[position % len(self.items)]
            yield [EvalIndex(dataset, sequence, counted)]

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.world_size)

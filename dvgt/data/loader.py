"""DataLoader construction for training/validation, and one fixed clip for evaluation."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dvgt.data.dataset import MixedClipDataset, collate_clips, open_entry
from dvgt.data.feature_cache import CachedClipDataset, FeatureCache
from dvgt.data.sampler import GroupedBatchSampler


def open_split_datasets(data_cfg_split: Any, *, config_key: str = "data.train",
                        generate_synthetic: bool = True) -> MixedClipDataset:
    """The mixed dataset of a DataSplitConfig (entries in order; errors name data.<split>.datasets[i])."""
    if len(data_cfg_split.datasets) == 0:
        raise ValueError(f"{config_key}.datasets is empty; list at least one dataset (name, root, weight, split)")
    return MixedClipDataset([
        open_entry(entry, frame_stride=data_cfg_split.frame_stride, color_jitter=data_cfg_split.color_jitter,
                   config_key=f"{config_key}.datasets[{i}].root", generate_synthetic=generate_synthetic)
        for i, entry in enumerate(data_cfg_split.datasets)])


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed (itself derived
    from the loader's seeded generator), so any stray global randomness is reproducible too."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_dataloader(data_cfg_split: Any, *, patch_size: int, max_img_per_gpu: int, seed: int, rank: int,
                     world_size: int, num_workers: int, pin_memory: bool, prefetch_factor: int,
                     persistent_workers: bool, steps_per_epoch: int, epoch: int = 0, start_step: int = 0,
                     generate_synthetic: bool = True, config_key: str = "data.train",
                     feature_cache: FeatureCache | None = None) -> DataLoader:
    """A DataLoader over the split's mixed datasets, batched by the grouped sampler.

    The sampler is ``loader.batch_sampler``: call ``set_epoch(e)`` before each epoch, or
    ``load_state_dict({"epoch": e, "step": k})`` to resume. ``config_key`` (data.train or data.val)
    only names the config keys in error messages. ``seed`` must be the same on every rank (the
    sampler's shared choices); ranks differ by ``rank``. Batches are dicts (see docs/data.md); with a ``feature_cache`` they also hold
    the cached outputs of the frozen part (docs/feature-cache.md).
    """
    dataset = open_split_datasets(data_cfg_split, config_key=config_key, generate_synthetic=generate_synthetic)
    served = dataset if feature_cache is None else CachedClipDataset(dataset, feature_cache, patch_size, data_cfg_split.views)
    sampler = GroupedBatchSampler(
        dataset.datasets, [entry.weight for entry in data_cfg_split.datasets], views=data_cfg_split.views,
        frames=data_cfg_split.frames, aspect_ratio=data_cfg_split.aspect_ratio, img_width=data_cfg_split.img_width,
        patch_size=patch_size, max_img_per_gpu=max_img_per_gpu, steps_per_epoch=steps_per_epoch, seed=seed,
        rank=rank, world_size=world_size)
    sampler.load_state_dict({"epoch": epoch, "step": start_step})
    workers = num_workers > 0
    base_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])  # per-worker seeds derive from it
    return DataLoader(served, batch_sampler=sampler, collate_fn=collate_clips, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=persistent_workers and workers,
                      worker_init_fn=seed_worker if workers else None,
                      generator=torch.Generator().manual_seed(base_seed))


def load_clip(entry: Any, scene_index: int = 0, *, views: int, frames: int, height: int, width: int,
              start_frame: int = 0, frame_stride: int = 1, generate_synthetic: bool = True) -> dict[str, Any]:
    """One fixed clip (first ``views`` cameras of the rig, no augmentation) as a batch of one,
    e.g. a held-out clip to evaluate or visualise the same scene at every epoch."""
    dataset = open_entry(entry, frame_stride=frame_stride, generate_synthetic=generate_synthetic)
    return collate_clips([dataset.load_clip(scene_index, start_frame, views, frames, height, width)])

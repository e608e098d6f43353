"""From a data config to DataLoaders: the datasets of a split (one per official parquet), the mix that
serves them as tensors, the sampler, and the collation into batches."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dvgt.data import format as fmt
from dvgt.data.augment import ColorJitter, to_tensors
from dvgt.data.remote import S3Root, is_s3, open_root
from dvgt.data.sampler import EvalIndex, EvaluationSampler, GroupedBatchSampler, TrainIndex
from dvgt.data.scene_dataset import DatasetSpec, SceneDataset
from dvgt.data.synthetic import ensure_synthetic_dataset


def entry_root(data_cfg: Any, entry: Any) -> str:
    """The tree root of an entry of data.<split>.datasets as configured: a local path or s3:// URI."""
    return str(entry.root if entry.root is not None else data_cfg.root)


def open_entry_root(data_cfg: Any, entry: Any) -> tuple[Path, S3Root | None]:
    """(the folder the entry's tree is read from, the S3Root that fills it or None): dvgt/data/remote.py."""
    return open_root(entry_root(data_cfg, entry), data_cfg.s3_cache, data_cfg.s3)


def dataset_spec(
    data_cfg: Any, split: str, entry: Any, *, patch_size: int, gt_scale_factor: float, targets: frozenset
) -> DatasetSpec:
    """The DatasetSpec of one entry of data.<split> (training for split "train", evaluation otherwise)."""
    s = data_cfg[split]
    root, remote = open_entry_root(data_cfg, entry)
    tree = fmt.Tree(root, entry.dataset)
    training = split == "train"

    def pair(v):
        return None if v is None else (float(v[0]), float(v[1]))

    return DatasetSpec(
        root=root,
        parquet=tree.parquet(entry.split, entry.filtered),
        mode="train" if training else "val",
        original_fps=entry.original_fps,
        target_fps=s.target_fps,
        image_width=s.img_width,
        patch_size=patch_size,
        clip_split=s.clip_split,
        fixed_num_frames=s.fixed_num_frames,
        fixed_num_views=s.fixed_num_views,
        fixed_aspect_ratio=entry.fixed_aspect_ratio or s.fixed_aspect_ratio,
        future_frames=s.future_frames,
        frame_num_max=entry.frame_num_max,
        dataset_len=entry.dataset_len,
        inside_random=s.inside_random,
        aug_pixel_aspect_range=pair(s.aug_pixel_aspect_range) if training else None,
        aug_safe_scales=pair(s.aug_safe_scales),
        random_resize=s.random_resize and training,
        fast_decode=s.fast_decode and training,
        filter_lidar=s.filter_lidar,
        eval_lidar_proj_depth=s.eval_lidar_proj_depth,
        gt_scale_factor=gt_scale_factor,
        max_ray_depth=s.max_ray_depth,
        targets=targets,
        scene_filter=tree.scene_filter(s.clip_split) if s.clip_split.startswith("nav") else None,
        remote=remote,
    )


def open_datasets(
    data_cfg: Any,
    split: str,
    *,
    patch_size: int,
    gt_scale_factor: float,
    targets: frozenset,
    generate_synthetic: bool = True,
) -> list[SceneDataset]:
    """The datasets of data.<split>, in order; synthetic entries on a local root are generated on first
    use (on an s3:// root they are read as they are: generate and upload them beforehand)."""
    entries = data_cfg[split].datasets
    if len(entries) == 0:
        raise ValueError(f"data.{split}.datasets is empty; list at least one dataset (dataset, split)")
    datasets = []
    for i, entry in enumerate(entries):
        if entry.synthetic and generate_synthetic and not is_s3(entry_root(data_cfg, entry)):
            ensure_synthetic_dataset(entry_root(data_cfg, entry), entry.split)
        spec = dataset_spec(
            data_cfg, split, entry, patch_size=patch_size, gt_scale_factor=gt_scale_factor, targets=targets
        )
        datasets.append(SceneDataset(spec, config_key=f"data.{split}.datasets[{i}]"))
    return datasets


class MixedDataset(torch.utils.data.Dataset):
    """Several SceneDatasets behind one index (TrainIndex or EvalIndex); samples come out as tensors
    with their dataset's name, colour-jittered in training."""

    def __init__(self, datasets: Sequence[SceneDataset], jitter: ColorJitter | None = None):
        self.datasets, self.jitter = list(datasets), jitter

    def __getitem__(self, index: TrainIndex | EvalIndex) -> dict[str, Any]:
        dataset = self.datasets[index.dataset]
        if isinstance(index, TrainIndex):
            generator = torch.Generator().manual_seed(index.request.seed)  # colour jitter; the dataset has its own
            sample = to_tensors(dataset[index.request], self.jitter, generator)
        else:
            sample = to_tensors(dataset[index.sequence])
            sample["counted"] = index.counted
        sample["dataset"] = dataset.name
        return sample


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new leading batch dimension; other values become lists."""
    return {
        key: torch.stack([s[key] for s in samples])
        if isinstance(samples[0][key], torch.Tensor)
        else [s[key] for s in samples]
        for key in samples[0]
    }


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed, so any stray global
    randomness is reproducible too (every draw of ours comes from a sample's own seed)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def color_jitter(split_cfg: Any) -> ColorJitter | None:
    c = split_cfg.color_jitter
    if not c.enabled:
        return None
    return ColorJitter(
        brightness=c.brightness,
        contrast=c.contrast,
        saturation=c.saturation,
        hue=c.hue,
        p=c.p,
        gray_scale=c.gray_scale,
        cojitter=c.cojitter,
        cojitter_ratio=c.cojitter_ratio,
    )


def train_sampler(
    split_cfg: Any,
    datasets: Sequence[SceneDataset],
    *,
    max_img_per_gpu: int,
    steps_per_epoch: int = 1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> GroupedBatchSampler[SceneDataset]:
    """The grouped sampler of data.train (also what the feature cache asks which clips can be drawn)."""
    s = split_cfg
    return GroupedBatchSampler(
        datasets,
        views=s.views,
        min_frames=s.min_frames,
        aspect_ratio=s.aspect_ratio,
        max_img_per_gpu=max_img_per_gpu,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        fixed_num_views=s.fixed_num_views,
        fixed_num_frames=s.fixed_num_frames,
        fixed_aspect_ratio=s.fixed_aspect_ratio,
        rank=rank,
        world_size=world_size,
    )


def build_train_loader(
    data_cfg: Any,
    datasets: Sequence[SceneDataset],
    *,
    max_img_per_gpu: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int,
    persistent_workers: bool,
    steps_per_epoch: int,
    served: torch.utils.data.Dataset | None = None,
) -> DataLoader:
    """The training DataLoader: grouped batches over the datasets of data.train (``loader.batch_sampler``
    is the sampler: ``load_state_dict({"epoch": e, "step": k})`` resumes). ``seed`` must be the same on
    every rank. ``served`` replaces the mix (the feature cache wraps it)."""
    s = data_cfg.train
    sampler = train_sampler(
        s,
        datasets,
        max_img_per_gpu=max_img_per_gpu,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    workers = num_workers > 0
    base_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return DataLoader(
        served or MixedDataset(datasets, color_jitter(s)),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=persistent_workers and workers,
        worker_init_fn=seed_worker if workers else None,
        generator=torch.Generator().manual_seed(base_seed),
    )


def build_eval_loader(
    datasets: Sequence[SceneDataset], *, limit: int | None, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """The evaluation DataLoader: this rank's share of the sequences, one per batch."""
    sampler = EvaluationSampler([len(d.sequences) for d in datasets], limit, rank, world_size)
    return DataLoader(MixedDataset(datasets), batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def load_clip(dataset: SceneDataset, index: int = 0) -> dict[str, Any]:
    """One evaluation sequence as a batch of one (to visualise the same clip at every epoch)."""
    return collate([MixedDataset([dataset])[EvalIndex(0, index, True)]])

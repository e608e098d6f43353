"""The frozen-feature cache on storage: its layout, its manifest, and the reader the data loader uses.

A cache holds the output of the frozen part of the model (dvgt/train/feature_cache.py chooses it) for
every training item at every size the sampler can ask for. Two parts can be cached:

- the backbone (`aggregator.patch_embed`, the DINO encoder): one entry per image, its patch tokens
  [P, C] with P = (H/p) x (W/p);
- the whole aggregator (heads-only finetunes): one entry per clip, the aggregator outputs the heads
  read, [L, T, V, N, D] (L layers, N = special + patch tokens per image).

Items are named by the official tree's file names (the parquet's `filename` column), so a cache
serves any mix that contains its datasets; the images a training sample holds are named in its
`filenames` (SceneDataset), which is how CachedDataset finds their entries.

It is written by `dvgt cache build` to a local folder or S3:

    <uri>/shard-00000.safetensors   tensors named "<item id>@<H>x<W>"
    <uri>/shard-00000.json          the shard's commit record: size, sha256, fingerprint (written after it)
    <uri>/manifest.json             written last: every shard's size and sha256, the fingerprint, counts

An item goes to shard sha256(item id) mod num_shards, so a reader finds any entry by reading one
shard's header (once per process) and then the entry's bytes with one ranged read. docs/feature-cache.md
describes the format and the rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from dvgt.checkpoint.safetensors_stream import DTYPE_OF
from dvgt.checkpoint.storage import Storage, open_storage
from dvgt.data.loader import MixedDataset, color_jitter
from dvgt.data.sampler import GroupedBatchSampler, TrainIndex
from dvgt.data.scene_dataset import SceneDataset, target_shape

FORMAT = "dvgt-feature-cache-v3"
BACKBONE, AGGREGATOR = "backbone", "aggregator"  # the parts a cache can hold
MANIFEST = "manifest.json"


class FeatureCacheError(ValueError):
    """A feature cache that cannot be used: missing, built for other weights or preprocessing, or corrupt."""


def dataset_label(dataset: SceneDataset) -> tuple[str, str]:
    """(official dataset name, split) of a dataset: its parquet is <name>_<split>.parquet."""
    return dataset.name, dataset.spec.parquet.stem[len(dataset.name) + 1 :]


def image_id(dataset: str, split: str, filename: str) -> str:
    """The name of a source image in the cache: dataset name, split and its `filename` in the parquet."""
    return f"{dataset}/{split}/{filename}"


def clip_id(dataset: str, split: str, filenames: Sequence[str], frames: int, views: int) -> str:
    """The name of a clip in the cache: its first image and shape, and a digest of all its image file
    names in order (frame-major), which fixes the frames, their order and the cameras."""
    digest = hashlib.sha256("\n".join(filenames).encode()).hexdigest()[:16]
    return f"{dataset}/{split}/{filenames[0]}+{frames}x{views}-{digest}"


def entry_key(item: str, height: int, width: int) -> str:
    """The tensor name of an item's (image's or clip's) cached output at one size (its images at H x W)."""
    return f"{item}@{height}x{width}"


def shard_of(item: str, num_shards: int) -> int:
    return int(hashlib.sha256(item.encode()).hexdigest()[:8], 16) % num_shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def commit_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def cache_sizes(dataset: SceneDataset, aspect_ratio: Sequence[float]) -> list[tuple[int, int]]:
    """Every (height, width) a training sample of the dataset can have: its fixed aspect ratio (the entry's
    or data.train.fixed_aspect_ratio), else each aspect the sampler draws from [min, max] (rounded to two
    decimals, GroupedBatchSampler.global_batch), through the dataset's own target_shape."""
    spec = dataset.spec
    aspects = (
        [spec.fixed_aspect_ratio]
        if spec.fixed_aspect_ratio
        else [k / 100 for k in range(round(aspect_ratio[0] * 100), round(aspect_ratio[1] * 100) + 1)]
    )
    return sorted({target_shape(spec.image_width, aspect, spec.patch_size) for aspect in aspects})


def fingerprint_digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_fingerprint(found: dict[str, Any], expected: dict[str, Any], uri: str) -> None:
    """Raise a one-line FeatureCacheError naming every part of the fingerprint that differs."""
    differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differ:
        detail = "; ".join(f"{k}: cache {found.get(k)!r} vs now {expected.get(k)!r}" for k in differ)
        raise FeatureCacheError(
            f"feature cache {uri} was built for other {', '.join(differ)} ({detail}); rebuild it with "
            f"`dvgt cache build --config=<this config> --out <new uri>` or drop data.feature_cache"
        )


def read_manifest(storage: Storage) -> dict[str, Any]:
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise FeatureCacheError(
            f"{storage.uri} is not a committed feature cache (no {MANIFEST}); build it with `dvgt cache build "
            f"--config=... --out {storage.uri}` (an interrupted build resumes where it stopped)"
        ) from None
    if manifest.get("format") != FORMAT:
        raise FeatureCacheError(
            f"{storage.uri}/{MANIFEST} is not a {FORMAT} manifest (format {manifest.get('format')!r}); "
            f"rebuild it with this version's `dvgt cache build`"
        )
    return manifest


def shard_problem(storage: Storage, name: str, size: int, sha256: str) -> str | None:
    """What is wrong with a shard, re-read against its recorded size and sha256 (None: intact)."""
    hasher = hashlib.sha256()
    try:
        found = len(storage.read(name, hasher=hasher))
    except FileNotFoundError:
        return f"{name}: missing"
    if (found, hasher.hexdigest()) != (size, sha256):
        return f"{name}: corrupt (size {found} vs {size}, sha256 {hasher.hexdigest()[:12]}... vs {sha256[:12]}...)"
    return None


def verify_shards(storage: Storage, manifest: dict[str, Any]) -> list[str]:
    """Problems found by re-reading every shard against the manifest's size and sha256 (empty: intact)."""
    problems = [shard_problem(storage, shard["name"], shard["size"], shard["sha256"]) for shard in manifest["shards"]]
    return [problem for problem in problems if problem]


class FeatureCache:
    """Reads tokens from a committed cache by ranged reads. Picklable: each DataLoader worker opens its
    own storage client and reads each shard's header once."""

    def __init__(self, uri: str, s3: Any = None) -> None:
        self.uri, self.s3 = str(uri), s3
        self.manifest = read_manifest(open_storage(self.uri, s3))
        self.num_shards = int(self.manifest["num_shards"])
        self._storage: Storage | None = None
        self._headers: dict[int, tuple] = {}  # shard -> (base offset, header)
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None, "_headers": {}}

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    def _store(self) -> Storage:
        """The storage, opened anew in each process (a forked loader worker too)."""
        if self._storage is None or self._pid != os.getpid():
            self._storage, self._headers, self._pid = open_storage(self.uri, self.s3), {}, os.getpid()
        return self._storage

    def _header(self, shard: int) -> tuple[int, dict[str, Any]]:
        store = self._store()
        if shard not in self._headers:
            name = shard_name(shard)
            length = int.from_bytes(store.read_range(name, 0, 8), "little")
            header = json.loads(store.read_range(name, 8, length))
            header.pop("__metadata__", None)
            self._headers[shard] = (8 + length, header)
        return self._headers[shard]

    def get(self, item: str, height: int, width: int) -> torch.Tensor | None:
        """The cached output of an item (image or clip id) at H x W, or None when the cache does not hold it."""
        shard = shard_of(item, self.num_shards)
        base, header = self._header(shard)
        info = header.get(entry_key(item, height, width))
        if info is None:
            return None
        begin, end = info["data_offsets"]
        data = bytearray(self._store().read_range(shard_name(shard), base + begin, end - begin))
        return torch.frombuffer(data, dtype=DTYPE_OF[info["dtype"]]).reshape(info["shape"])


class CachedDataset(torch.utils.data.Dataset):
    """The training mix (MixedDataset, as the live loader serves it) with the cached outputs of the frozen
    part (zeros where missing) and which were found: a backbone cache adds `patch_tokens` [T, V, P, C] and
    `patch_tokens_hit` [T, V]; an aggregator cache adds `aggregator_tokens` [L, T, V, N, D] and
    `aggregator_tokens_hit` [T, V] (the same for all images of a clip). The trainer computes the misses
    live. The config was checked by dvgt.train.feature_cache.open_for_training (no pixel augmentation,
    fixed cameras for a clip cache); this checks at start that the cache holds every size the sampler can
    draw for each of its datasets (a dataset the cache does not hold is served as misses)."""

    def __init__(self, datasets: Sequence[SceneDataset], cache: FeatureCache, split_cfg: Any) -> None:
        """`split_cfg`: data.train."""
        self.mix, self.cache = MixedDataset(datasets, color_jitter(split_cfg)), cache
        manifest = cache.manifest
        self.part, self.token_dim = manifest["part"], int(manifest["token_dim"])
        self.dtype = DTYPE_OF[manifest["dtype"]]
        if self.part == AGGREGATOR:
            self.layers, self.special_tokens = len(manifest["layers"]), int(manifest["special_tokens"])
        self.labels = [dataset_label(d) for d in datasets]
        held = {(d["name"], d["split"]): {tuple(size) for size in d["sizes"]} for d in manifest["datasets"]}
        for dataset, label in zip(datasets, self.labels):
            if label not in held:
                continue  # not in this cache: every sample of it is a miss
            missing = [size for size in cache_sizes(dataset, split_cfg.aspect_ratio) if size not in held[label]]
            if missing:
                raise FeatureCacheError(
                    f"feature cache {cache.uri} holds no entries of {'/'.join(label)} for image sizes (H, W) {missing} "
                    f"that data.train (img_width, aspect_ratio, fixed_aspect_ratio) can draw; rebuild it with "
                    f"`dvgt cache build` for this config"
                )

    def __getitem__(self, index: TrainIndex) -> dict[str, Any]:
        sample = self.mix[index]
        name, split = self.labels[index.dataset]
        patch = self.mix.datasets[index.dataset].spec.patch_size
        T, V, _, H, W = sample["images"].shape
        P = (H // patch) * (W // patch)
        filenames = sample["filenames"]  # [T * V], frame-major
        if self.part == BACKBONE:
            tokens = torch.zeros(T * V, P, self.token_dim, dtype=self.dtype)
            hit = torch.zeros(T * V, dtype=torch.bool)
            for i, filename in enumerate(filenames):
                cached = self.cache.get(image_id(name, split, filename), H, W)
                if cached is not None and cached.shape == tokens.shape[1:]:
                    tokens[i], hit[i] = cached, True
            return {**sample, "patch_tokens": tokens.view(T, V, P, -1), "patch_tokens_hit": hit.view(T, V)}
        shape = (self.layers, T, V, self.special_tokens + P, self.token_dim)
        cached = self.cache.get(clip_id(name, split, filenames, T, V), H, W)
        found = cached is not None and tuple(cached.shape) == shape
        tokens = cached if cached is not None and found else torch.zeros(shape, dtype=self.dtype)
        return {**sample, "aggregator_tokens": tokens, "aggregator_tokens_hit": torch.full((T, V), found)}


class CacheItem(NamedTuple):
    """One cache entry's source at any size: an image (frames = views = 1) or a clip of T frames x V cameras."""

    id: str
    dataset: int  # index in the split's datasets
    rows: tuple[int, ...]  # the table rows of its images, frame-major (T * V)
    frames: int
    views: int


def require_fixed_cameras(split_cfg: Any) -> None:
    """A clip cache enumerates clips, so the cameras of a clip must not be a random subset: the dataset
    takes every camera in order with data.train.fixed_num_views > 0, and one random camera with views
    [1, 1] (each camera is then a clip); any other count is a random subset in random order."""
    if not (split_cfg.fixed_num_views > 0 or split_cfg.views[1] == 1):
        raise FeatureCacheError(
            f"an aggregator feature cache holds one entry per clip, but data.train.views={list(split_cfg.views)} "
            f"with data.train.fixed_num_views=0 draws a random subset of the cameras, in random order, for each "
            f"clip, which cannot be enumerated; set data.train.fixed_num_views to the rig's camera count (every "
            f"camera in the dataset's order) or data.train.views=[1,1], or cache only the backbone (freeze "
            f"aggregator.patch_embed.* alone)"
        )


def clip_cameras(dataset: SceneDataset, split_cfg: Any) -> list[tuple[int, ...]]:
    """The camera choices of the clips the sampler can draw from the dataset (after require_fixed_cameras):
    all cameras in order, or each camera alone."""
    if split_cfg.fixed_num_views > 0:
        return [tuple(range(dataset.num_cameras))]
    return [(camera,) for camera in range(dataset.num_cameras)]


def cache_items(part: str, sampler: GroupedBatchSampler[SceneDataset], split_cfg: Any) -> list[CacheItem]:
    """Every item of the sampler's datasets in a fixed order: each image (backbone), or each clip the
    sampler can draw (aggregator)."""
    items = []
    for d, dataset in enumerate(sampler.datasets):
        items += _images(d, dataset) if part == BACKBONE else _clips(d, sampler, split_cfg)
    return items


def _rows_at_target_rate(dataset: SceneDataset, sequence: Any) -> np.ndarray:
    """[F, C] table rows of a sequence's frames at the target frame rate (what training draws clips from)."""
    scene = dataset.scenes[sequence.scene]
    return scene.rows[np.searchsorted(scene.frames, sequence.frames[:: dataset.step])]


def _images(d: int, dataset: SceneDataset) -> list[CacheItem]:
    """Every image a training sample can hold: each camera of every sequence's frames at the target rate."""
    name, split = dataset_label(dataset)
    filenames = dataset.table.filename.to_pylist()
    items: dict[str, CacheItem] = {}
    for sequence in dataset.sequences:
        for row in _rows_at_target_rate(dataset, sequence).reshape(-1).tolist():
            item = image_id(name, split, filenames[row])
            items.setdefault(item, CacheItem(item, d, (row,), 1, 1))
    return list(items.values())


def _clips(d: int, sampler: GroupedBatchSampler[SceneDataset], split_cfg: Any) -> list[CacheItem]:
    """Every clip the sampler can draw from dataset d, as SceneDataset._draw_clip draws it: every frame count
    the sampler allows (frame_range for each views_range count), from every sequence with room for the
    clip and its future frames at the target rate, every start; clips that several sequences share once."""
    dataset = sampler.datasets[d]
    name, split = dataset_label(dataset)
    filenames = dataset.table.filename.to_pylist()
    cameras = clip_cameras(dataset, split_cfg)
    counts = sorted({frames for views in sampler.views_range(d) for frames in sampler.frame_range(d, views)})
    items: dict[str, CacheItem] = {}
    for frames in counts:
        span = frames + dataset.spec.future_frames
        for sequence in dataset.sequences:
            rows = _rows_at_target_rate(dataset, sequence)  # [F, C]
            for start in range(len(rows) - span + 1):
                for chosen in cameras:
                    clip = rows[start : start + frames][:, chosen].reshape(-1).tolist()  # frame-major
                    item = clip_id(name, split, [filenames[row] for row in clip], frames, len(chosen))
                    items.setdefault(item, CacheItem(item, d, tuple(clip), frames, len(chosen)))
    return list(items.values())

"""The frozen-feature cache on storage: its layout, its manifest, and the reader the data loader uses.

A cache holds the output of the frozen part of the model (dvgt/train/feature_cache.py chooses it) for
every training item at every size the sampler can ask for. Two parts can be cached:

- the backbone (`aggregator.patch_embed`, the DINO encoder): one entry per image, its patch tokens
  [P, C] with P = (H/p) x (W/p);
- the whole aggregator (heads-only finetunes): one entry per clip, the aggregator outputs the heads
  read, [L, T, V, N, D] (L layers, N = special + patch tokens per image).

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
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from dvgt.checkpoint.safetensors_stream import DTYPE_OF
from dvgt.checkpoint.storage import Storage, open_storage
from dvgt.data.scene_dataset import target_shape

FORMAT = "dvgt-feature-cache-v2"
BACKBONE, AGGREGATOR = "backbone", "aggregator"  # the parts a cache can hold
MANIFEST = "manifest.json"


class FeatureCacheError(ValueError):
    """A feature cache that cannot be used: missing, built for other weights or preprocessing, or corrupt."""


def image_id(dataset: str, split: str, image_path: str) -> str:
    """The name of a source image in the cache: dataset label, split and the path in its scene table."""
    return f"{dataset}/{split}/{image_path}"


def clip_id(dataset: str, split: str, image_paths: Sequence[str], frames: int, views: int) -> str:
    """The name of a clip in the cache: its first image and shape, and a digest of all its image paths
    in order (frame-major), which fixes the frames, their order and the cameras."""
    digest = hashlib.sha256("\n".join(image_paths).encode()).hexdigest()[:16]
    return f"{dataset}/{split}/{image_paths[0]}+{frames}x{views}-{digest}"


def entry_key(item: str, height: int, width: int) -> str:
    """The tensor name of an item's (image's or clip's) cached output at one size (centre crop-resize to H x W)."""
    return f"{item}@{height}x{width}"


def shard_of(item: str, num_shards: int) -> int:
    return int(hashlib.sha256(item.encode()).hexdigest()[:8], 16) % num_shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def commit_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def cache_sizes(split_cfg: Any, patch_size: int) -> List[tuple]:
    """Every (height, width) the grouped sampler can draw for a data split: the width is fixed
    (img_width) and the height is width / aspect rounded down to the patch size, so the aspect range
    [min, max] gives every multiple of the patch between the heights of its two ends."""
    width = int(split_cfg.img_width)
    low, high = (image_height(width, float(a), patch_size) for a in (max(split_cfg.aspect_ratio),
                                                                      min(split_cfg.aspect_ratio)))
    return [(h, width) for h in range(low, high + 1, patch_size)]


def fingerprint_digest(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_fingerprint(found: Dict[str, Any], expected: Dict[str, Any], uri: str) -> None:
    """Raise a one-line FeatureCacheError naming every part of the fingerprint that differs."""
    differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differ:
        detail = "; ".join(f"{k}: cache {found.get(k)!r} vs now {expected.get(k)!r}" for k in differ)
        raise FeatureCacheError(
            f"feature cache {uri} was built for other {', '.join(differ)} ({detail}); rebuild it with "
            f"`dvgt cache build --config=<this config> --out <new uri>` or drop data.feature_cache")


def read_manifest(storage: Storage) -> Dict[str, Any]:
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise FeatureCacheError(
            f"{storage.uri} is not a committed feature cache (no {MANIFEST}); build it with `dvgt cache build "
            f"--config=... --out {storage.uri}` (an interrupted build resumes where it stopped)") from None
    if manifest.get("format") != FORMAT:
        raise FeatureCacheError(f"{storage.uri}/{MANIFEST} is not a {FORMAT} manifest (format {manifest.get('format')!r}); "
                                f"rebuild it with this version's `dvgt cache build`")
    return manifest


def shard_problem(storage: Storage, name: str, size: int, sha256: str) -> Optional[str]:
    """What is wrong with a shard, re-read against its recorded size and sha256 (None: intact)."""
    hasher = hashlib.sha256()
    try:
        found = len(storage.read(name, hasher=hasher))
    except FileNotFoundError:
        return f"{name}: missing"
    if (found, hasher.hexdigest()) != (size, sha256):
        return (f"{name}: corrupt (size {found} vs {size}, sha256 {hasher.hexdigest()[:12]}... vs "
                f"{sha256[:12]}...)")
    return None


def verify_shards(storage: Storage, manifest: Dict[str, Any]) -> List[str]:
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
        self._storage: Optional[Storage] = None
        self._headers: Dict[int, tuple] = {}  # shard -> (base offset, header)
        self._pid = os.getpid()

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_storage": None, "_headers": {}}

    @property
    def fingerprint(self) -> Dict[str, Any]:
        return self.manifest["fingerprint"]

    def _header(self, shard: int) -> tuple:
        if self._storage is None or self._pid != os.getpid():
            self._storage, self._headers, self._pid = open_storage(self.uri, self.s3), {}, os.getpid()
        if shard not in self._headers:
            name = shard_name(shard)
            length = int.from_bytes(self._storage.read_range(name, 0, 8), "little")
            header = json.loads(self._storage.read_range(name, 8, length))
            header.pop("__metadata__", None)
            self._headers[shard] = (8 + length, header)
        return self._headers[shard]

    def get(self, image: str, height: int, width: int) -> Optional[torch.Tensor]:
        """The tokens [P, C] of an image at H x W, or None when the cache does not hold them."""
        shard = shard_of(image, self.num_shards)
        base, header = self._header(shard)
        info = header.get(entry_key(image, height, width))
        if info is None:
            return None
        begin, end = info["data_offsets"]
        data = bytearray(self._storage.read_range(shard_name(shard), base + begin, end - begin))
        return torch.frombuffer(data, dtype=DTYPE_OF[info["dtype"]]).reshape(info["shape"])


class CachedDataset(torch.utils.data.Dataset):
    """Clips with their cached outputs of the frozen part (zeros where missing) and which were found:
    a backbone cache adds `patch_tokens` [T, V, P, C] and `patch_tokens_hit` [T, V]; an aggregator cache
    adds `aggregator_tokens` [L, T, V, N, D] and `aggregator_tokens_hit` [T, V] (the same for all images
    of a clip). The trainer computes the misses live."""

    def __init__(self, dataset: MixedClipDataset, cache: FeatureCache, patch_size: int, views: Sequence[int]) -> None:
        """`views`: the split's camera-count bounds (data.train.views)."""
        self.dataset, self.cache, self.patch_size = dataset, cache, patch_size
        manifest = cache.manifest
        self.part, self.token_dim = manifest["part"], int(manifest["token_dim"])
        self.dtype = DTYPE_OF[manifest["dtype"]]
        if self.part == AGGREGATOR:
            self.layers, self.special_tokens = len(manifest["layers"]), int(manifest["special_tokens"])
        # A clip cache holds every clip the sampler can draw only if the camera choice is fixed: say so at start.
        for source in dataset.datasets if self.part == AGGREGATOR else ():
            for count in capped_range(views, source.num_cameras):
                require_fixed_cameras(source, count)

    def __getitem__(self, request: ClipRequest) -> Dict[str, Any]:
        sample = self.dataset[request]
        source = self.dataset.datasets[request.dataset_index]
        T, V, H, W = request.frames, request.views, request.height, request.width
        P = (H // self.patch_size) * (W // self.patch_size)
        paths = sample["image_paths"]
        if self.part == BACKBONE:
            tokens = torch.zeros(T * V, P, self.token_dim, dtype=self.dtype)
            hit = torch.zeros(T * V, dtype=torch.bool)
            for i, path in enumerate(paths):
                cached = self.cache.get(image_id(source.name, source.split, path), H, W)
                if cached is not None and cached.shape == tokens.shape[1:]:
                    tokens[i], hit[i] = cached, True
            return {**sample, "patch_tokens": tokens.view(T, V, P, -1), "patch_tokens_hit": hit.view(T, V)}
        shape = (self.layers, T, V, self.special_tokens + P, self.token_dim)
        cached = self.cache.get(clip_id(source.name, source.split, paths, T, V), H, W)
        found = cached is not None and tuple(cached.shape) == shape
        tokens = cached if found else torch.zeros(shape, dtype=self.dtype)
        return {**sample, "aggregator_tokens": tokens, "aggregator_tokens_hit": torch.full((T, V), found)}


class CacheItem(NamedTuple):
    """One cache entry's source at any size: an image (T = V = 1) or a clip of T frames x V cameras."""

    id: str
    dataset: int  # index in the split's datasets
    scene: int
    frames: Tuple[int, ...]  # frame indices in the scene
    cameras: Tuple[int, ...]


def require_fixed_cameras(dataset: Any, views: int) -> None:
    """A clip cache enumerates clips, so the V cameras of a clip must not be a random subset: V must be
    1 (the reference camera) or every camera of each scene (see dataset.choose_cameras)."""
    counts = sorted({len(scene.cameras) for scene in dataset.scenes})
    if views != 1 and counts != [views]:
        raise FeatureCacheError(
            f"an aggregator feature cache holds one entry per clip, but data.train.views draws {views} of the "
            f"{'/'.join(map(str, counts))} cameras of '{dataset.name}' scenes, a random subset per clip that cannot "
            f"be enumerated; set data.train.views to [1,1] or to the rig's camera count ([{counts[0]},{counts[0]}]), "
            f"or cache only the backbone (freeze aggregator.patch_embed.* alone)")


def cache_items(part: str, datasets: Sequence[Any], split_cfg: Any) -> List[CacheItem]:
    """Every item of the given ClipDatasets in a fixed order: each image (backbone), or each clip the
    sampler can draw (aggregator)."""
    items = []
    for d, dataset in enumerate(datasets):
        items += _images(d, dataset) if part == BACKBONE else _clips(d, dataset, split_cfg)
    return items


def _images(d: int, dataset: Any) -> List[CacheItem]:
    """Every image of a dataset, by scene, frame and camera."""
    return [CacheItem(image_id(dataset.name, dataset.split, str(scene.image_paths[f, c])), d, s, (f,), (c,))
            for s, scene in enumerate(dataset.scenes) for f in range(scene.num_frames)
            for c in range(len(scene.cameras))]


def _clips(d: int, dataset: Any, split_cfg: Any) -> List[CacheItem]:
    """Every clip the sampler can draw from a dataset: every start frame, for every frame and camera count
    of the split's ranges that the dataset offers (the cameras of a clip must be fixed)."""
    clips = []
    for frames in capped_range(split_cfg.frames, dataset.max_frames):
        for views in capped_range(split_cfg.views, dataset.num_cameras):
            require_fixed_cameras(dataset, views)
            cameras = tuple(range(views))
            for s, (scene, starts) in enumerate(zip(dataset.scenes, dataset.clips_per_scene(frames))):
                for start in range(starts):
                    frame_ids = tuple(start + i * dataset.frame_stride for i in range(frames))
                    paths = [str(scene.image_paths[f, c]) for f in frame_ids for c in cameras]
                    clips.append(CacheItem(clip_id(dataset.name, dataset.split, paths, frames, views), d, s,
                                           frame_ids, cameras))
    return clips

"""The frozen-feature cache on storage: its layout, its manifest, and the reader the data loader uses.

A cache holds, for every training image at every size the sampler can ask for, the output of the
frozen backbone (the model's `aggregator.patch_embed`): patch tokens [P, C] with P = (H/p) x (W/p).
It is written by `dvgt cache build` (dvgt/train/feature_cache.py) to a local folder or S3:

    <uri>/shard-00000.safetensors   tensors named "<dataset>/<split>/<image path>@<H>x<W>"
    <uri>/shard-00000.json          the shard's commit record: size, sha256, fingerprint (written after it)
    <uri>/manifest.json             written last: every shard's size and sha256, the fingerprint, counts

An image goes to shard sha256(image id) mod num_shards, so a reader finds any entry by reading one
shard's header (once per process) and then the entry's bytes with one ranged read. docs/feature-cache.md
describes the format and the rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from dvgt.checkpoint.safetensors_stream import DTYPE_OF
from dvgt.checkpoint.storage import Storage, open_storage
from dvgt.data.dataset import ClipRequest, MixedClipDataset
from dvgt.data.sampler import image_height

FORMAT = "dvgt-feature-cache-v1"
MANIFEST = "manifest.json"


class FeatureCacheError(ValueError):
    """A feature cache that cannot be used: missing, built for other weights or preprocessing, or corrupt."""


def image_id(dataset: str, split: str, image_path: str) -> str:
    """The name of a source image in the cache: dataset label, split and the path in its scene table."""
    return f"{dataset}/{split}/{image_path}"


def entry_key(image: str, height: int, width: int) -> str:
    """The tensor name of an image's tokens at one size (the centre crop-resize to H x W)."""
    return f"{image}@{height}x{width}"


def shard_of(image: str, num_shards: int) -> int:
    return int(hashlib.sha256(image.encode()).hexdigest()[:8], 16) % num_shards


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
        raise FeatureCacheError(f"{storage.uri}/{MANIFEST} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
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


class CachedClipDataset(torch.utils.data.Dataset):
    """Clips with their cached backbone tokens: adds `patch_tokens` [T, V, P, C] (zeros where missing)
    and `patch_tokens_hit` [T, V] (bool) to every sample; the trainer encodes the misses live."""

    def __init__(self, dataset: MixedClipDataset, cache: FeatureCache, patch_size: int) -> None:
        self.dataset, self.cache, self.patch_size = dataset, cache, patch_size
        self.token_dim = int(cache.manifest["token_dim"])
        self.dtype = DTYPE_OF[cache.manifest["dtype"]]

    def __getitem__(self, request: ClipRequest) -> Dict[str, Any]:
        sample = self.dataset[request]
        source = self.dataset.datasets[request.dataset_index]
        T, V, H, W = request.frames, request.views, request.height, request.width
        tokens = torch.zeros(T * V, (H // self.patch_size) * (W // self.patch_size), self.token_dim, dtype=self.dtype)
        hit = torch.zeros(T * V, dtype=torch.bool)
        for i, path in enumerate(sample["image_paths"]):
            cached = self.cache.get(image_id(source.name, source.split, path), H, W)
            if cached is not None and cached.shape == tokens.shape[1:]:
                tokens[i], hit[i] = cached, True
        return {**sample, "patch_tokens": tokens.view(T, V, *tokens.shape[1:]), "patch_tokens_hit": hit.view(T, V)}


def source_images(datasets: Sequence[Any]) -> List[tuple]:
    """(image id, dataset index, scene index, frame, camera) of every image of the given ClipDatasets,
    in a fixed order (dataset, scene, frame, camera)."""
    images = []
    for d, dataset in enumerate(datasets):
        for s, scene in enumerate(dataset.scenes):
            for f in range(scene.num_frames):
                for c in range(len(scene.cameras)):
                    images.append((image_id(dataset.name, dataset.split, str(scene.image_paths[f, c])), d, s, f, c))
    return images

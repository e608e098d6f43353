"""The model side of the frozen-feature cache (docs/feature-cache.md): which part of the model is
cached, the fingerprint that ties a cache to weights and preprocessing, `dvgt cache build` (parallel
over torchrun ranks, resumable, with --verify), and what training does with a cache (checks at start,
live encoding of the misses).

The cached part is the model's `aggregator.patch_embed`, the DINO backbone (DINOv3 ViT-L/16 in DVGT,
DINOv2 ViT-L/14 in VGGT): the first thing every image goes through, image by image, so its output is
a function of one image and can be stored per image. A frozen backbone always runs in eval mode,
with or without a cache (in train mode DINOv3 would randomly rescale its RoPE coordinates).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

import dvgt
from dvgt.checkpoint.safetensors_stream import write_safetensors
from dvgt.checkpoint.storage import Storage, open_storage
from dvgt.data.feature_cache import (FORMAT, MANIFEST, FeatureCache, FeatureCacheError, cache_sizes,
                                     check_fingerprint, commit_name, entry_key, fingerprint_digest, read_manifest,
                                     shard_name, shard_of, shard_problem, source_images, verify_shards)
from dvgt.data.loader import open_split_datasets
from dvgt.models import build_model
from dvgt.models.aggregator import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from dvgt.train import distributed
from dvgt.train.optim import freeze_modules

PREFIX = "aggregator.patch_embed"  # the cached module
PREPROCESSING = "centre crop-resize (PIL bilinear, antialiased), RGB / 255, no pixel augmentation"


# ------------------------------------------------------------------------------------------------
# What is cached, and its fingerprint
# ------------------------------------------------------------------------------------------------


def frozen_prefix(model: nn.Module, frozen: Iterable[str]) -> Optional[nn.Module]:
    """The backbone module if every one of its parameters is frozen, else None."""
    frozen = set(frozen)
    names = [n for n, _ in model.named_parameters() if n.startswith(PREFIX + ".")]
    return model.get_submodule(PREFIX) if names and all(n in frozen for n in names) else None


def require_cacheable(model: nn.Module, frozen: Iterable[str], cfg: Any) -> nn.Module:
    """The frozen backbone, or a clear error: a cache needs the whole backbone frozen and no pixel augmentation."""
    prefix = frozen_prefix(model, frozen)
    if prefix is None:
        trainable = [n for n, p in model.named_parameters() if n.startswith(PREFIX + ".") and n not in set(frozen)]
        raise ValueError(
            f"a feature cache stores the output of {PREFIX} (the DINO backbone), so all of it must be frozen, but "
            f"optim.frozen_module_names={list(cfg.optim.frozen_module_names)} leaves {len(trainable)} of its "
            f"parameters trainable (e.g. {trainable[0]}); set optim.frozen_module_names=[{PREFIX}.*]")
    if cfg.data.train.color_jitter > 0:
        raise ValueError(
            f"data.train.color_jitter={cfg.data.train.color_jitter} changes the pixels of every training image, so "
            f"cached features cannot match them; set data.train.color_jitter=0 to use a feature cache "
            f"(data.feature_cache / dvgt cache build)")
    return prefix


def precision(cfg: Any, device: torch.device) -> str:
    """How the backbone computes: float32, or the trainer's autocast dtype on a GPU."""
    return f"{cfg.optim.amp.amp_dtype}-autocast" if cfg.optim.amp.enabled and device.type == "cuda" else "float32"


def autocast(cfg: Any, device: torch.device):
    enabled = precision(cfg, device) != "float32"
    return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg.optim.amp.amp_dtype), enabled=enabled)


def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's state_dict sorted by key: key, shape, dtype and the raw bytes of each entry."""
    sha = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        sha.update(f"{key}\0{list(tensor.shape)}\0{tensor.dtype}\0".encode())
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def fingerprint(prefix: nn.Module, cfg: Any, device: torch.device) -> Dict[str, Any]:
    """What the cached tokens depend on, part by part (training names the parts that differ)."""
    return {
        "model": f"{cfg.model.name}/{cfg.model.size}",
        "weights": weights_digest(prefix),
        "preprocessing": PREPROCESSING,
        "normalisation": f"ImageNet mean {list(IMAGENET_MEAN)} std {list(IMAGENET_STD)}",
        "patch_size": int(prefix.patch_size),
        "image_width": int(cfg.data.train.img_width),
        "precision": precision(cfg, device),
        "version": dvgt.__version__,
    }


# ------------------------------------------------------------------------------------------------
# Training with a cache
# ------------------------------------------------------------------------------------------------


def open_for_training(cfg: Any, model: nn.Module, frozen: Iterable[str], patch_size: int) -> FeatureCache:
    """The cache of data.feature_cache, after the checks that need no weights: backbone frozen, no pixel
    augmentation, every image size the sampler can draw present in the cache."""
    require_cacheable(model, frozen, cfg)
    cache = FeatureCache(cfg.data.feature_cache, cfg.checkpoint.s3)
    held = {tuple(size) for size in cache.manifest["sizes"]}
    missing = [size for size in cache_sizes(cfg.data.train, patch_size) if size not in held]
    if missing:
        raise FeatureCacheError(
            f"feature cache {cache.uri} holds no tokens for image sizes (H, W) {missing} that data.train "
            f"(img_width, aspect_ratio) can draw; rebuild it with `dvgt cache build` for this config")
    return cache


def check_weights(cache: FeatureCache, model: nn.Module, cfg: Any, device: torch.device) -> None:
    """Refuse a cache built from other weights or preprocessing (call once the weights are final)."""
    check_fingerprint(cache.fingerprint["parts"], fingerprint(model.get_submodule(PREFIX), cfg, device), cache.uri)


def fill_misses(prefix: nn.Module, batch: Dict[str, Any]) -> Dict[str, int]:
    """Encode live, into batch["patch_tokens"], the images the cache did not hold; the counts of both."""
    hit = batch["patch_tokens_hit"]  # [B, T, V]
    misses = int((~hit).sum())
    if misses:
        with torch.no_grad():
            tokens = prefix(normalize_images(batch["images"][~hit]))  # [M, P, C]
        batch["patch_tokens"][~hit] = tokens.to(batch["patch_tokens"].dtype)
    return {"cache_hits": int(hit.sum()), "cache_misses": misses}


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def _committed(storage: Storage, index: int, num_shards: int, digest: str, rehash: bool = True) -> Optional[dict]:
    """The commit record of a shard committed by a build of this fingerprint and shard count, else None;
    with `rehash` the shard itself must be present with the recorded size and sha256."""
    try:
        record = json.loads(storage.read_bytes(commit_name(index)))
        if record.get("fingerprint") != digest or record.get("num_shards") != num_shards:
            return None
        if rehash and shard_problem(storage, shard_name(index), record["size"], record["sha256"]):
            return None
    except FileNotFoundError:
        return None
    return record


def build_cache(cfg: Any, out: str, *, shard_mb: float = 256.0, verify: bool = False, verify_samples: int = 4,
                say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Compute and store the frozen backbone's tokens of every training image at every size the sampler
    can draw. Under torchrun, rank r builds shards r, r + world, ...; rank 0 writes the manifest once all
    exist. Shards already committed for the same fingerprint are kept, so an interrupted build resumes."""
    from dvgt.train.loop import load_pretrained, seed_everything

    info = distributed.init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_mins)
    say = say if info.is_main else (lambda _: None)
    seed_everything(cfg.seed_value)  # the trainer's initial weights, then its pretrained ones
    model = build_model(cfg.model).to(info.device)
    load_pretrained(model, cfg, say)
    prefix = require_cacheable(model, freeze_modules(model, cfg.optim.frozen_module_names), cfg).eval()
    if not info.is_main:
        distributed.barrier()  # rank 0 first: it generates a synthetic dataset if one is missing
    datasets = open_split_datasets(cfg.data.train).datasets
    if info.is_main:
        distributed.barrier()
    labels = [(d.name, d.split) for d in datasets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"data.train.datasets has entries with the same name and split {labels}; the cache names "
                         f"images by dataset name, split and path, so give each entry its own name")
    images = source_images(datasets)
    sizes = cache_sizes(cfg.data.train, prefix.patch_size)
    parts = fingerprint(prefix, cfg, info.device)
    digest = fingerprint_digest(parts)
    storage = open_storage(out, cfg.checkpoint.s3)
    if MANIFEST in storage.list(MANIFEST):
        check_fingerprint(read_manifest(storage)["fingerprint"]["parts"], parts, storage.uri)

    token_dim = int(prefix.norm.normalized_shape[0])
    entry_bytes = sum((h // prefix.patch_size) * (w // prefix.patch_size) for h, w in sizes) * token_dim * 4
    num_shards = max(1, math.ceil(len(images) * entry_bytes / (shard_mb * 2**20)))
    members = defaultdict(list)
    for image in images:
        members[shard_of(image[0], num_shards)].append(image)

    built, kept = [], []
    for index in range(info.rank, num_shards, info.world_size):
        if _committed(storage, index, num_shards, digest):
            kept.append(index)
            continue
        tensors = encode_images(prefix, datasets, members[index], sizes, cfg, info.device, cfg.max_img_per_gpu)
        with storage.open_write(shard_name(index)) as writer:
            write_safetensors(tensors, writer, metadata={"fingerprint": digest})
        record = {"index": index, "num_shards": num_shards, "fingerprint": digest, "size": writer.size,
                  "sha256": writer.digests["sha256"], "images": len(members[index]), "entries": len(tensors)}
        storage.write_bytes(commit_name(index), json.dumps(record).encode())
        built.append(index)
        say(f"shard {index + 1}/{num_shards}: {len(tensors)} entries, {writer.size / 2**20:.1f} MiB")
    distributed.barrier()

    result = {"uri": storage.uri, "built": built, "kept": kept, "num_shards": num_shards, "images": len(images)}
    if info.is_main:
        records = [_committed(storage, i, num_shards, digest, rehash=False) for i in range(num_shards)]
        absent = [shard_name(i) for i, r in enumerate(records) if r is None]
        if absent:
            raise FeatureCacheError(f"feature cache {storage.uri}: shards {absent} are missing or corrupt after the "
                                    f"build; re-run the same `dvgt cache build` to finish them")
        manifest = {
            "format": FORMAT, "fingerprint": {"sha256": digest, "parts": parts}, "num_shards": num_shards,
            "shard_rule": "sha256(image id) mod num_shards", "images": len(images),
            "entries": sum(r["entries"] for r in records), "sizes": [list(s) for s in sizes],
            "token_dim": token_dim, "dtype": "F32",
            "datasets": [{"name": d.name, "split": d.split, "root": str(d.root)} for d in datasets],
            "shards": [{"name": shard_name(i), "size": r["size"], "sha256": r["sha256"], "images": r["images"],
                        "entries": r["entries"]} for i, r in enumerate(records)],
        }
        storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        say(f"feature cache {storage.uri}: {len(images)} images x {len(sizes)} sizes in {num_shards} shards "
            f"({len(built)} built by this process, {len(kept)} kept)")
        if verify:
            result["verified"] = verify_cache(storage, prefix, datasets, cfg, info.device, verify_samples)
            say(f"verified: {result['verified']}")
    distributed.barrier()
    return result


def encode_images(prefix: nn.Module, datasets: List[Any], images: List[tuple], sizes: List[tuple], cfg: Any,
                  device: torch.device, batch_size: int) -> Dict[str, torch.Tensor]:
    """{entry key: tokens [P, C] float32} of the images at every size, `batch_size` images per forward."""
    tensors = {}
    for height, width in sizes:
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start:start + batch_size]
            pixels = np.stack([datasets[d].load_image(s, f, c, height, width) for _, d, s, f, c in chunk])
            pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)  # [n, 3, H, W]
            with torch.inference_mode(), autocast(cfg, device):
                tokens = prefix(normalize_images(pixels)).float().cpu()  # [n, P, C]
            for (image, *_), token in zip(chunk, tokens):
                tensors[entry_key(image, height, width)] = token
    return tensors


def verify_cache(storage: Storage, prefix: Optional[nn.Module] = None, datasets: Optional[List[Any]] = None,
                 cfg: Any = None, device: Optional[torch.device] = None, samples: int = 0) -> str:
    """Check every shard's size and sha256 against the manifest and, given the model, recompute `samples`
    entries and compare them (max |diff| <= 1e-4 x max |cached|). A one-line FeatureCacheError names what is wrong."""
    manifest = read_manifest(storage)
    problems = verify_shards(storage, manifest)
    if problems:
        raise FeatureCacheError(f"feature cache {storage.uri}: {'; '.join(problems)}; delete the bad shard(s) and "
                                f"re-run `dvgt cache build` with the same config and --out to rebuild them")
    text = f"{len(manifest['shards'])} shards intact"
    if prefix is None or samples <= 0:
        return text
    cache = FeatureCache(storage.uri, cfg.checkpoint.s3)
    images = source_images(datasets)
    rng = np.random.default_rng(0)
    worst = 0.0
    for i in rng.choice(len(images), size=min(samples, len(images)), replace=False):
        size = tuple(manifest["sizes"][int(rng.integers(len(manifest["sizes"])))])
        live = encode_images(prefix, datasets, [images[i]], [size], cfg, device, 1)
        (key, tokens), = live.items()
        cached = cache.get(images[i][0], *size)
        if cached is None:
            raise FeatureCacheError(f"feature cache {storage.uri} has no entry {key}; rebuild it")
        worst = max(worst, float((cached - tokens).abs().max() / tokens.abs().max().clamp_min(1e-12)))
    if worst > 1e-4:
        raise FeatureCacheError(f"feature cache {storage.uri}: recomputed tokens differ from the cached ones by "
                                f"{worst:.1e} (relative to their max); rebuild the cache")
    return f"{text}; {min(samples, len(images))} entries recomputed, max relative difference {worst:.1e}"

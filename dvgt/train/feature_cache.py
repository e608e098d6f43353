"""The model side of the frozen-feature cache (docs/feature-cache.md): which frozen part of the model is
cached, the fingerprint that ties a cache to weights and preprocessing, `dvgt cache build` (parallel
over torchrun ranks, resumable, with --verify), and what training does with a cache (checks at start,
live computation of the misses).

Two frozen prefixes can be cached (FrozenPart):
- the backbone, `aggregator.patch_embed` (DINOv3 ViT-L/16 in DVGT, DINOv2 ViT-L/14 in VGGT): its output
  is a function of one image, so it is stored per image;
- the whole aggregator (heads-only finetunes): it mixes the views and frames of a clip, so its outputs
  (the layers the heads read) are stored per clip.
A frozen prefix always runs in eval mode, with or without a cache (in train mode DINOv3 would randomly
rescale its RoPE coordinates).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

import dvgt
from dvgt.checkpoint.safetensors_stream import DTYPE_OF, DTYPES, write_safetensors
from dvgt.checkpoint.storage import Storage, open_storage
from dvgt.data.feature_cache import (
    AGGREGATOR,
    BACKBONE,
    FORMAT,
    MANIFEST,
    CacheItem,
    FeatureCache,
    FeatureCacheError,
    cache_items,
    cache_sizes,
    check_fingerprint,
    commit_name,
    dataset_label,
    entry_key,
    fingerprint_digest,
    read_manifest,
    require_fixed_cameras,
    shard_name,
    shard_of,
    shard_problem,
    verify_shards,
)
from dvgt.data.loader import open_datasets, train_sampler
from dvgt.families import build_model, get, load_pretrained, sample_targets
from dvgt.models.aggregator import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from dvgt.train import distributed
from dvgt.train.optim import freeze_modules
from dvgt.train.seeding import seed_everything

KEYS = {BACKBONE: "patch_tokens", AGGREGATOR: "aggregator_tokens"}  # its batch key (and <key>_hit), its model argument
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # dvgt cache build --dtype
# --verify: max |cached - live| / max |live| (bfloat16 keeps 8 mantissa bits)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-3}
PREPROCESSING = (
    "official view preparation: crop about the principal point, resize to cover the target + 4 px "
    "(PIL LANCZOS shrinking, BICUBIC enlarging), strict crop; RGB / 255; no pixel augmentation"
)


# ------------------------------------------------------------------------------------------------
# What is cached, and its fingerprint
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenPart:
    """A frozen prefix of the model and the shape of what a cache stores of it.

    backbone:   images [n, 1, 1, 3, H, W] -> patch tokens [n, P, C]
    aggregator: images [n, T, V, 3, H, W] -> [n, L, T, V, N, D], the outputs of the L aggregator `layers`
                (of `depth`) that the heads read; N = special_tokens + P, D = the heads' input width
    """

    kind: str
    name: str  # its module path in the model
    module: Any  # the backbone or the aggregator (its attributes are read by name)
    token_dim: int
    layers: tuple[int, ...] = ()
    depth: int = 0
    special_tokens: int = 0

    def outputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the cache stores for each of n items, from their images [n, T, V, 3, H, W] in [0, 1]."""
        if self.kind == BACKBONE:
            return self.module(normalize_images(images.flatten(0, 2)))
        n, T, V = images.shape[:3]
        outputs, _ = self.module(images)  # depth x [n, T, V, N, D] (VGGT: [n, T*V, N, D])
        return torch.stack([outputs[layer].reshape(n, T, V, *outputs[layer].shape[-2:]) for layer in self.layers], 1)

    def entry_numel(self, item: CacheItem, height: int, width: int) -> int:
        patches = (height // self.module.patch_size) * (width // self.module.patch_size)
        if self.kind == BACKBONE:
            return patches * self.token_dim
        return len(self.layers) * item.frames * item.views * (self.special_tokens + patches) * self.token_dim

    def manifest_fields(self) -> dict[str, Any]:
        fields = {"part": self.kind, "module": self.name, "token_dim": self.token_dim}
        if self.kind == AGGREGATOR:
            fields.update(layers=list(self.layers), depth=self.depth, special_tokens=self.special_tokens)
        return fields


def frozen_kinds(model: nn.Module, frozen: Iterable[str], parts: Mapping[str, str]) -> list[str]:
    """The cacheable parts (the family's cacheable_parts: backbone, aggregator) whose parameters are all
    frozen, smallest first."""
    frozen = set(frozen)
    kinds = []
    for kind, name in parts.items():
        names = [n for n, _ in model.named_parameters() if n.startswith(name + ".")]
        if names and all(n in frozen for n in names):
            kinds.append(kind)
    return kinds


def frozen_part(model: Any, kind: str, parts: Mapping[str, str]) -> FrozenPart:
    """The part `kind` of `model` (a DVGT or VGGT model: its point head's layers are read by name)."""
    if kind == BACKBONE:
        backbone: Any = model.get_submodule(parts[BACKBONE])
        return FrozenPart(kind, parts[BACKBONE], backbone, int(backbone.norm.normalized_shape[0]))
    aggregator: Any = model.get_submodule(parts[AGGREGATOR])
    layers = tuple(sorted({*model.point_head.intermediate_layer_idx, aggregator.depth - 1}))  # what the heads read
    return FrozenPart(
        kind,
        parts[AGGREGATOR],
        aggregator,
        int(model.point_head.norm.normalized_shape[0]),
        layers,
        aggregator.depth,
        aggregator.patch_start_idx,
    )


def largest_frozen_part(model: nn.Module, frozen: Iterable[str], parts: Mapping[str, str]) -> FrozenPart | None:
    """The largest frozen prefix (the aggregator, else the backbone), or None: it runs in eval mode."""
    kinds = frozen_kinds(model, frozen, parts)
    return frozen_part(model, kinds[-1], parts) if kinds else None


def require_cacheable(
    model: nn.Module, frozen: Iterable[str], cfg: Any, parts: Mapping[str, str], kind: str | None = None
) -> FrozenPart:
    """The frozen part a cache holds (`kind`, or the largest frozen one of the family's cacheable `parts`), or a
    clear error: the part must be wholly frozen, the config must not change pixels, and a clip cache needs
    the cameras of a clip fixed."""
    if not parts:
        raise ValueError(f"model '{cfg.model.name}' declares no cacheable part: it cannot use a feature cache")
    frozen = set(frozen)
    kinds = frozen_kinds(model, frozen, parts)
    wanted = kind or (kinds[-1] if kinds else BACKBONE)
    if wanted not in kinds:
        name = parts[wanted]
        trainable = [n for n, _ in model.named_parameters() if n.startswith(name + ".") and n not in frozen]
        raise ValueError(
            f"a feature cache of the {wanted} stores the output of {name}, so all of it must be frozen, but "
            f"optim.frozen_module_names={list(cfg.optim.frozen_module_names)} leaves {len(trainable)} of its "
            f"parameters trainable (e.g. {trainable[0]}); set optim.frozen_module_names=[{name}.*] (a cache of the "
            f"backbone alone needs [{parts[BACKBONE]}.*], of the whole aggregator [{parts[AGGREGATOR]}.*])"
        )
    train = cfg.data.train
    # each pixel augmentation's setting that turns it off, and whether it is on
    fixes = {
        "aug_pixel_aspect_range=null": train.aug_pixel_aspect_range is not None,
        "random_resize=false": train.random_resize,
        "color_jitter.enabled=false": train.color_jitter.enabled,
    }
    augmenting = [f"data.train.{fix}" for fix, on in fixes.items() if on]
    if augmenting:
        raise ValueError(
            f"pixel augmentation is on in data.train ({', '.join(a.split('=')[0] for a in augmenting)}), so cached "
            f"features cannot match the training images; to use a feature cache (data.feature_cache / dvgt cache "
            f"build) set {' '.join(augmenting)}"
        )
    if wanted == AGGREGATOR:
        require_fixed_cameras(train)
    return frozen_part(model, wanted, parts)


def precision(cfg: Any, device: torch.device) -> str:
    """How the frozen part computes: float32, or the trainer's autocast dtype on a GPU."""
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


def fingerprint(part: FrozenPart, cfg: Any, device: torch.device) -> dict[str, Any]:
    """What the cached outputs depend on, part by part (training names the parts that differ)."""
    return {
        "model": f"{cfg.model.name}/{cfg.model.size}",
        "part": part.kind + (f" layers {list(part.layers)}" if part.layers else ""),
        "weights": weights_digest(part.module),
        "preprocessing": PREPROCESSING,
        "normalisation": f"ImageNet mean {list(IMAGENET_MEAN)} std {list(IMAGENET_STD)}",
        "patch_size": int(part.module.patch_size),
        "image_width": int(cfg.data.train.img_width),
        "precision": precision(cfg, device),
        "version": dvgt.__version__,
    }


# ------------------------------------------------------------------------------------------------
# Training with a cache
# ------------------------------------------------------------------------------------------------


def open_for_training(cfg: Any, model: nn.Module, frozen: Iterable[str]) -> tuple[FeatureCache, FrozenPart]:
    """The cache of data.feature_cache and the part it holds, after the checks that need no weights: that
    part frozen, no pixel augmentation, fixed cameras for a clip cache (CachedDataset checks the sizes)."""
    cache = FeatureCache(cfg.data.feature_cache, cfg.checkpoint.s3)
    parts = get(cfg.model.name).cacheable_parts
    return cache, require_cacheable(model, frozen, cfg, parts, kind=cache.manifest["part"])


def check_weights(cache: FeatureCache, part: FrozenPart, cfg: Any, device: torch.device) -> None:
    """Refuse a cache built from other weights or preprocessing (call once the weights are final)."""
    check_fingerprint(cache.fingerprint["parts"], fingerprint(part, cfg, device), cache.uri)


def fill_misses(part: FrozenPart, batch: dict[str, Any]) -> dict[str, int]:
    """Compute live, into the batch, what the cache did not hold; the counts of both, in images."""
    key = KEYS[part.kind]
    hit = batch[f"{key}_hit"]  # [B, T, V]
    missing = ~hit if part.kind == BACKBONE else ~hit[:, 0, 0]  # images [B, T, V], or clips [B]
    if missing.any():
        images = batch["images"][missing]  # [M, 3, H, W] or [M, T, V, 3, H, W]
        with torch.no_grad():
            outputs = part.outputs(images[:, None, None] if part.kind == BACKBONE else images)
        batch[key][missing] = outputs.to(batch[key].dtype)
    return {"cache_hits": int(hit.sum()), "cache_misses": int((~hit).sum())}


def model_inputs(part: FrozenPart | None, batch: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments for a batch's cached outputs (none for a batch without them):
    patch_tokens [B, T, V, P, C], or aggregator_tokens, the list by layer the heads read (None elsewhere)."""
    if part is None or KEYS[part.kind] not in batch:
        return {}
    stored = batch[KEYS[part.kind]].float()  # a bfloat16 cache is computed with in float32
    if part.kind == BACKBONE:
        return {"patch_tokens": stored}
    tokens: list[torch.Tensor | None] = [None] * part.depth
    for i, layer in enumerate(part.layers):
        tokens[layer] = stored[:, i]  # [B, T, V, N, D]
    return {"aggregator_tokens": tokens}


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def _committed(storage: Storage, index: int, num_shards: int, digest: str, rehash: bool = True) -> dict | None:
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


def build_cache(
    cfg: Any,
    out: str,
    *,
    part: str | None = None,
    dtype: str = "float32",
    shard_mb: float = 256.0,
    verify: bool = False,
    verify_samples: int = 4,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compute and store the frozen part's outputs for every training item (image or clip) at every size the
    sampler can draw. `part`: "backbone" or "aggregator" (default: the largest frozen prefix of the config);
    `dtype`: how they are stored, float32 (exact) or bfloat16 (half the bytes, ~3e-3 relative rounding).
    Under torchrun, rank r builds shards r, r + world, ...; rank 0 writes the manifest once all exist.
    Shards already committed for the same fingerprint are kept, so an interrupted build resumes."""
    info = distributed.init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_mins)
    say = say if info.is_main else (lambda _: None)
    seed_everything(cfg.seed_value)  # the trainer's initial weights, then its pretrained ones
    # DVGT-2's planning anchors play no part in a cached prefix: not needed (nor made) to build a cache
    model = build_model(OmegaConf.merge(cfg.model, {"anchor_dir": None})).to(info.device)
    load_pretrained(model, cfg, say)
    frozen = freeze_modules(model, cfg.optim.frozen_module_names)
    cached = require_cacheable(model, frozen, cfg, get(cfg.model.name).cacheable_parts, part)
    cached.module.eval()
    if not info.is_main:
        distributed.barrier()  # rank 0 first: it generates a synthetic dataset if one is missing
    datasets = open_datasets(
        cfg.data,
        "train",
        patch_size=cached.module.patch_size,  # the trainer's patch size: the backbone's
        gt_scale_factor=cfg.gt_scale_factor,
        targets=sample_targets(cfg.model, evaluation=False),
    )  # as the trainer opens them
    if info.is_main:
        distributed.barrier()
    labels = [dataset_label(d) for d in datasets]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"data.train.datasets lists the same dataset and split more than once ({labels}); the cache "
            f"names items by dataset, split and file name, so list each parquet once"
        )
    sampler = train_sampler(cfg.data.train, datasets, max_img_per_gpu=cfg.max_img_per_gpu)
    items = cache_items(cached.kind, sampler, cfg.data.train)
    sizes = [cache_sizes(d, cfg.data.train.aspect_ratio) for d in datasets]  # per dataset
    parts = fingerprint(cached, cfg, info.device)
    stored = STORAGE_DTYPES[dtype]
    digest = fingerprint_digest(parts)
    shard_digest = fingerprint_digest({**parts, "dtype": DTYPES[stored]})  # what a shard to keep was built for
    storage = open_storage(out, cfg.checkpoint.s3)
    if MANIFEST in storage.list(MANIFEST):
        existing = read_manifest(storage)
        check_fingerprint(existing["fingerprint"]["parts"], parts, storage.uri)
        if existing["dtype"] != DTYPES[stored]:
            raise FeatureCacheError(
                f"feature cache {storage.uri} holds {existing['dtype']} entries, not {DTYPES[stored]}; "
                f"build with the same --dtype, or choose another --out"
            )

    total_bytes = sum(
        cached.entry_numel(item, h, w) * stored.itemsize for item in items for h, w in sizes[item.dataset]
    )
    num_shards = max(1, math.ceil(total_bytes / (shard_mb * 2**20)))
    unit = "images" if cached.kind == BACKBONE else "clips"
    entries = sum(len(sizes[item.dataset]) for item in items)
    per_dataset = ", ".join(f"{'/'.join(label)} {len(held)}" for label, held in zip(labels, sizes))
    say(
        f"feature cache of the {cached.kind} ({cached.name}): {len(items)} {unit}, {entries} entries (sizes: "
        f"{per_dataset}), {total_bytes / 2**30:.2f} GiB in {num_shards} shards"
    )
    members = defaultdict(list)
    for item in items:
        members[shard_of(item.id, num_shards)].append(item)

    built, kept = [], []
    for index in range(info.rank, num_shards, info.world_size):
        if _committed(storage, index, num_shards, shard_digest):
            kept.append(index)
            continue
        tensors = {
            key: tokens.to(stored)
            for d, dataset_sizes in enumerate(sizes)
            for height, width in dataset_sizes
            for key, tokens in encode(
                cached, datasets, [i for i in members[index] if i.dataset == d], height, width, cfg, info.device
            ).items()
        }
        with storage.open_write(shard_name(index), checksum="sha256") as writer:  # the cache's manifest keeps sha256
            write_safetensors(tensors, writer, metadata={"fingerprint": shard_digest})
        record = {
            "index": index,
            "num_shards": num_shards,
            "fingerprint": shard_digest,
            "size": writer.size,
            "sha256": writer.digests["sha256"],
            "items": len(members[index]),
            "entries": len(tensors),
        }
        storage.write_bytes(commit_name(index), json.dumps(record).encode())
        built.append(index)
        say(f"shard {index + 1}/{num_shards}: {len(tensors)} entries, {writer.size / 2**20:.1f} MiB")
    distributed.barrier()

    result = {"uri": storage.uri, "built": built, "kept": kept, "num_shards": num_shards, "items": len(items)}
    if info.is_main:
        records = [_committed(storage, i, num_shards, shard_digest, rehash=False) for i in range(num_shards)]
        absent = [shard_name(i) for i, r in enumerate(records) if r is None]
        committed = [r for r in records if r is not None]
        if absent:
            raise FeatureCacheError(
                f"feature cache {storage.uri}: shards {absent} are missing or corrupt after the "
                f"build; re-run the same `dvgt cache build` to finish them"
            )
        manifest = {
            "format": FORMAT,
            "fingerprint": {"sha256": digest, "parts": parts},
            **cached.manifest_fields(),
            "num_shards": num_shards,
            "shard_rule": "sha256(item id) mod num_shards",
            "items": len(items),
            "entries": sum(r["entries"] for r in committed),
            "dtype": DTYPES[stored],
            "datasets": [
                {"name": name, "split": split, "root": d.spec.location, "sizes": [list(s) for s in held]}
                for (name, split), d, held in zip(labels, datasets, sizes)
            ],
            "shards": [
                {
                    "name": shard_name(i),
                    "size": r["size"],
                    "sha256": r["sha256"],
                    "items": r["items"],
                    "entries": r["entries"],
                }
                for i, r in enumerate(committed)
            ],
        }
        storage.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        say(
            f"feature cache {storage.uri}: {len(items)} items, {manifest['entries']} entries in {num_shards} shards "
            f"({len(built)} built by this process, {len(kept)} kept)"
        )
        if verify:
            result["verified"] = verify_cache(storage, cached, datasets, items, cfg, info.device, verify_samples)
            say(f"verified: {result['verified']}")
    distributed.barrier()
    return result


def encode(
    part: FrozenPart,
    datasets: list[Any],
    items: list[CacheItem],
    height: int,
    width: int,
    cfg: Any,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """{entry key: the part's float32 output} of the items at H x W, max_img_per_gpu images per forward
    (items of one shape together). Each image is the one a training sample holds (SceneDataset.view_image),
    as float in [0, 1] (dvgt.data.augment.to_tensors)."""
    groups = defaultdict(list)
    for item in items:
        groups[item.frames, item.views].append(item)
    tensors = {}
    for (T, V), group in groups.items():
        per_forward = max(1, cfg.max_img_per_gpu // (T * V))
        for start in range(0, len(group), per_forward):
            chunk = group[start : start + per_forward]
            pixels = np.stack(
                [datasets[item.dataset].view_image(row, (height, width)) for item in chunk for row in item.rows]
            )  # uint8 [n * T * V, H, W, 3]
            images = torch.from_numpy(pixels).view(len(chunk), T, V, height, width, 3).permute(0, 1, 2, 5, 3, 4)
            with torch.inference_mode(), autocast(cfg, device):
                outputs = part.outputs((images.float() / 255.0).to(device)).float().cpu()  # [n, ...]
            for item, output in zip(chunk, outputs):
                tensors[entry_key(item.id, height, width)] = output
    return tensors


def verify_cache(
    storage: Storage,
    part: FrozenPart | None = None,
    datasets: list[Any] | None = None,
    items: Sequence[CacheItem] = (),
    cfg: Any = None,
    device: torch.device | None = None,
    samples: int = 0,
) -> str:
    """Check every shard's size and sha256 against the manifest and, given the model's part, the datasets
    and their items, recompute `samples` random entries and compare them (max |diff| <= TOLERANCE x max
    |live|). A one-line FeatureCacheError names what is wrong."""
    manifest = read_manifest(storage)
    problems = verify_shards(storage, manifest)
    if problems:
        raise FeatureCacheError(
            f"feature cache {storage.uri}: {'; '.join(problems)}; delete the bad shard(s) and "
            f"re-run `dvgt cache build` with the same config and --out to rebuild them"
        )
    text = f"{len(manifest['shards'])} shards intact"
    if part is None or datasets is None or device is None or samples <= 0 or not items:
        return text
    cache = FeatureCache(storage.uri, cfg.checkpoint.s3)
    sizes = {(d["name"], d["split"]): d["sizes"] for d in manifest["datasets"]}
    rng = np.random.default_rng(0)
    worst, checked = 0.0, min(samples, len(items))
    for i in rng.choice(len(items), size=checked, replace=False):
        item = items[int(i)]
        held = sizes[dataset_label(datasets[item.dataset])]
        height, width = held[int(rng.integers(len(held)))]
        ((key, live),) = encode(part, datasets, [item], height, width, cfg, device).items()
        cached = cache.get(item.id, height, width)
        if cached is None:
            raise FeatureCacheError(f"feature cache {storage.uri} has no entry {key}; rebuild it")
        worst = max(worst, float((cached.float() - live).abs().max() / live.abs().max().clamp_min(1e-12)))
    if worst > TOLERANCE[DTYPE_OF[manifest["dtype"]]]:
        raise FeatureCacheError(
            f"feature cache {storage.uri}: recomputed entries differ from the cached ones by "
            f"{worst:.1e} (relative to their max); rebuild the cache"
        )
    return f"{text}; {checked} entries recomputed, max relative difference {worst:.1e}"

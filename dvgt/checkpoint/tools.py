"""`dvgt ckpt ls|show|verify|export|prune <uri>`: inspect and manage checkpoints at a location."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import yaml
from tqdm import tqdm

from dvgt.checkpoint.dcp import model_summary, read_full_model
from dvgt.checkpoint.manager import (
    MANIFEST,
    STEP_DIR,
    Checkpoint,
    CheckpointManager,
    CorruptCheckpointError,
    step_dir,
    verify,
)
from dvgt.checkpoint.safetensors_stream import write_safetensors
from dvgt.checkpoint.storage import CHECKSUM, LocalStorage, open_storage, split_uri

CONFIG_SUMMARY = ["exp_name", "model.name", "model.size", "max_epochs", "optim.lr", "max_img_per_gpu", "accum_steps"]


def sizeof(num: float) -> str:
    return tqdm.format_sizeof(num, "B", 1024)


def locate(uri: str) -> tuple[CheckpointManager, int | None]:
    """A location, or one checkpoint in it (`<uri>/step_NNNNNNNN`)."""
    parent, name = split_uri(uri)
    match = STEP_DIR.match(name)
    if match:
        return CheckpointManager(parent, preflight=True), int(match.group(1))
    return CheckpointManager(uri, preflight=True), None


def pick(manager: CheckpointManager, step: int | None) -> Checkpoint:
    if step is None:
        latest = manager.committed_steps()
        if not latest:
            raise FileNotFoundError(f"no committed checkpoint under {manager.storage.uri}")
        step = latest[-1]
    return manager.open(step)


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Any]:
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False, disable=None
    ) as bar:  # no bar off a terminal
        yield bar.update


def ls(uri: str, spill: str | None = None) -> list[str]:
    """Committed checkpoints and where each is: in the store, or (with `spill`, the trainer's
    checkpoint.spill_dir) spilled locally and waiting for the next start to upload it. A checkpoint
    whose manifest cannot be read is listed as UNREADABLE with the reason; the others still show."""
    manager, _ = locate(uri)
    committed = manager.committed_steps()
    lines = [f"{'step':>10}  {'size':>10}  {'age':>10}  objects  where"]
    now = time.time()

    def row(checkpoint: Checkpoint, where: str) -> str:
        age = now - checkpoint.manifest.get("created", now)
        return (
            f"{checkpoint.step:>10}  {sizeof(checkpoint.size):>10}  {age / 3600:>9.1f}h  "
            f"{len(checkpoint.manifest['objects']):>7}  {where}"
        )

    for step in committed:
        try:
            lines.append(row(manager.open(step), manager.storage.child(step_dir(step))))
        except (CorruptCheckpointError, OSError) as error:
            lines.append(f"{step:>10}  UNREADABLE: {' '.join(str(error).split())}")
    if spill:
        manager.spill = LocalStorage(spill)
        lines += [
            row(checkpoint, f"{checkpoint.uri} (spilled: uploaded at the next start)")
            for checkpoint in manager.spilled()
        ]
    if len(lines) == 1:
        lines.append("no committed checkpoints")
    leftovers = sorted(set(manager.step_dirs()) - set(committed))
    if leftovers:
        lines.append(f"uncommitted (no manifest, not checkpoints): steps {leftovers}")
    return lines


def safetensors_summary(checkpoint: Checkpoint) -> str:
    """Tensor and parameter counts from the model file's header (a ranged read, no full download)."""
    key = f"{checkpoint.prefix}/model.safetensors"
    length = int.from_bytes(checkpoint.storage.read_range(key, 0, 8), "little")
    header = json.loads(checkpoint.storage.read_range(key, 8, length))
    header.pop("__metadata__", None)
    params = sum(_numel(info["shape"]) for info in header.values())
    dtypes = sorted({info["dtype"] for info in header.values()})
    return f"{len(header)} tensors, {params:,} values ({', '.join(dtypes)})"


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def show(uri: str) -> list[str]:
    manager, step = locate(uri)
    checkpoint = pick(manager, step)
    m = checkpoint.manifest
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.get("created", 0)))
    lines = [
        f"checkpoint {checkpoint.uri}",
        f"  step {m['step']}, epoch {m.get('epoch')}, world size {m.get('world_size')}, created {created}, "
        f"dvgt {m.get('package_version') or '?'}, {sizeof(checkpoint.size)}",
        f"  model: {model_summary(checkpoint) if checkpoint.sharded else safetensors_summary(checkpoint)}",
        "  objects:",
    ]
    lines += [f"    {o['key']:<28} {sizeof(o['size']):>10}  {CHECKSUM} {o[CHECKSUM][:16]}..." for o in m["objects"]]
    config = yaml.safe_load(bytes(checkpoint.read("config.yaml"))) or {}
    lines.append("  config: " + ", ".join(f"{key}={_get(config, key)}" for key in CONFIG_SUMMARY))
    return lines


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config if config != {} else "?"


def verify_location(uri: str, all_steps: bool = False) -> tuple[list[str], bool]:
    """Check every object's size and xxh3_128 (the newest checkpoint, one given, or --all). Returns (lines, ok)."""
    manager, step = locate(uri)
    steps = manager.committed_steps() if all_steps and step is None else [pick(manager, step).step]
    lines, ok = [], True
    for s in steps:
        try:
            checkpoint = manager.open(s)
        except CorruptCheckpointError as error:
            ok = False
            lines.append(f"step {s}: BAD manifest: {error}")
            continue
        with progress_bar(checkpoint.size, f"verify step {s}") as update:
            report = verify(checkpoint, progress=update)
        ok &= not report.bad
        lines.append(
            f"step {s}: {report.checked} objects, "
            + ("all intact" if not report.bad else f"{len(report.bad)} BAD: " + "; ".join(report.bad))
        )
    return lines, ok


def export(uri: str, out: str) -> list[str]:
    """One `model.safetensors` (verified) plus `config.yaml`, to a local folder or URI."""
    manager, step = locate(uri)
    checkpoint = pick(manager, step)
    target = open_storage(out)
    if checkpoint.sharded:  # FSDP shards: gathered into full tensors here, then written as one file
        tensors = read_full_model(checkpoint)
        writer = target.open_write("model.safetensors")
        with writer:
            write_safetensors(tensors, writer)
        target.write_bytes("config.yaml", bytes(checkpoint.read("config.yaml")))
        return [
            f"exported step {checkpoint.step} of {manager.storage.uri} (sharded over "
            f"{checkpoint.manifest.get('world_size')} ranks): {target.child('model.safetensors')} "
            f"({sizeof(writer.size)}), {target.child('config.yaml')}"
        ]
    entry = checkpoint.entry("model.safetensors")
    with progress_bar(entry["size"], "download") as update:
        data = checkpoint.read("model.safetensors", progress=update)
    with progress_bar(entry["size"], "write") as update:
        with target.open_write("model.safetensors", progress=update) as writer:
            writer.write(data)
    target.write_bytes("config.yaml", bytes(checkpoint.read("config.yaml")))
    return [
        f"exported step {checkpoint.step} of {manager.storage.uri}: {target.child('model.safetensors')} "
        f"({sizeof(entry['size'])}), {target.child('config.yaml')}"
    ]


def prune(uri: str, keep: int, dry_run: bool = False) -> list[str]:
    manager, _ = locate(uri)
    doomed = manager.prune(keep, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    kept = [s for s in manager.committed_steps() if s not in doomed] if dry_run else manager.committed_steps()
    return [
        f"{verb} steps {doomed or 'none'}; committed checkpoints kept: {kept}",
        *(
            []
            if dry_run
            else [
                f"(unfinished uploads and uncommitted leftovers older than the newest commit "
                f"are removed too; {MANIFEST} goes first)"
            ]
        ),
    ]

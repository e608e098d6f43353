"""Reading checkpoints and loading them into a model with a readable report of what matched."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from dvgt.checkpoint.safetensors_stream import read_safetensors

MAX_NAMES = 10  # key names shown per category in a summary


class WeightsMismatchError(ValueError):
    """A checkpoint does not match the model's keys or shapes (the message is the load summary)."""


def _read_local(path: Path, s3: Any) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # Zip-format checkpoints (the torch.save default) are memory-mapped to avoid a second copy in RAM.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _read_remote(uri: str, s3: Any) -> Any:
    """An object-store URI: one parallel ranged download into memory."""
    from dvgt.checkpoint.storage import open_storage, split_uri

    parent, name = split_uri(uri)
    data = open_storage(parent, s3).read(name)
    if name.endswith(".safetensors"):
        return read_safetensors(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path, s3: Any = None) -> dict[str, Tensor]:
    """The state_dict stored at `path` (a local path or an s3:// URI; `s3`: checkpoint.s3 options),
    with any DDP `module.` prefix removed.

    Accepts a torch checkpoint holding a bare state_dict or a dict with key "model" (read with
    `weights_only=True`: tensors and plain containers only, never arbitrary pickled objects), or a
    .safetensors file.
    """
    source: str | Path
    read: Callable[[], Any]
    if str(path).startswith("s3://"):
        source = str(path)
        read = partial(_read_remote, source, s3)
    else:
        source = Path(str(path).removeprefix("file://"))
        if not source.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {source}")
        read = partial(_read_local, source, s3)
    try:
        state = read()
    except OSError:  # missing object, unreachable storage: already one clear line
        raise
    except Exception as error:  # torch and safetensors raise many types for damaged files
        raise ValueError(
            f"{source} is not a valid checkpoint (expected a torch state_dict, a dict with key 'model', "
            f"or a .safetensors file): {type(error).__name__}: {error}"
        ) from error
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    is_state_dict = isinstance(state, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    )
    if not is_state_dict:
        raise ValueError(f"{source} is not a valid checkpoint: it holds no mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _names(keys: Sequence[str]) -> list[str]:
    """Up to MAX_NAMES entries: the keys themselves, or when there are more, their longest prefixes that fit."""
    if len(keys) <= MAX_NAMES:
        return list(keys)
    best = None
    for depth in range(1, max(k.count(".") for k in keys) + 1):
        groups = Counter(".".join(k.split(".")[:depth]) for k in keys)  # in order of first appearance
        if len(groups) > MAX_NAMES:
            break
        best = groups
    if best is None:
        return list(keys[:MAX_NAMES]) + [f"... and {len(keys) - MAX_NAMES} more"]
    return [f"{prefix}.* ({count})" for prefix, count in best.items()]


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys of the file left out on purpose

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        ignored = sum(len(keys) for keys in self.ignored.values())
        lines = [
            f"weights {self.path}: loaded {len(self.loaded)} of {total} model entries; "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatched"
            + (f", {ignored} ignored" if ignored else "")
        ]
        categories = [
            ("missing (in the model, not in the file)", self.missing),
            ("unexpected (in the file, not in the model)", self.unexpected),
        ]
        categories += [(f"ignored ({reason})", keys) for reason, keys in self.ignored.items()]
        for label, keys in categories:
            if keys:
                lines.append(f"  {label}: " + ", ".join(_names(keys)))
        if self.mismatched:
            lines.append("  shape mismatched (file vs model):")
            lines += [f"    {k}: {list(f)} vs {list(m)}" for k, f, m in self.mismatched[:MAX_NAMES]]
            if len(self.mismatched) > MAX_NAMES:
                lines.append(f"    ... and {len(self.mismatched) - MAX_NAMES} more")
        return "\n".join(lines)


def load_weights(model: nn.Module, path: str | Path, strict: bool, s3: Any = None) -> LoadReport:
    """Load the checkpoint at `path` into `model` and report which keys matched.

    strict=True: any missing, unexpected or shape-mismatched key raises `WeightsMismatchError` and
    nothing is loaded. strict=False: every key whose name and shape match is loaded, the rest is
    skipped and listed in the report. Keys of heads the model leaves out (its `disabled_heads`
    prefixes, e.g. VGGT-1B's depth and track heads) are ignored either way, and reported as such.
    """
    state = read_checkpoint(path, s3)
    disabled = tuple(getattr(model, "disabled_heads", ()))
    skipped = [k for k in state if k.startswith(disabled)] if disabled else []
    for key in skipped:
        del state[key]
    return load_state(model, state, strict, str(path), ignored={"head disabled": skipped} if skipped else None)


def load_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    strict: bool,
    source: str,
    ignored: dict[str, list[str]] | None = None,
) -> LoadReport:
    """Load the state_dict `state` (read from `source`) into `model`; see `load_weights`.

    `ignored` lists keys the caller already left out of `state` on purpose, by reason (reported only).
    """
    model_state = model.state_dict()
    report = LoadReport(source, unexpected=[k for k in state if k not in model_state], ignored=dict(ignored or {}))
    for key, target in model_state.items():
        if key not in state:
            report.missing.append(key)
        elif state[key].shape != target.shape:
            report.mismatched.append((key, tuple(state[key].shape), tuple(target.shape)))
        else:
            report.loaded.append(key)
    if strict and not report.ok:
        raise WeightsMismatchError(report.summary())
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def load_dinov3_backbone(model: nn.Module, model_cfg: Any) -> None:
    """model.dino_v3_weight_path (if set) into a DVGT model's backbone, `aggregator.patch_embed`, strictly."""
    path = model_cfg.dino_v3_weight_path
    if not path:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.dino_v3_weight_path: DINOv3 weights file '{path}' does not exist")
    try:
        load_weights(model.get_submodule("aggregator.patch_embed"), path, strict=True)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(
            f"model.dino_v3_weight_path: '{path}' does not match the DINOv3 backbone of model.size="
            f"{model_cfg.size}\n{error}"
        ) from None

"""Saving and finding training checkpoints, with a manifest-last commit protocol.

Layout under the checkpoint location (see docs/checkpoints.md):

    step_00000120/
        model.safetensors      model weights (no DDP prefix)
        optimizer.pt           optimizer state (tensors and plain values; loaded with weights_only=True)
        trainer_state.pt       step, epoch, sampler position, scheduler, grad scaler, counters
        rng/rank_00000.pt      RNG states of every rank
        config.yaml            the resolved training config
        manifest.json          written last: step, objects with size and sha256, package version

A checkpoint folder without its manifest does not exist for any reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dvgt.checkpoint.storage import Storage, open_storage

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint whose manifest or objects cannot be trusted."""


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def tensor_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_tensor_bytes(data: bytes, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptCheckpointError(f"{what} is not a valid checkpoint object ({error.__class__.__name__}: "
                                     f"{str(error).splitlines()[0][:200]})") from None


def rng_state() -> Dict[str, Any]:
    """RNG states as plain values and tensors, so they load with weights_only=True."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A committed checkpoint: its step and manifest, and how to read its objects."""

    storage: Storage
    step: int
    manifest: Dict[str, Any]

    @property
    def prefix(self) -> str:
        return step_dir(self.step)

    def read(self, name: str) -> bytes:
        entry = next((o for o in self.manifest["objects"] if o["key"] == name), None)
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint {self.storage.uri}/{self.prefix} has no object '{name}' "
                                         f"in its manifest")
        data = self.storage.read_bytes(f"{self.prefix}/{name}")
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {self.storage.uri}/{self.prefix}: object '{name}' does not "
                                         f"match its manifest (size or sha256 differ): the file is corrupt; "
                                         f"resume from an older checkpoint or start fresh")
        return data

    def model_state(self) -> Dict[str, torch.Tensor]:
        try:
            return load_safetensors(self.read("model.safetensors"))
        except CorruptCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001
            raise CorruptCheckpointError(f"{self.storage.uri}/{self.prefix}/model.safetensors is unreadable: "
                                         f"{error}") from None

    def load(self, name: str) -> Any:
        return load_tensor_bytes(self.read(name), f"{self.storage.uri}/{self.prefix}/{name}")

    def rng(self, rank: int) -> Optional[Dict[str, Any]]:
        name = f"rng/rank_{rank:05d}.pt"
        if not any(o["key"] == name for o in self.manifest["objects"]):
            return None
        return self.load(name)


class CheckpointManager:
    """Writes checkpoints (rank 0 writes model and optimizer, every rank its RNG state) and finds them."""

    def __init__(self, uri: str, rank: int = 0, world_size: int = 1, keep_last: int = 0,
                 package_version: str = "") -> None:
        self.storage = open_storage(uri)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.package_version = package_version

    # -- reading --------------------------------------------------------------------------------
    def committed_steps(self) -> List[int]:
        steps = set()
        for key in self.storage.list(""):
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and STEP_DIR.match(parts[0]):
                steps.add(int(STEP_DIR.match(parts[0]).group(1)))
        return sorted(steps)

    def open(self, step: int) -> Checkpoint:
        prefix = step_dir(step)
        try:
            manifest = json.loads(self.storage.read_bytes(f"{prefix}/{MANIFEST}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no committed checkpoint at {self.storage.uri}/{prefix} "
                                    f"(its manifest.json is missing)") from None
        except json.JSONDecodeError as error:
            raise CorruptCheckpointError(f"{self.storage.uri}/{prefix}/{MANIFEST} is not valid JSON ({error})") from None
        if manifest.get("step") != step or not isinstance(manifest.get("objects"), list):
            raise CorruptCheckpointError(f"{self.storage.uri}/{prefix}/{MANIFEST} does not describe step {step}")
        return Checkpoint(self.storage, step, manifest)

    def latest(self) -> Optional[Checkpoint]:
        steps = self.committed_steps()
        return self.open(steps[-1]) if steps else None

    # -- writing --------------------------------------------------------------------------------
    def _put(self, prefix: str, name: str, data: bytes) -> Dict[str, Any]:
        self.storage.write_bytes(f"{prefix}/{name}", data)
        return {"key": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def save(self, step: int, *, model_state: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
             trainer_state: Dict[str, Any], config_yaml: str, epoch: int) -> None:
        """Collective under DDP: call on every rank. Returns once the checkpoint is committed."""
        prefix = step_dir(step)
        objects = [self._put(prefix, f"rng/rank_{self.rank:05d}.pt", tensor_bytes(rng_state()))]
        if self.rank == 0:
            state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
            objects.append(self._put(prefix, "model.safetensors", save_safetensors(state)))
            objects.append(self._put(prefix, "optimizer.pt", tensor_bytes(optimizer_state)))
            objects.append(self._put(prefix, "trainer_state.pt", tensor_bytes(trainer_state)))
            objects.append(self._put(prefix, "config.yaml", config_yaml.encode()))
        if dist.is_initialized():
            gathered: List[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, objects)
            objects = [o for rank_objects in gathered for o in rank_objects]
        if self.rank == 0:
            manifest = {"step": step, "epoch": epoch, "created": time.time(), "world_size": self.world_size,
                        "package_version": self.package_version, "objects": sorted(objects, key=lambda o: o["key"])}
            self.storage.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            self._apply_retention()
        if dist.is_initialized():
            dist.barrier()

    def _apply_retention(self) -> None:
        """Keep the newest K committed checkpoints; never touch anything newer than the newest commit."""
        steps = self.committed_steps()
        if self.keep_last <= 0 or len(steps) <= self.keep_last:
            return
        for step in steps[:-self.keep_last]:
            self.storage.delete_prefix(step_dir(step))

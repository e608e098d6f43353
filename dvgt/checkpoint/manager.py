"""Saving and finding training checkpoints: async saves, a manifest-last commit, retention.

Layout under the checkpoint location (see docs/checkpoints.md):

    step_00000120/
        model.safetensors      model weights (no DDP prefix)
        optimizer.safetensors  optimizer state (its tensors, and its structure in the metadata)
        trainer_state.safetensors  step, epoch, sampler position, grad scaler, counters
        rng/rank_00000.safetensors RNG states of every rank
        config.yaml            the resolved training config
        manifest.json          written last: step, objects with size, sha256 and xxh3_128, package version

Every object but config.yaml is safetensors (safetensors_stream.write_state for the nested ones), so
resuming unpickles nothing and the tensors are views of the downloaded bytes.

A checkpoint folder without its manifest does not exist for any reader.

Saving: every rank hands its RNG state to rank 0 (a small collective, on the calling thread); rank 0
copies model and optimizer state off the device into reused host buffers (the only time the
training loop is blocked), then a background thread streams the objects to storage and commits the
manifest. At most one save is in flight; a new request waits for it or is skipped (async_mode).
"""

from __future__ import annotations

import io
import json
import random
import re
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from dvgt.checkpoint.safetensors_stream import read_safetensors, read_state, write_safetensors, write_state
from dvgt.checkpoint.storage import Digest, Storage, StorageError, open_storage

MANIFEST = "manifest.json"
SHARDED_FORMAT = "dcp"  # manifest "format" of FSDP checkpoints (dvgt/checkpoint/dcp.py); absent for DDP's
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint whose manifest or objects cannot be trusted."""


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}.safetensors"


def rng_state() -> Dict[str, Any]:
    """RNG states as plain values and tensors (what write_state stores)."""
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


class HostStaging:
    """Copies a state tree (nested dicts/lists of tensors and plain values) off the device into host
    buffers that are reused from one save to the next (page-locked when the source is on a GPU, so
    the copies run at full bus speed). Safe because at most one save reads the buffers at a time."""

    def __init__(self) -> None:
        self._buffers: Dict[str, torch.Tensor] = {}

    def copy(self, tree: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # memory-bound: one thread copies at full speed; more fight the upload threads
        try:
            staged = self._copy(tree, "")
        finally:
            torch.set_num_threads(threads)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged

    def _copy(self, tree: Any, path: str) -> Any:
        if torch.is_tensor(tree):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != tree.shape or buffer.dtype != tree.dtype:
                buffer = torch.empty(tree.shape, dtype=tree.dtype, pin_memory=tree.is_cuda)
                self._buffers[path] = buffer
            buffer.copy_(tree.detach(), non_blocking=tree.is_cuda)
            return buffer
        if isinstance(tree, dict):
            return {k: self._copy(v, f"{path}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._copy(v, f"{path}/{i}") for i, v in enumerate(tree))
        return tree


@dataclass
class CheckpointEvent:
    """One save request's outcome (also written to the run log as a record of kind "checkpoint")."""

    step: int
    outcome: str  # ok | failed | skipped
    blocked_s: float  # the training loop was blocked this long (device copy; waiting for the previous save)
    upload_s: float = 0.0  # serialisation, upload and commit in the background
    bytes: int = 0  # bytes written (all objects of the step)
    error: str = ""  # why it failed


@dataclass
class CheckpointStats:
    """Running totals on the saving rank, for metrics."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    last_committed_step: int = -1
    last_event: Optional[CheckpointEvent] = None
    in_flight: bool = False


@dataclass
class Checkpoint:
    """A committed checkpoint: its step and manifest, and how to read its objects (verified)."""

    storage: Storage
    step: int
    manifest: Dict[str, Any]

    @property
    def prefix(self) -> str:
        return step_dir(self.step)

    @property
    def uri(self) -> str:
        return self.storage.child(self.prefix)

    @property
    def size(self) -> int:
        return sum(o["size"] for o in self.manifest["objects"])

    @property
    def sharded(self) -> bool:
        """Written under FSDP: model and optimizer are torch.distributed.checkpoint shards (dcp.py)."""
        return self.manifest.get("format") == SHARDED_FORMAT

    def entry(self, name: str) -> Dict[str, Any]:
        entry = next((o for o in self.manifest["objects"] if o["key"] == name), None)
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint {self.uri} has no object '{name}' in its manifest")
        return entry

    def read(self, name: str, progress: Optional[Callable[[int], None]] = None, sha256: bool = False) -> bytearray:
        """The object's bytes, checked against the manifest's size and xxh3_128 (and sha256 if asked:
        `dvgt ckpt verify` does; see storage.Digest for why a resume checks xxh3_128 only)."""
        entry = self.entry(name)
        digest = Digest(sha256=sha256)
        try:
            data = self.storage.read(f"{self.prefix}/{name}", progress=progress, hasher=digest)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: object '{name}' is missing") from None
        if len(data) != entry["size"] or any(entry.get(kind) != value for kind, value in digest.hexdigests().items()):
            raise CorruptCheckpointError(f"checkpoint {self.uri}: object '{name}' does not match its manifest "
                                         f"(size or checksum differ): the file is corrupt; resume from an older "
                                         f"checkpoint or start fresh")
        return data

    def model_state(self) -> Dict[str, torch.Tensor]:
        """The model's tensors (views of the verified bytes)."""
        return self._parse("model.safetensors", read_safetensors)

    def state(self, name: str) -> Any:
        """A nested state object (write_state) with its tensors."""
        return self._parse(name, read_state)

    def _parse(self, name: str, parse: Callable[[bytearray], Any]) -> Any:
        data = self.read(name)
        try:
            return parse(data)
        except ValueError as error:
            raise CorruptCheckpointError(f"{self.uri}/{name} is unreadable: {error}") from None

    def rng(self, rank: int) -> Optional[Dict[str, Any]]:
        name = rng_key(rank)
        if not any(o["key"] == name for o in self.manifest["objects"]):
            return None
        return self.state(name)

    def load_all(self, rank: int) -> Dict[str, Any]:
        """Everything a resume needs, every object verified before any of it is used."""
        if self.sharded:  # model and optimizer shards are read (and verified) by dcp.restore
            return {"trainer_state": self.state("trainer_state.safetensors"), "rng": self.rng(rank)}
        return {"model": self.model_state(), "optimizer": self.state("optimizer.safetensors"),
                "trainer_state": self.state("trainer_state.safetensors"), "rng": self.rng(rank)}


class CheckpointManager:
    """Writes checkpoints (rank 0 writes every object) and finds them."""

    def __init__(self, uri: str, rank: int = 0, world_size: int = 1, keep_last: int = 0, package_version: str = "",
                 async_mode: str = "off", s3: Any = None, preflight: bool = False) -> None:
        self.storage = open_storage(uri, s3)
        if preflight:
            self.storage.preflight(write=rank == 0)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.package_version = package_version
        self.async_mode = async_mode
        self.stats = CheckpointStats()
        self.listeners: List[Callable[[CheckpointEvent], None]] = []  # called on the thread that finished the save
        self._staging = HostStaging()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------------
    def step_dirs(self) -> Dict[int, List[str]]:
        """Every step folder with anything in it (committed or not): step -> keys."""
        steps: Dict[int, List[str]] = {}
        for key in self.storage.list("") + self.storage.unfinished(""):
            match = STEP_DIR.match(key.split("/")[0])
            if match:
                steps.setdefault(int(match.group(1)), []).append(key)
        return steps

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
            manifest = json.loads(self.storage.read(f"{prefix}/{MANIFEST}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no committed checkpoint at {self.storage.child(prefix)} "
                                    f"(its manifest.json is missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(f"{self.storage.child(prefix)}/{MANIFEST} is not valid JSON ({error})") from None
        if manifest.get("step") != step or not isinstance(manifest.get("objects"), list):
            raise CorruptCheckpointError(f"{self.storage.child(prefix)}/{MANIFEST} does not describe step {step}")
        return Checkpoint(self.storage, step, manifest)

    def latest(self) -> Optional[Checkpoint]:
        steps = self.committed_steps()
        return self.open(steps[-1]) if steps else None

    def load_newest(self, rank: int, warn: Callable[[str], None], before: Optional[int] = None) -> Optional[tuple]:
        """(checkpoint, state) of the newest committed checkpoint (older than step `before`, if given)
        whose objects all verify; a corrupt one is skipped with a warning. None when there is no
        committed checkpoint at all."""
        steps = [step for step in self.committed_steps() if before is None or step < before]
        errors = []
        for step in reversed(steps):
            try:
                checkpoint = self.open(step)
                return checkpoint, checkpoint.load_all(rank)
            except CorruptCheckpointError as error:
                errors.append(str(error))
                if step != steps[0]:
                    warn(f"warning: {error}; falling back to the previous committed checkpoint")
        if errors:
            raise CorruptCheckpointError(f"no intact checkpoint under {self.storage.uri}: {errors[-1]} (and "
                                         f"{len(errors) - 1} newer corrupt); delete them or set checkpoint.resume=never")
        return None

    # -- writing --------------------------------------------------------------------------------
    def save(self, step: int, *, model_state: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
             trainer_state: Dict[str, Any], config_yaml: str, epoch: int, final: bool = False,
             timeout: Optional[float] = None) -> Optional[CheckpointEvent]:
        """Collective under DDP: call on every rank. Returns once the state is off the device; the
        upload continues in the background (async_mode wait/skip) or is waited for (off, final).

        final=True: wait for any save in flight, then commit `step` unless it already is, and wait
        (at most `timeout` seconds); a failure raises StorageError. Returns the event on rank 0.
        """
        buffer = io.BytesIO()
        write_state(rng_state(), buffer)  # serialised here: all_gather_object mangles tensors inside objects
        rngs: List[bytes] = [buffer.getvalue()]
        if dist.is_initialized():
            rngs = [b""] * self.world_size
            dist.all_gather_object(rngs, buffer.getvalue())
        if self.rank != 0:
            return None
        started = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.in_flight():
            if self.async_mode == "skip" and not final:
                return self._emit(CheckpointEvent(step, "skipped", time.perf_counter() - started))
            self.wait(timeout)
        if final and self.stats.last_committed_step == step:
            return self.stats.last_event
        self._require_idle(step, timeout)
        staged = self._staging.copy({"model": model_state, "optimizer": optimizer_state})
        staged["trainer_state"] = trainer_state
        blocked = time.perf_counter() - started
        return self._start(step, partial(self._write, step, epoch, staged, rngs, config_yaml, blocked), final,
                           deadline, timeout)

    def _require_idle(self, step: int, timeout: Optional[float]) -> None:
        if self.in_flight():  # a final save whose budget ran out waiting for the previous one
            raise StorageError(f"the final checkpoint (step {step}) was not started: the previous save did not "
                               f"finish within {timeout:.0f} s")

    def _start(self, step: int, write: Callable[[], None], final: bool, deadline: Optional[float],
               timeout: Optional[float]) -> Optional[CheckpointEvent]:
        """Run `write` on the save thread. A final save (or any, with async_mode=off) is waited for
        until `deadline` and returns its event; one that does not commit raises StorageError."""
        with self._lock:
            self.stats.in_flight = True
        self._thread = threading.Thread(target=write, name=f"dvgt-checkpoint-{step}", daemon=True)
        self._thread.start()
        if not (final or self.async_mode == "off"):
            return None
        if not self.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise StorageError(f"the final checkpoint (step {step}) was not committed within {timeout:.0f} s; "
                               f"the newest committed is step {self.stats.last_committed_step}")
        event = self.stats.last_event
        if final and event.outcome != "ok":
            raise StorageError(f"the final checkpoint (step {step}) could not be committed: {event.error}")
        return event

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the save in flight; False if it is still running after `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.in_flight()

    def _write(self, step: int, epoch: int, staged: Dict[str, Any], rngs: List[bytes], config_yaml: str,
               blocked: float) -> None:
        started = time.perf_counter()
        prefix = step_dir(step)
        objects: List[Dict[str, Any]] = []

        def put(name: str, write: Callable[[Any], Any]) -> None:
            objects.append(self._put(prefix, name, write))

        try:
            # The two big objects stream side by side, so the upload never drains between them.
            with ThreadPoolExecutor(2, thread_name_prefix="dvgt-serialise") as pool:
                for done in [pool.submit(put, "model.safetensors", lambda w: write_safetensors(staged["model"], w)),
                             pool.submit(put, "optimizer.safetensors", lambda w: write_state(staged["optimizer"], w))]:
                    done.result()
            put("trainer_state.safetensors", lambda w: write_state(staged["trainer_state"], w))
            for rank, rng in enumerate(rngs):
                put(rng_key(rank), lambda w, rng=rng: w.write(rng))
            put("config.yaml", lambda w: w.write(config_yaml.encode()))
            self._write_manifest(prefix, step, epoch, objects)
            with self._lock:
                self.stats.last_committed_step = step
            self.prune(self.keep_last)
            event = CheckpointEvent(step, "ok", blocked, time.perf_counter() - started, sum(o["size"] for o in objects))
        except Exception as error:  # noqa: BLE001 - a failed save never commits; training goes on
            message = " ".join(str(error).split()) or traceback.format_exc(limit=1)
            event = CheckpointEvent(step, "failed", blocked, time.perf_counter() - started,
                                    sum(o["size"] for o in objects), f"{type(error).__name__}: {message}")
        self._emit(event)

    def _put(self, prefix: str, name: str, write: Callable[[Any], Any]) -> Dict[str, Any]:
        """Stream one object of a step through `write(writer)`; returns its manifest entry."""
        writer = self.storage.open_write(f"{prefix}/{name}")
        try:
            with writer:
                write(writer)
        except Exception as error:  # a serialiser may report a failed write as something else
            raise (writer.error or error) from None
        return {"key": name, "size": writer.size, **writer.digests}

    def _write_manifest(self, prefix: str, step: int, epoch: int, objects: List[Dict[str, Any]], **fields: Any) -> None:
        """The commit: written last, it makes the step's objects a checkpoint."""
        manifest = {"step": step, "epoch": epoch, "created": time.time(), "world_size": self.world_size, **fields,
                    "package_version": self.package_version, "objects": sorted(objects, key=lambda o: o["key"])}
        self.storage.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

    def _emit(self, event: CheckpointEvent) -> CheckpointEvent:
        with self._lock:
            setattr(self.stats, event.outcome, getattr(self.stats, event.outcome) + 1)
            self.stats.last_event = event
            if event.outcome != "skipped":  # a skipped request leaves the save in flight running
                self.stats.in_flight = False
        for listener in self.listeners:
            listener(event)
        return event

    def prune(self, keep: int, dry_run: bool = False) -> List[int]:
        """Keep the newest `keep` committed checkpoints (0: all) and delete uncommitted leftovers older
        than the newest commit; nothing newer than the newest committed checkpoint is touched (a save
        may be writing there). A committed checkpoint loses its manifest first, so no reader ever sees
        a half-deleted one. Returns the deleted steps."""
        committed = self.committed_steps()
        if not committed:
            return []
        kept = set(committed[-keep:] if keep > 0 else committed)
        doomed = [step for step in sorted(self.step_dirs()) if step < committed[-1] and step not in kept]
        if not dry_run:
            for step in doomed:
                if step in committed:
                    self.storage.delete_prefix(f"{step_dir(step)}/{MANIFEST}")
                self.storage.delete_prefix(step_dir(step))
        return doomed


@dataclass
class VerifyReport:
    step: int
    bad: List[str] = field(default_factory=list)  # "key: why"
    checked: int = 0


def verify(checkpoint: Checkpoint, progress: Optional[Callable[[int], None]] = None) -> VerifyReport:
    """Read every object of a committed checkpoint and check its size, sha256 and xxh3_128."""
    report = VerifyReport(checkpoint.step)
    for entry in checkpoint.manifest["objects"]:
        try:
            checkpoint.read(entry["key"], progress=progress, sha256=True)
        except CorruptCheckpointError as error:
            report.bad.append(f"{entry['key']}: {'missing' if 'missing' in str(error) else 'size or checksum differ'}")
        report.checked += 1
    return report

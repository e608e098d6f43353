"""Saving and finding training checkpoints: async saves, a manifest-last commit, retries, a local
spill when the store stays down, retention.

Layout under the checkpoint location (see docs/checkpoints.md):

    step_00000120/
        model.safetensors      model weights (no DDP prefix)
        optimizer.safetensors  optimizer state (its tensors, and its structure in the metadata)
        trainer_state.safetensors  step, epoch, sampler position, grad scaler, counters
        rng/rank_00000.safetensors RNG states of every rank
        config.yaml            the resolved training config
        manifest.json          written last: step, objects with size and xxh3_128, package version

Every object but config.yaml is safetensors (safetensors_stream), so resuming unpickles nothing and
the tensors are views of the downloaded bytes. A checkpoint folder without its manifest does not
exist for any reader; a manifest's object keys are checked (storage.check_key) before any is read.

Saving: every rank hands its RNG state to rank 0 (a small collective, on the calling thread); rank 0
lays model and optimizer out as their files' images in reused host buffers, copying the tensors
there off the device (the only copy, and the only time the training loop is blocked), then a
background thread uploads the images as they lie and commits the manifest. Every object is retried
on a transient storage failure for `retry_budget_s`. At most one save is in flight; a new request
supersedes one that is waiting to retry, and otherwise waits for it or is skipped (async_mode).
A final save that cannot reach the store is written to a local spill folder as well (`spill_dir`),
and `upload_spilled` sends it to the store at the next start, before the run resumes.
"""

from __future__ import annotations

import io
import json
import random
import re
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dvgt.checkpoint.safetensors_stream import (
    read_safetensors,
    read_state,
    safetensors_header,
    state_tensors,
    write_state,
)
from dvgt.checkpoint.storage import (
    CHECKSUM,
    HASHERS,
    InvalidKeyError,
    LocalStorage,
    ObjectSizeError,
    Storage,
    StorageError,
    background_priority,
    check_key,
    open_storage,
    with_retries,
)

T = TypeVar("T")
MANIFEST = "manifest.json"
SHARDED_FORMAT = "dcp"  # manifest "format" of FSDP checkpoints (dvgt/checkpoint/dcp.py); absent for DDP's
STEP_DIR = re.compile(r"^step_(\d{8})$")
SPILL_WRITE_BYTES_PER_S = 200e6  # what a pod's local disk is assumed to write at least, to plan a spill in time


class CorruptCheckpointError(ValueError):
    """A checkpoint whose manifest or objects cannot be trusted."""


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}.safetensors"


def rng_state() -> dict[str, Any]:
    """RNG states as plain values and tensors (what write_state stores)."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple), "numpy's global generator is the legacy MT19937"
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def serialised_state(tree: Any) -> bytes:
    """A small state tree (trainer state, RNG) as the bytes of its safetensors file."""
    buffer = io.BytesIO()
    write_state(tree, buffer)
    return buffer.getvalue()


class HostStaging:
    """Copies state off the device into host buffers that are reused from one save to the next
    (page-locked when the source is on a GPU, so the copies run at full bus speed). Safe because at
    most one save reads the buffers at a time.

    `image` lays a set of tensors out as its safetensors file (header, then every tensor's bytes) in
    one buffer, so the copy off the device is also the serialisation and the upload sends the buffer
    as it lies; `copy` keeps a tree's shape (FSDP's shards, which DCP serialises itself)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, key: str, pinned: bool, shape: Any, dtype: torch.dtype, spare: int = 0) -> torch.Tensor:
        buffer = self._buffers.get(key)
        numel = int(np.prod(shape)) if len(shape) else 1
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(numel + spare, dtype=dtype, pin_memory=pinned)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def image(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> memoryview:
        """The safetensors file of `tensors` in a host buffer; call `synchronize` before reading it."""
        prefix, spans = safetensors_header(tensors, metadata)
        size = spans[-1][2] if spans else len(prefix)
        pinned = any(tensor.is_cuda for tensor in tensors.values())
        # Spare room: the header's JSON (an optimizer's plain values) may grow a little between saves.
        buffer = self._buffer(name, pinned, (size,), torch.uint8, spare=2**16)
        buffer[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        for key, begin, end in spans:
            tensor = tensors[key].detach()
            if end > begin:
                buffer[begin:end].view(tensor.dtype).view(tensor.shape).copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer.numpy().data.cast("B")

    def copy(self, tree: Any, path: str = "") -> Any:
        """The tree with every tensor replaced by its host copy; call `synchronize` before reading them."""
        if torch.is_tensor(tree):
            buffer = self._buffer(path, tree.is_cuda, tuple(tree.shape), tree.dtype)
            buffer.copy_(tree.detach(), non_blocking=tree.is_cuda)
            return buffer
        if isinstance(tree, dict):
            return {k: self.copy(v, f"{path}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.copy(v, f"{path}/{i}") for i, v in enumerate(tree))
        return tree

    @staticmethod
    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def one_thread(fn: Callable[[], Any]) -> Any:
    """Run a memory-bound copy with one torch thread: one copies at full speed, more fight the upload."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@dataclass
class CheckpointEvent:
    """One save request's outcome (also written to the run log as a record of kind "checkpoint")."""

    step: int
    outcome: str  # ok | failed | skipped | spilled (committed to the local spill folder only)
    blocked_s: float  # the training loop was blocked this long (device copy; waiting for the previous save)
    upload_s: float = 0.0  # upload and commit in the background (pruning not included)
    prune_s: float = 0.0  # deleting old checkpoints after the commit
    bytes: int = 0  # bytes written (all objects of the step)
    retries: int = 0  # storage requests tried again after a transient failure
    where: str = ""  # the committed checkpoint's URI (the spill folder's for "spilled")
    error: str = ""  # why it failed or was skipped


@dataclass
class CheckpointStats:
    """Running totals on the saving rank, for metrics."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    spilled: int = 0
    last_committed_step: int = -1
    last_event: CheckpointEvent | None = None
    in_flight: bool = False


@dataclass
class Checkpoint:
    """A committed checkpoint: its step and manifest, and how to read its objects (verified)."""

    storage: Storage
    step: int
    manifest: dict[str, Any]

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

    def entry(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = next((o for o in self.manifest["objects"] if o["key"] == name), None)
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint {self.uri} has no object '{name}' in its manifest")
        return entry

    def read(self, name: str, progress: Callable[[int], None] | None = None) -> bytearray:
        """The object's bytes, checked against the manifest's size and xxh3_128 as they arrive."""
        entry = self.entry(name)
        hasher = HASHERS[CHECKSUM]()
        try:
            data = self.storage.read(f"{self.prefix}/{name}", progress=progress, hasher=hasher, size=entry["size"])
        except FileNotFoundError:
            raise CorruptCheckpointError(f"checkpoint {self.uri}: object '{name}' is missing") from None
        except ObjectSizeError:
            data = None
        if data is None or len(data) != entry["size"] or hasher.hexdigest() != entry[CHECKSUM]:
            raise CorruptCheckpointError(
                f"checkpoint {self.uri}: object '{name}' does not match its manifest "
                f"(size or checksum differ): the file is corrupt; resume from an older "
                f"checkpoint or start fresh"
            )
        return data

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's tensors (views of the verified bytes)."""
        return self._parse("model.safetensors", read_safetensors)

    def state(self, name: str) -> Any:
        """A nested state object (write_state) with its tensors."""
        return self._parse(name, read_state)

    def _parse(self, name: str, parse: Callable[[bytearray], T]) -> T:
        data = self.read(name)
        try:
            return parse(data)
        except ValueError as error:
            raise CorruptCheckpointError(f"{self.uri}/{name} is unreadable: {error}") from None

    def rng(self, rank: int) -> dict[str, Any] | None:
        name = rng_key(rank)
        if not any(o["key"] == name for o in self.manifest["objects"]):
            return None
        state: dict[str, Any] = self.state(name)
        return state

    def load_all(self, rank: int) -> dict[str, Any]:
        """Everything a resume needs, every object verified before any of it is used. The objects
        download side by side (their ranges share the storage's transfer threads), so the transfer
        never drains between them."""
        parts = {"trainer_state": lambda: self.state("trainer_state.safetensors"), "rng": lambda: self.rng(rank)}
        if not self.sharded:  # (sharded: model and optimizer shards are read and verified by dcp.restore)
            parts.update(model=self.model_state, optimizer=lambda: self.state("optimizer.safetensors"))
        with ThreadPoolExecutor(len(parts), thread_name_prefix="dvgt-load") as pool:
            futures = {name: pool.submit(read) for name, read in parts.items()}
            return {name: future.result() for name, future in futures.items()}


def check_manifest(manifest: Any, step: int, where: str) -> dict[str, Any]:
    """The manifest if it describes `step` with well-formed entries whose keys stay inside the
    checkpoint folder; else CorruptCheckpointError naming the first bad entry."""
    if not isinstance(manifest, dict) or manifest.get("step") != step or not isinstance(manifest.get("objects"), list):
        raise CorruptCheckpointError(f"{where}/{MANIFEST} does not describe step {step}")
    for entry in manifest["objects"]:
        key = entry.get("key") if isinstance(entry, dict) else None
        try:
            check_key(key if isinstance(key, str) else "")
        except InvalidKeyError:
            raise CorruptCheckpointError(
                f"{where}/{MANIFEST} lists the object key {key!r}, which is not a path inside "
                f"the checkpoint folder; refusing to read it (the manifest was altered)"
            ) from None
        if not isinstance(entry.get("size"), int) or not isinstance(entry.get(CHECKSUM), str):
            raise CorruptCheckpointError(f"{where}/{MANIFEST}: the entry of '{key}' has no size or {CHECKSUM}")
    return manifest


class CheckpointManager:
    """Writes checkpoints (rank 0 writes every object) and finds them.

    retry_budget_s: how long a save goes on retrying a transient storage failure (a final save:
    until its deadline). spill_dir: a local folder where a final save that cannot reach a remote
    store is committed instead, to be uploaded by `upload_spilled` at the next start (None: no spill).
    """

    def __init__(
        self,
        uri: str,
        rank: int = 0,
        world_size: int = 1,
        keep_last: int = 0,
        package_version: str = "",
        async_mode: str = "off",
        s3: Any = None,
        preflight: bool = False,
        retry_budget_s: float = 0.0,
        spill_dir: str | None = None,
    ) -> None:
        self.storage = open_storage(uri, s3)
        if preflight:
            self.storage.preflight(write=rank == 0)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.package_version = package_version
        self.async_mode = async_mode
        self.retry_budget_s = retry_budget_s
        self.spill = LocalStorage(spill_dir) if spill_dir and self.storage.remote else None
        self.stats = CheckpointStats()
        self.listeners: list[Callable[[CheckpointEvent], None]] = []  # called on the thread that finished the save
        self.say: Callable[[str], None] = lambda message: None  # progress notes (retries), set by the trainer
        self._staging = HostStaging()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._retrying = threading.Event()  # the save in flight failed once and waits to try again
        self._retries = 0  # of the save in flight
        self._cancel = threading.Event()  # asks the save in flight to stop retrying

    # -- reading --------------------------------------------------------------------------------
    def step_dirs(self) -> dict[int, list[str]]:
        """Every step folder with anything in it (committed or not): step -> keys."""
        steps: dict[int, list[str]] = {}
        for key in self.storage.list("") + self.storage.unfinished(""):
            match = STEP_DIR.match(key.split("/")[0])
            if match:
                steps.setdefault(int(match.group(1)), []).append(key)
        return steps

    def committed_steps(self) -> list[int]:
        steps = set()
        for key in self.storage.list(""):
            parts = key.split("/")
            match = STEP_DIR.match(parts[0])
            if len(parts) == 2 and parts[1] == MANIFEST and match:
                steps.add(int(match.group(1)))
        return sorted(steps)

    def open(self, step: int) -> Checkpoint:
        prefix = step_dir(step)
        where = self.storage.child(prefix)
        try:
            manifest = json.loads(self.storage.read(f"{prefix}/{MANIFEST}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no committed checkpoint at {where} (its manifest.json is missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(f"{where}/{MANIFEST} is not valid JSON ({error})") from None
        return Checkpoint(self.storage, step, check_manifest(manifest, step, where))

    def latest(self) -> Checkpoint | None:
        steps = self.committed_steps()
        return self.open(steps[-1]) if steps else None

    def load_newest(
        self, rank: int, warn: Callable[[str], None], before: int | None = None
    ) -> tuple[Checkpoint, dict[str, Any]] | None:
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
            raise CorruptCheckpointError(
                f"no intact checkpoint under {self.storage.uri}: {errors[-1]} (and "
                f"{len(errors) - 1} newer corrupt); delete them or set checkpoint.resume=never"
            )
        return None

    def spilled(self) -> list[Checkpoint]:
        """Checkpoints committed to the spill folder for this location and not yet uploaded."""
        if self.spill is None:
            return []
        spill = CheckpointManager(self.spill.uri)
        found = []
        for step in spill.committed_steps():
            checkpoint = spill.open(step)
            if checkpoint.manifest.get("destination") == self.storage.uri:
                found.append(checkpoint)
        return found

    def upload_spilled(self, say: Callable[[str], None]) -> list[int]:
        """Send the spilled checkpoints of this location to the store (objects first, each verified
        on the way, the manifest last), then delete them locally; one older than the store's newest
        commit is only deleted. Raises StorageError if the store is still unreachable (kept then)."""
        uploaded: list[int] = []
        if self.spill is None:
            return uploaded
        for checkpoint in self.spilled():
            committed = self.committed_steps()
            if committed and committed[-1] >= checkpoint.step:
                say(
                    f"spilled checkpoint {checkpoint.uri} is not newer than the newest committed "
                    f"({self.storage.child(step_dir(committed[-1]))}); deleting it"
                )
            else:
                deadline = time.monotonic() + self.retry_budget_s
                for entry in checkpoint.manifest["objects"]:
                    self._put(self.storage, checkpoint.prefix, entry["key"], checkpoint.read(entry["key"]), deadline)
                manifest = {k: v for k, v in checkpoint.manifest.items() if k != "destination"}
                self._put(self.storage, checkpoint.prefix, MANIFEST, json.dumps(manifest, indent=1).encode(), deadline)
                say(f"uploaded the spilled checkpoint {checkpoint.uri} to {self.storage.child(checkpoint.prefix)}")
                uploaded.append(checkpoint.step)
            self.spill.delete_prefix(checkpoint.prefix)
        return uploaded

    # -- writing --------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
        epoch: int,
        final: bool = False,
        timeout: float | None = None,
    ) -> CheckpointEvent | None:
        """Collective under DDP: call on every rank. Returns once the state is off the device; the
        upload continues in the background (async_mode wait/skip) or is waited for (off, final).

        final=True: wait for any save in flight, then commit `step` unless it already is, retrying
        for `timeout` seconds (default retry_budget_s); with a spill folder, a save that cannot
        reach the store is committed there too (outcome "spilled"); if neither happens, StorageError.
        Returns the event on rank 0.
        """
        buffer = io.BytesIO()
        write_state(rng_state(), buffer)  # serialised here: all_gather_object mangles tensors inside objects
        rngs: list[bytes] = [buffer.getvalue()]
        if dist.is_initialized():
            rngs = [b""] * self.world_size
            dist.all_gather_object(rngs, buffer.getvalue())
        if self.rank != 0:
            return None
        started = time.perf_counter()
        deadline = time.monotonic() + (self.retry_budget_s if timeout is None else timeout)
        if not self._make_room(step, final, deadline):
            return self._emit(
                CheckpointEvent(
                    step, "skipped", time.perf_counter() - started, error="the previous save is still uploading"
                )
            )
        if final and self.stats.last_committed_step == step:
            return self.stats.last_event
        self._require_idle(step, deadline)

        def stage() -> dict[str, Any]:
            objects = {
                "model.safetensors": self._staging.image("model", model_state),
                "optimizer.safetensors": self._staging.image("optimizer", *state_tensors(optimizer_state)),
            }
            self._staging.synchronize()
            return objects

        objects = one_thread(stage)
        objects["trainer_state.safetensors"] = serialised_state(trainer_state)
        objects.update({rng_key(rank): rng for rank, rng in enumerate(rngs)})
        objects["config.yaml"] = config_yaml.encode()
        blocked = time.perf_counter() - started
        return self._start(
            step,
            partial(self._write, step, epoch, objects, blocked, deadline),
            final,
            deadline,
            partial(self._spill_objects, step, epoch, objects),
            sum(len(d) for d in objects.values()),
        )

    def _make_room(self, step: int, final: bool, deadline: float) -> bool:
        """Before a new save: stop a save in flight that waits to retry (the new state supersedes it),
        else wait for it (async_mode wait, off, a final save) or report False (skip)."""
        if not self.in_flight():
            return True
        if self._retrying.is_set():
            self.say(f"checkpoint: the save in flight gives up retrying; step {step} supersedes it")
            self._cancel.set()
        elif self.async_mode == "skip" and not final:
            return False
        self.wait(max(0.0, deadline - time.monotonic()) if final else None)  # a save ends by its own deadline
        return True

    def _require_idle(self, step: int, deadline: float) -> None:
        if self.in_flight():  # a final save whose budget ran out waiting for the previous one
            raise StorageError(
                f"the final checkpoint (step {step}) was not started: the previous save did not finish in time",
                retryable=True,
            )

    def _start(
        self,
        step: int,
        write: Callable[[], None],
        final: bool,
        deadline: float,
        spill: Callable[[], CheckpointEvent] | None = None,
        size: int = 0,
    ) -> CheckpointEvent | None:
        """Run `write` on the save thread. A final save (or any, with async_mode=off) is waited for
        until `deadline` and returns its event: if it has not committed by the time a spill must
        start (or has failed once), the objects are spilled meanwhile; one that neither commits nor
        spills raises StorageError."""
        with self._lock:
            self.stats.in_flight = True
        self._retrying.clear()
        self._cancel.clear()

        def run() -> None:
            background_priority()
            write()

        self._thread = threading.Thread(target=run, name=f"dvgt-checkpoint-{step}", daemon=True)
        self._thread.start()
        if not (final or self.async_mode == "off"):
            return None
        spilled = None
        if final and spill is not None and self.spill is not None:
            spill_by = deadline - 5.0 - size / SPILL_WRITE_BYTES_PER_S
            while self.in_flight() and not self._retrying.is_set() and time.monotonic() < spill_by:
                self._thread.join(0.1)
            last = self.stats.last_event
            if self.in_flight() or last is None or last.outcome != "ok":
                spilled = spill()
        if not self.wait(max(0.0, deadline - time.monotonic())):
            self._cancel.set()
            self.wait(30.0)
        event = self.stats.last_event
        if event is not None and event.step == step and event.outcome == "ok":
            if spilled is not None and self.spill is not None:
                self.spill.delete_prefix(step_dir(step))
            return event
        if spilled is not None:
            return self._emit(spilled)
        if not final:
            return event
        why = event.error if event is not None and event.step == step else "it did not finish in time"
        raise StorageError(
            f"the final checkpoint (step {step}) could not be committed: {why}; the newest committed "
            f"is step {self.stats.last_committed_step}",
            retryable=True,
        )

    def stop_retrying(self) -> None:
        """The save in flight (if any) gives up at its next failure instead of retrying."""
        self._cancel.set()

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the save in flight; False if it is still running after `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.in_flight()

    def _write(self, step: int, epoch: int, objects: dict[str, Any], blocked: float, deadline: float) -> None:
        started = time.perf_counter()
        prefix = step_dir(step)
        entries: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._retries = 0
        try:
            # The two big objects go up side by side, so the upload never drains between them.
            big = ["model.safetensors", "optimizer.safetensors"]
            with ThreadPoolExecutor(2, thread_name_prefix="dvgt-upload") as pool:
                for name, entry in zip(
                    big, pool.map(lambda n: self._put(self.storage, prefix, n, objects[n], deadline), big)
                ):
                    entries[name] = entry
            for name, data in objects.items():
                if name not in entries:
                    entries[name] = self._put(self.storage, prefix, name, data, deadline)
            self._write_manifest(self.storage, prefix, step, epoch, list(entries.values()), deadline)
            uploaded = time.perf_counter()
            with self._lock:
                self.stats.last_committed_step = step
            self.prune(self.keep_last)
            event = CheckpointEvent(
                step,
                "ok",
                blocked,
                uploaded - started,
                time.perf_counter() - uploaded,
                sum(e["size"] for e in entries.values()),
                self._retries,
                self.storage.child(prefix),
            )
        except Exception as error:
            message = " ".join(str(error).split()) or traceback.format_exc(limit=1)
            if self._cancel.is_set():
                message += " (stopped retrying: superseded, or out of time)"
            event = CheckpointEvent(
                step,
                "failed",
                blocked,
                time.perf_counter() - started,
                bytes=sum(e["size"] for e in entries.values()),
                retries=self._retries,
                error=f"{type(error).__name__}: {message}",
            )
        self._emit(event)

    def _spill_objects(self, step: int, epoch: int, objects: dict[str, Any]) -> CheckpointEvent:
        """Commit the staged objects to the spill folder (a manifest naming their destination)."""
        spill = self.spill
        assert spill is not None, "_start spills only to a spill folder"
        started = time.perf_counter()
        prefix = step_dir(step)
        spill.delete_prefix(prefix)
        entries = [self._put(spill, prefix, name, data, None) for name, data in objects.items()]
        self._write_manifest(spill, prefix, step, epoch, entries, None, destination=self.storage.uri)
        where = spill.child(prefix)
        self.say(
            f"checkpoint of step {step}: the store is unreachable; committed to the local spill folder {where}, "
            f"uploaded to {self.storage.uri} at the next start"
        )
        return CheckpointEvent(
            step,
            "spilled",
            0.0,
            time.perf_counter() - started,
            bytes=sum(e["size"] for e in entries),
            where=where,
            error="the store was unreachable until the deadline",
        )

    def _note_retry(self, message: str) -> None:
        """Count a retry; the first of a save is said (the save's record tells how it ended)."""
        with self._lock:
            self._retries += 1
            first = not self._retrying.is_set()
            self._retrying.set()
        if first:
            self.say(f"checkpoint: {message} (and so on until the save's deadline)")

    def _put(self, storage: Storage, prefix: str, name: str, data: Any, deadline: float | None) -> dict[str, Any]:
        """Store one object of a step, `data` (bytes-like) or what `data(writer)` writes, retrying a
        transient failure until `deadline`; returns its manifest entry."""

        def attempt() -> dict[str, Any]:
            writer = storage.open_write(f"{prefix}/{name}")
            try:
                with writer:
                    data(writer) if callable(data) else writer.write(data)
            except Exception as error:  # a serialiser may report a failed write as something else
                raise (writer.error or error) from None
            return {"key": name, "size": writer.size, **writer.digests}

        return with_retries(f"upload {storage.child(prefix)}/{name}", attempt, deadline, self._cancel, self._note_retry)

    def _write_manifest(
        self,
        storage: Storage,
        prefix: str,
        step: int,
        epoch: int,
        objects: list[dict[str, Any]],
        deadline: float | None,
        **fields: Any,
    ) -> None:
        """The commit: written last, it makes the step's objects a checkpoint."""
        manifest = {
            "step": step,
            "epoch": epoch,
            "created": time.time(),
            "world_size": self.world_size,
            **fields,
            "package_version": self.package_version,
            "objects": sorted(objects, key=lambda o: o["key"]),
        }
        self._put(storage, prefix, MANIFEST, json.dumps(manifest, indent=1).encode(), deadline)

    def _emit(self, event: CheckpointEvent) -> CheckpointEvent:
        with self._lock:
            setattr(self.stats, event.outcome, getattr(self.stats, event.outcome) + 1)
            self.stats.last_event = event
            if event.outcome != "skipped":  # a skipped request leaves the save in flight running
                self.stats.in_flight = False
        for listener in self.listeners:
            listener(event)
        return event

    def prune(self, keep: int, dry_run: bool = False) -> list[int]:
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
    bad: list[str] = field(default_factory=list)  # "key: why"
    checked: int = 0


def verify(checkpoint: Checkpoint, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every object of a committed checkpoint and check its size and xxh3_128."""
    report = VerifyReport(checkpoint.step)
    for entry in checkpoint.manifest["objects"]:
        try:
            checkpoint.read(entry["key"], progress=progress)
        except CorruptCheckpointError as error:
            report.bad.append(f"{entry['key']}: {'missing' if 'missing' in str(error) else 'size or checksum differ'}")
        report.checked += 1
    return report

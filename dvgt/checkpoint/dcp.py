"""Sharded checkpoints for FSDP: torch.distributed.checkpoint (DCP) on our Storage layer.

Layout of one checkpoint (next to the usual objects, see docs/checkpoints.md):

    step_00000120/
        dcp/rank_00000.distcp   this rank's slices of model and optimizer tensors, raw bytes back to back
        dcp/rank_00001.distcp   (one object per rank, written by that rank, in parallel)
        dcp/metadata.json       every tensor's global shape, dtype and chunks, and where each chunk lies
        trainer_state.safetensors  as for DDP, plus the optimizer's param groups (plain values)
        rng/rank_NNNNN.safetensors each rank's RNG state, written by that rank
        config.yaml
        manifest.json           written last by rank 0: format "dcp", every rank's objects with size and checksums

DCP plans which rank writes which chunk (replicated tensors once) and, on load, which chunks each
rank needs for its *current* sharding, so a checkpoint written by N ranks loads on M ranks, into
FSDP shards or full tensors alike. Our writer and reader only move bytes. Nothing is unpickled:
DCP's own file format pickles its metadata and per-tensor headers; here tensors are raw bytes
and the metadata is JSON, and every object is checked against the manifest's checksums as it is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.futures import Future

from dvgt.checkpoint.manager import (
    SHARDED_FORMAT,
    Checkpoint,
    CheckpointEvent,
    CheckpointManager,
    CorruptCheckpointError,
    one_thread,
    rng_key,
    rng_state,
    serialised_state,
    step_dir,
)
from dvgt.checkpoint.safetensors_stream import DTYPE_OF, DTYPES

METADATA = "dcp/metadata.json"


@dataclasses.dataclass
class ShardRef:
    """Where one saved chunk lies: `length` bytes from byte `start` of object `key`, a [shape] tensor of dtype."""

    key: str  # object key relative to the checkpoint folder, e.g. dcp/rank_00001.distcp
    start: int
    length: int
    dtype: str  # safetensors dtype code: F32, BF16, I64, ...
    shape: list[int]


# -- metadata as JSON -------------------------------------------------------------------------------
def metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    tensors = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise TypeError(f"sharded checkpoints hold tensors only; '{fqn}' is not a tensor")
        tensors[fqn] = {
            "dtype": DTYPES[entry.properties.dtype],
            "size": list(entry.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in entry.chunks],
        }
    chunks = [
        {"fqn": index.fqn, "offset": list(index.offset), "index": index.index, **dataclasses.asdict(ref)}
        for index, ref in metadata.storage_data.items()
    ]
    return {"version": 1, "tensors": tensors, "chunks": chunks}


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    tensors: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {
        fqn: TensorStorageMetadata(
            TensorProperties(dtype=DTYPE_OF[t["dtype"]]),
            torch.Size(t["size"]),
            [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in t["chunks"]],
        )
        for fqn, t in data["tensors"].items()
    }
    storage = {
        MetadataIndex(c["fqn"], c["offset"], c["index"]): ShardRef(
            **{f.name: c[f.name] for f in dataclasses.fields(ShardRef)}
        )
        for c in data["chunks"]
    }
    return Metadata(state_dict_metadata=tensors, storage_data=storage)


# -- DCP storage writer and reader on a Storage ------------------------------------------------------
class ShardWriter(StorageWriter):
    """Each rank streams its planned chunks into one object, dcp/rank_NNNNN.distcp; the coordinator
    (rank 0) writes dcp/metadata.json. `objects` lists what this rank wrote (key, size, checksum).
    `put(key, write)` stores one object through `write(writer)` (the manager's, with its retries)."""

    def __init__(self, put: Callable[[str, Callable[[Any], None]], dict[str, Any]]) -> None:
        super().__init__()
        self.put = put
        self.objects: list[dict[str, Any]] = []

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.objects = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [
            dataclasses.replace(plan, storage_data=f"dcp/rank_{rank:05d}.distcp") for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        key: str = plan.storage_data
        results: list[WriteResult] = []

        def write(writer: Any) -> None:
            results.clear()  # (a retried write starts over)
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise TypeError(f"sharded checkpoints hold tensors only; '{item.index.fqn}' is not a tensor")
                data = planner.resolve_data(item)
                assert isinstance(data, torch.Tensor), "a tensor item resolves to a tensor"
                tensor = data.detach().contiguous()
                start = writer.size
                if tensor.numel():
                    writer.write(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory, no copy
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=writer.size - start,
                        storage_data=ShardRef(
                            key, start, writer.size - start, DTYPES[tensor.dtype], list(tensor.shape)
                        ),
                    )
                )

        self.objects.append(self.put(key, write))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        data = json.dumps(metadata_to_json(metadata)).encode()
        self.objects.append(self.put(METADATA, lambda writer: writer.write(data)))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # always passed explicitly, never picked by a checkpoint_id


class ShardReader(StorageReader):
    """Reads the chunks each rank's load plan asks for; every object is verified against the manifest
    (size and checksums) as it is read, so a corrupt shard stops the load with an error naming it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.refs: dict[MetadataIndex, ShardRef] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_metadata(self.checkpoint)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.refs = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_object: dict[str, list[ReadItem]] = {}
        for request in plan.items:
            if request.type == LoadItemType.BYTE_IO:
                raise CorruptCheckpointError(f"{self.checkpoint.uri}: '{request.storage_index.fqn}' is not a tensor")
            by_object.setdefault(self.refs[request.storage_index].key, []).append(request)
        for key, requests in by_object.items():
            data = self.checkpoint.read(key)  # one object at a time, verified
            for request in requests:
                ref = self.refs[request.storage_index]
                chunk = (
                    torch.frombuffer(data, dtype=torch.uint8, count=ref.length, offset=ref.start)
                    if ref.length
                    else torch.empty(0, dtype=torch.uint8)
                )
                chunk = chunk.view(DTYPE_OF[ref.dtype]).reshape(ref.shape)
                for dim, (start, length) in enumerate(zip(request.storage_offsets, request.lengths)):
                    chunk = chunk.narrow(dim, start, length)
                target = planner.resolve_tensor(request).detach()
                target.copy_(chunk)
                planner.commit_tensor(request, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def read_metadata(checkpoint: Checkpoint) -> Metadata:
    try:
        return metadata_from_json(json.loads(bytes(checkpoint.read(METADATA))))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(
            f"{checkpoint.uri}/{METADATA} is not valid sharded-checkpoint metadata ({type(error).__name__}: {error})"
        ) from None


# -- state dicts --------------------------------------------------------------------------------------
def flatten(model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One flat {name: tensor} dict: model.<fqn> and optimizer.<fqn>.<state key> (exp_avg, step, ...)."""
    flat = {f"model.{name}": value for name, value in model_state.items()}
    for name, state in optimizer_state["state"].items():
        flat.update({f"optimizer.{name}.{key}": value for key, value in state.items()})
    bad = [name for name, value in flat.items() if not torch.is_tensor(value)]
    if bad:
        raise TypeError(f"sharded checkpoints hold tensors only; not tensors: {bad[:5]}")
    return flat


def optimizer_state_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A torch optimizer state dict (parameters numbered in param-group order, as DDP saves it) keyed
    by parameter name instead, as torch.distributed.checkpoint.state_dict expects it."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    saved = [index for group in state["param_groups"] for index in group["params"]]
    if len(saved) != len(order):
        raise CorruptCheckpointError(
            f"the checkpoint's optimizer state covers {len(saved)} parameters but this model "
            f"trains {len(order)}; did optim.frozen_module_names change since it was saved?"
        )
    name_of = dict(zip(saved, order))
    return {
        "state": {name_of[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def load_into(flat: dict[str, torch.Tensor], checkpoint: Checkpoint, alone: bool = False) -> None:
    """Fill `flat` (plain tensors or DTensor shards, in place) from a sharded checkpoint; collective
    over the process group unless `alone` or there is none."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            flat,
            storage_reader=ShardReader(checkpoint),
            planner=DefaultLoadPlanner(flatten_state_dict=False),
            no_dist=alone or not dist.is_initialized(),
        )


def restore(
    checkpoint: Checkpoint, loaded: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load model and optimizer state from a checkpoint of either format into a model of either kind
    (plain or FSDP-sharded), resharding to the current world size. `loaded`: Checkpoint.load_all()."""
    if not checkpoint.sharded:  # DDP's full state (every rank holds it) into FSDP shards
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, loaded["model"], options=full)
        set_optimizer_state_dict(
            model, optimizer, optimizer_state_by_name(model, optimizer, loaded["optimizer"]), options=full
        )
        return
    model_state = get_model_state_dict(model)  # plain tensors, or DTensor shards under FSDP
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # (a fresh optimizer gets its state allocated)
    flat = flatten(model_state, optimizer_state)
    saved = read_metadata(checkpoint).state_dict_metadata
    missing = sorted(set(flat) - set(saved))
    if missing:
        raise CorruptCheckpointError(
            f"{checkpoint.uri} has no {len(missing)} of this run's tensors (e.g. "
            f"{missing[:3]}); was it written by another model or frozen_module_names?"
        )
    load_into(flat, checkpoint)
    optimizer_state["param_groups"] = loaded["trainer_state"]["optimizer_param_groups"]
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optimizer_state)


def load_failure(error: BaseException) -> str:
    """One line for a failed load: DCP hands every rank the failures of all ranks, wrapped in a
    CheckpointException (with tracebacks); the first rank's exception says what happened."""
    if isinstance(error, CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    return " ".join(str(error).split())


def read_full_model(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's full tensors from a sharded checkpoint, in this process alone (no process group)."""
    saved = read_metadata(checkpoint).state_dict_metadata
    full = {
        name: torch.empty(entry.size, dtype=entry.properties.dtype)
        for name, entry in saved.items()
        if name.startswith("model.") and isinstance(entry, TensorStorageMetadata)  # (the writer refuses bytes)
    }
    load_into(full, checkpoint, alone=True)
    return {name[len("model.") :]: tensor for name, tensor in full.items()}


def model_summary(checkpoint: Checkpoint) -> str:
    """Tensor and value counts of the model, from the metadata alone."""
    saved = read_metadata(checkpoint).state_dict_metadata
    model = {
        name: entry
        for name, entry in saved.items()
        if name.startswith("model.") and isinstance(entry, TensorStorageMetadata)  # (the writer refuses bytes)
    }
    dtypes = sorted({DTYPES[entry.properties.dtype] for entry in model.values()})
    return (
        f"{len(model)} tensors, {sum(entry.size.numel() for entry in model.values()):,} values "
        f"({', '.join(dtypes)}), sharded over {checkpoint.manifest.get('world_size')} rank(s)"
    )


# -- saving -------------------------------------------------------------------------------------------
class ShardedCheckpointManager(CheckpointManager):
    """CheckpointManager for FSDP: every rank writes its own shard objects in parallel through DCP.

    save() is collective (every rank calls it). Each rank copies its shards off the device into
    reused host buffers (the only time the loop is blocked), then a background thread per rank runs
    DCP's save on a process group of its own (so its collectives never interleave with training's),
    writes its RNG state, and hands its object list to rank 0, which writes trainer_state.safetensors,
    config.yaml and manifest.json last. The async rules are the DDP manager's (async_mode).
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
        device: torch.device = torch.device("cpu"),  # noqa: B008 (immutable)
    ) -> None:
        # No spill: a sharded checkpoint's objects lie on every pod; its final save retries until its deadline.
        super().__init__(uri, rank, world_size, keep_last, package_version, async_mode, s3, preflight, retry_budget_s)
        self.device = device
        self.group = dist.new_group(backend="gloo")  # the checkpoint threads' own collectives
        self.mesh = DeviceMesh.from_group(self.group, "cpu")  # host copies of DTensor shards live on it

    def _all_idle(self) -> bool:
        flag = torch.tensor([0.0 if self.in_flight() else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # on the training thread's group
        return bool(flag.item() > 0.5)

    def _stage(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of this rank's slices; DTensors keep their global shape and placement."""
        local = self._staging.copy({name: t.to_local() if isinstance(t, DTensor) else t for name, t in flat.items()})
        self._staging.synchronize()
        return {
            name: DTensor.from_local(
                local[name], self.mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
            if isinstance(t, DTensor)
            else local[name]
            for name, t in flat.items()
        }

    def save(
        self,
        step: int,
        *,
        model_state: dict[str, Any],
        optimizer_state: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
        epoch: int,
        final: bool = False,
        timeout: float | None = None,
    ) -> CheckpointEvent | None:
        """model_state / optimizer_state: torch.distributed.checkpoint.state_dict's (sharded) state dicts."""
        started = time.perf_counter()
        deadline = time.monotonic() + (self.retry_budget_s if timeout is None else timeout)
        if not self._all_idle():
            if self.async_mode == "skip" and not final:
                event = CheckpointEvent(
                    step, "skipped", time.perf_counter() - started, error="the previous save is still uploading"
                )
                return self._emit(event) if self.rank == 0 else None
            self.wait(max(0.0, deadline - time.monotonic()) if final else None)
        if final and self.stats.last_committed_step == step:
            return self.stats.last_event
        self._require_idle(step, deadline)
        staged = one_thread(lambda: self._stage(flatten(model_state, optimizer_state)))
        trainer_state = {**trainer_state, "optimizer_param_groups": optimizer_state["param_groups"]}
        rng = serialised_state(rng_state())
        blocked = time.perf_counter() - started
        return self._start(
            step,
            partial(self._write_sharded, step, epoch, staged, rng, trainer_state, config_yaml, blocked, deadline),
            final,
            deadline,
        )

    def _write_sharded(
        self,
        step: int,
        epoch: int,
        staged: dict[str, torch.Tensor],
        rng: bytes,
        trainer_state: dict[str, Any],
        config_yaml: str,
        blocked: float,
        deadline: float,
    ) -> None:
        started = time.perf_counter()
        prefix = step_dir(step)
        objects: list[dict[str, Any]] = []
        error = ""
        with self._lock:
            self._retries = 0
        try:
            writer = ShardWriter(lambda key, write: self._put(self.storage, prefix, key, write, deadline))
            dcp.save(
                staged,
                storage_writer=writer,
                planner=DefaultSavePlanner(flatten_state_dict=False),
                process_group=self.group,
            )
            objects = writer.objects + [self._put(self.storage, prefix, rng_key(self.rank), rng, deadline)]
        except (Exception, CheckpointException) as failure:
            error = f"{type(failure).__name__}: {' '.join(str(failure).split()) or traceback.format_exc(limit=1)}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (objects, error), group=self.group)
        objects = [o for rank_objects, _ in gathered for o in rank_objects]
        error = next((e for _, e in gathered if e), "")
        uploaded = time.perf_counter()
        if self.rank == 0 and not error:
            try:
                objects += [
                    self._put(
                        self.storage, prefix, "trainer_state.safetensors", serialised_state(trainer_state), deadline
                    ),
                    self._put(self.storage, prefix, "config.yaml", config_yaml.encode(), deadline),
                ]
                self._write_manifest(self.storage, prefix, step, epoch, objects, deadline, format=SHARDED_FORMAT)
                uploaded = time.perf_counter()
                self.prune(self.keep_last)
            except Exception as failure:
                error = f"{type(failure).__name__}: {' '.join(str(failure).split())}"
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=self.group)  # every rank learns whether it committed
        error = outcome[0]
        if not error:
            with self._lock:
                self.stats.last_committed_step = step
        event = CheckpointEvent(
            step,
            "failed" if error else "ok",
            blocked,
            uploaded - started,
            time.perf_counter() - uploaded,
            sum(o["size"] for o in objects),
            self._retries,
            "" if error else self.storage.child(prefix),
            error,
        )
        if self.rank == 0:
            self._emit(event)
        else:
            with self._lock:
                self.stats.last_event, self.stats.in_flight = event, False

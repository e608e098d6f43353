"""`distributed.pipeline.stages=N`: the model split into N pipeline stages, with data parallelism
between the pipelines (torch.distributed.pipelining).

The ranks form a 2-D mesh (pp x dp): global rank r is stage r // dp of data-parallel replica r % dp.
The model declares its forward as an ordered list of units at block boundaries (`pipeline_units()`,
dvgt/models/split.py): the embedding, each aggregator depth step, the heads. The split gives every
stage consecutive units with parameter counts as even as possible (the largest stage is as small
as it can be) and is printed at start.

Every rank builds the whole model (on the CPU), loads pretrained weights or resumes into it, then
keeps only its stage's parameters (the others become None) and moves them to its GPU. Names are
unchanged, so clipping groups, frozen globs and checkpoints see the usual names. A stage runs its
units on a "carry" of named tensors and sends the next stage the entries later units read: the
images, the tokens and the aggregator outputs the DPT head and the pose head read (its
intermediate layers travel through the stages between them). The last stage returns the
predictions; the loss runs there.

Micro-batches are the accum_steps chunks of each batch, overlapped by ScheduleGPipe or Schedule1F1B. Each chunk's loss is weighted by its
share of the batch (as without a pipeline; the schedule does not rescale); a batch that does not
divide into accum_steps equal chunks uses the largest count that does (micro-batches of one shape).
DDP wraps every stage over its dp group (PipelineStage keeps DDP from reducing before the last
micro-batch). The tensors crossing each stage boundary are declared to the library (static
shapes), worked out by running the units on the model's skeleton on the meta device; a schedule
is kept per micro-batch shape (up to MAX_SCHEDULES).

Checkpoints are the plain (DDP) files: the stages' weights and AdamW state are gathered on rank 0
and written under the full model's names and optimizer order, so they load into an unsplit model,
and an unsplit checkpoint resumes a pipeline (it is loaded before the split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel as DDP

from dvgt.models.split import PipelineUnit

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MAX_SCHEDULES = 16  # schedules kept, one per micro-batch shape (each holds its receive buffers)


def _owned(name: str, paths: Sequence[str]) -> bool:
    return any(name == path or name.startswith(path + ".") for path in paths)


def balanced_bounds(sizes: Sequence[int], stages: int) -> list[int]:
    """Cut `sizes` into `stages` consecutive non-empty groups whose largest sum is as small as
    possible; returns the first index of each group, then len(sizes)."""
    n = len(sizes)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} pipeline units into {stages} stages")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[k][i]: the smallest largest-group sum of units[:i] in k groups; cut[k][i]: where its last group starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                largest = max(best[k - 1][j], prefix[i] - prefix[j])
                if largest < best[k][i]:
                    best[k][i], cut[k][i] = largest, j
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


@dataclass(frozen=True)
class PipelineSplit:
    units: list[PipelineUnit]
    sizes: list[int]  # parameters per unit
    bounds: list[int]  # stage s runs units[bounds[s]:bounds[s + 1]]
    inputs: tuple[str, ...]  # the model's inputs, the first stage's arguments

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def stage_units(self, stage: int) -> list[PipelineUnit]:
        return self.units[self.bounds[stage] : self.bounds[stage + 1]]

    def carried_into(self, stage: int) -> tuple[str, ...]:
        """The carry entries stage `stage` receives (the model's inputs for the first), in a fixed order."""
        if stage == 0:
            return self.inputs
        available = list(self.inputs)
        for unit in self.units[: self.bounds[stage]]:
            available += [name for name in unit.writes if name not in available]
        needed = {name for unit in self.units[self.bounds[stage] :] for name in unit.reads}
        return tuple(name for name in available if name in needed)

    def report(self, data_parallel: int, schedule: str) -> str:
        lines = [f"Pipeline: {self.stages} stages x {data_parallel} data-parallel rank(s), schedule {schedule}:"]
        for s in range(self.stages):
            units = self.stage_units(s)
            params = sum(self.sizes[self.bounds[s] : self.bounds[s + 1]])
            sent = ", ".join(self.carried_into(s + 1)) if s + 1 < self.stages else "predictions"
            lines.append(
                f"  stage {s}: {units[0].name} .. {units[-1].name} ({len(units)} units, {params / 1e6:.2f} M "
                f"parameters) -> {sent}"
            )
        return "\n".join(lines)


def split_model(model: Any, stages: int, inputs: tuple[str, ...]) -> PipelineSplit:
    """The model's units in `stages` stages balanced by parameter count. `inputs`: the model inputs
    the training loop passes (images, and ego_status when the model takes it)."""
    units = model.pipeline_units()
    owner: dict[str, str] = {}
    sizes = []
    for unit in units:
        size = 0
        for name, param in model.named_parameters():
            if _owned(name, unit.owns):
                if name in owner:
                    raise ValueError(f"parameter {name} is owned by pipeline units {owner[name]} and {unit.name}")
                owner[name] = unit.name
                size += param.numel()
        sizes.append(size)
    unowned = [name for name, _ in model.named_parameters() if name not in owner]
    if unowned:
        raise ValueError(f"{type(model).__name__}.pipeline_units() leaves parameters unowned: {unowned[:5]}")
    if stages > len(units):
        raise ValueError(
            f"distributed.pipeline.stages={stages} is more than the model's {len(units)} pipeline units "
            f"(embedding, {len(units) - 2} aggregator steps, heads); use at most {len(units)} stages"
        )
    return PipelineSplit(units, sizes, balanced_bounds(sizes, stages), inputs)


def keep_only(model: nn.Module, paths: Sequence[str]) -> None:
    """Drop every parameter outside `paths` (it becomes None: not trained, saved or moved here)."""
    for name, _ in list(model.named_parameters()):
        if not _owned(name, paths):
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_parameter(leaf, None)


class StageModule(nn.Module):
    """Runs consecutive units on the carry: positional tensors named `inputs` in; the entries named
    `outputs` out, or for the last stage (outputs None) the predictions kept in `predictions`."""

    def __init__(
        self,
        model: nn.Module,
        units: list[PipelineUnit],
        inputs: tuple[str, ...],
        outputs: tuple[str, ...] | None,
        autocast: Callable[[], Any],
    ) -> None:
        super().__init__()
        self.model = model
        self.units, self.inputs, self.outputs, self.autocast = units, inputs, outputs, autocast
        self.predictions: dict[str, Any] | None = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        carry = dict(zip(self.inputs, tensors))
        with self.autocast():
            for unit in self.units:
                result = unit.run(carry)
                carry.update(result)
        if self.outputs is not None:  # in float32, as the stage boundaries are declared
            return tuple(
                carry[name].float() if carry[name].is_floating_point() else carry[name] for name in self.outputs
            )
        # The last stage: the loss function takes the predictions from here (it runs right after the
        # forward of each micro-batch, in both schedules); the library sees one placeholder output.
        self.predictions = result
        return (tensors[0].new_zeros(()),)


class Pipeline:
    """This rank's stage of the pipeline: the pruned model, its schedule and the collectives that
    keep the trainer's bookkeeping (losses, gradient norms, checkpoints) whole."""

    _finite: torch.Tensor  # whether every micro-batch's loss of the current step is finite (a device flag)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        mesh: DeviceMesh,
        device: torch.device,
        schedule: str,
        inputs: tuple[str, ...],
        autocast: Callable[[], Any],
        skeleton: Any,
    ) -> None:
        """`skeleton`: the same model on the meta device (frozen as the model), for the stage boundaries' shapes."""
        self.skeleton_units = skeleton.train().pipeline_units()
        self.mesh, self.device, self.schedule_name = mesh, device, schedule
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.stage, self.stages = mesh.get_local_rank("pp"), mesh.size(0)
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), mesh.size(1)
        self.split = split_model(model, self.stages, inputs)
        # the full optimizer's parameter order and groups: the layout of a checkpoint's optimizer state
        names = {id(p): n for n, p in model.named_parameters()}
        self.optimizer_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        self.optimizer_groups = optimizer.state_dict()["param_groups"]
        units = self.split.stage_units(self.stage)
        keep_only(model, [path for unit in units for path in unit.owns])
        model.to(device)
        self.model = model
        last = self.stage == self.stages - 1
        outputs = None if last else self.split.carried_into(self.stage + 1)
        self.module = StageModule(model, units, self.split.carried_into(self.stage), outputs, autocast)
        self.wrapped = (
            DDP(
                self.module,
                process_group=self.dp_group,
                device_ids=[device.index] if device.type == "cuda" else None,
            )
            if self.dp_size > 1
            else self.module
        )
        self._schedules: dict[tuple, Any] = {}
        self._loss_keys: list[str] | None = None

    def report(self) -> str:
        return self.split.report(self.dp_size, self.schedule_name)

    def carry_optimizer_state(self, full: torch.optim.Optimizer, stage: torch.optim.Optimizer) -> None:
        """Give the stage's optimizer (over the kept parameters) the state the full one holds for them
        (a resumed AdamW state); load_state_dict moves it next to the parameters."""
        layout = stage.state_dict()
        params = [p for group in stage.param_groups for p in group["params"]]
        layout["state"] = {i: full.state[p] for i, p in enumerate(params) if p in full.state}
        stage.load_state_dict(layout)

    # -- training -------------------------------------------------------------------------------
    def _schedule(self, chunks: list[dict[str, Any]]):
        """The schedule for micro-batches of these shapes (built on first use, its boundaries declared)."""
        key = tuple(tuple(chunk["images"].shape) for chunk in chunks)
        if key not in self._schedules:
            if len(self._schedules) == MAX_SCHEDULES:  # the oldest shape's buffers go
                self._schedules.pop(next(iter(self._schedules)))
            inputs, outputs = self._boundary_metas(chunks[0])
            stage = PipelineStage(
                self.wrapped,
                self.stage,
                self.stages,
                self.device,
                input_args=inputs,
                output_args=outputs,
                group=self.pp_group,
            )
            # 1F1B needs a micro-batch per stage at least: a batch of fewer clips runs as GPipe
            name = self.schedule_name if len(chunks) >= self.stages else "gpipe"
            self._schedules[key] = SCHEDULES[name](
                stage, n_microbatches=len(chunks), loss_fn=self._loss, scale_grads=False
            )
        return self._schedules[key]

    def _boundary_metas(self, chunk: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The tensors entering and leaving this stage for micro-batches like `chunk`, on the meta
        device: the units before the end of this stage run on the model's skeleton (no memory, no
        compute). The last stage's outputs go to the loss, not to a stage: a placeholder stands for them."""
        carry = {name: chunk[name].to("meta") for name in self.split.inputs}
        last = self.stage == self.stages - 1
        end = self.split.bounds[self.stage + (0 if last else 1)]
        for unit in self.skeleton_units[:end]:
            carry.update(unit.run(carry))
        inputs = tuple(carry[name] for name in self.split.carried_into(self.stage))
        if last:
            return inputs, (torch.empty((), device="meta"),)
        return inputs, tuple(carry[name] for name in self.module.outputs or ())

    def _loss(self, placeholder: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of micro-batch `index` (its chunk's share of the batch objective)."""
        predictions, self.module.predictions = self.module.predictions, None
        assert predictions is not None  # the last stage's forward ran for this micro-batch
        chunk = self._chunks[int(index)]
        losses = self._loss_of(predictions, chunk)
        share = chunk["images"].shape[0] / self._batch_size
        self._finite = self._finite & torch.isfinite(losses["objective"].detach())
        for key, value in losses.items():
            self._totals[key] = self._totals.get(key, 0.0) + value.detach().float() * share
        return losses["objective"] * share

    def forward_backward(
        self,
        chunks: list[dict[str, Any]],
        loss_of: Callable[[dict[str, Any], dict[str, Any]], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batch through the pipeline, forward and backward, micro-batch by micro-batch.
        Returns the batch's losses (on every stage: reduced from the last) and whether they are finite."""
        self._chunks, self._loss_of = chunks, loss_of
        self._batch_size = sum(chunk["images"].shape[0] for chunk in chunks)
        self._totals: dict[str, torch.Tensor] = {}
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        schedule = self._schedule(chunks)
        batch = torch.cat([chunk["images"] for chunk in chunks])
        args = (batch, *(torch.cat([c[name] for c in chunks]) for name in self.split.inputs[1:]))
        target = torch.arange(len(chunks)) if self.stage == self.stages - 1 else None
        if self.stage == 0:
            schedule.step(*args, target=target, return_outputs=False)
        else:
            schedule.step(target=target, return_outputs=False)
        return self._reduce_losses(), self._finite

    def _reduce_losses(self) -> dict[str, torch.Tensor]:
        """The last stage's losses on every stage of this pipeline (one small all-reduce)."""
        last = self.stages - 1
        if self._loss_keys is None:  # the names, once
            box = [sorted(self._totals)]
            dist.broadcast_object_list(box, group_src=last, group=self.pp_group)
            self._loss_keys = box[0]
        if self.stage == last:
            values = torch.stack([self._totals[k] for k in self._loss_keys])
        else:
            values = torch.zeros(len(self._loss_keys), device=self.device)
        dist.all_reduce(values, group=self.pp_group)
        return dict(zip(self._loss_keys, values))

    # -- checkpoints ----------------------------------------------------------------------------
    def full_state(self, optimizer: torch.optim.Optimizer, lr: float) -> tuple[dict, dict]:
        """(model state, optimizer state) of the whole model in the unsplit layout, on global rank 0
        (empty elsewhere). Collective over the stages of data-parallel replica 0."""
        if self.dp_rank != 0:
            return {}, {}
        own_model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        own_optimizer = {
            names[id(p)]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups
            for p in group["params"]
            if p in optimizer.state
        }
        parts: list[Any] | None = [None] * self.stages if self.stage == 0 else None
        dist.gather_object((own_model, own_optimizer), parts, group_dst=0, group=self.pp_group)
        if parts is None:  # not the first stage
            return {}, {}
        model_state: dict[str, torch.Tensor] = {}
        by_name: dict[str, dict] = {}
        for stage_model, stage_optimizer in parts:
            model_state.update(stage_model)
            by_name.update(stage_optimizer)
        index = {name: i for i, name in enumerate(self.optimizer_names)}
        groups = [{**group, "lr": lr} for group in self.optimizer_groups]
        return model_state, {
            "state": {index[name]: state for name, state in by_name.items()},
            "param_groups": groups,
        }


def micro_batches(batch_size: int, accum_steps: int) -> int:
    """The most equal chunks, at most accum_steps, that a batch divides into (the schedules take
    micro-batches of one shape)."""
    return max(n for n in range(1, min(batch_size, accum_steps) + 1) if batch_size % n == 0)


def mesh_for(world_size: int, stages: int, device_type: str) -> DeviceMesh:
    """The (pp, dp) mesh; a clear error unless the world divides into whole pipelines."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % stages:
        raise ValueError(
            f"distributed.pipeline.stages={stages} does not divide the {world_size} processes into whole "
            f"pipelines; start a multiple of {stages} processes (torchrun --nproc_per_node x nodes)"
        )
    return init_device_mesh(device_type, (stages, world_size // stages), mesh_dim_names=("pp", "dp"))

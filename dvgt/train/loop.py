"""The trainer: one short loop over batches; model, data, optimizer, clipping, checkpoints and logs
each come from their own component."""

from __future__ import annotations

import contextlib
import queue
import signal
import sys
import threading
import time
from functools import partial
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dvgt
from dvgt.checkpoint.dcp import ShardedCheckpointManager, load_failure, restore
from dvgt.checkpoint.manager import (
    STEP_DIR,
    Checkpoint,
    CheckpointEvent,
    CheckpointManager,
    CorruptCheckpointError,
    set_rng_state,
)
from dvgt.checkpoint.storage import split_uri
from dvgt.data.anchors import ensure_anchors
from dvgt.data.check import DataCheckError, require_clean
from dvgt.data.feature_cache import CachedDataset
from dvgt.data.loader import build_eval_loader, build_train_loader, open_datasets
from dvgt.families import build_model, check_model_config, load_pretrained, model_skeleton, sample_targets
from dvgt.metrics.labels import rank_labels
from dvgt.metrics.training import TrainingMetrics
from dvgt.models.weights import WeightsMismatchError, load_state
from dvgt.train import device_map, distributed, feature_cache, pipeline
from dvgt.train.checkpoint_cost import CheckpointCost
from dvgt.train.clipping import GradientClipper
from dvgt.train.evaluation import EvalAccumulator, evaluate_batch
from dvgt.train.flops import device_peak_flops
from dvgt.train.fsdp import no_gradient_sync, shard_model
from dvgt.train.logger import RunLogger, format_record
from dvgt.train.optim import build_optimizer, freeze_modules, set_lr, warmup_cosine
from dvgt.train.seeding import seed_everything
from dvgt.train.speedups import attention_context, compile_blocks, training_attention


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split along the batch dimension into `chunks` parts (fewer when the batch is smaller)."""
    size = batch["images"].shape[0]
    chunks = max(1, min(chunks, size))
    bounds = np.linspace(0, size, chunks + 1).round().astype(int)
    return [
        {k: (v[a:b] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from holds weights of another model."""


def load_checkpoint_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Checkpoint, cfg: DictConfig
) -> None:
    """A checkpoint's weights into the model, strictly; a mismatch is one summary (counts, the first
    keys of each kind) with its likely cause, read from the config saved beside the weights."""
    try:
        load_state(model, state, strict=True, source=checkpoint.uri)
    except WeightsMismatchError as error:
        try:
            saved = OmegaConf.create(yaml.safe_load(bytes(checkpoint.read("config.yaml"))) or {})
        except (CorruptCheckpointError, yaml.YAMLError):
            saved = OmegaConf.create({})
        differ = [
            f"{key}={OmegaConf.select(saved, key)} (this run: {OmegaConf.select(cfg, key)})"
            for key in ("model.name", "model.size")
            if OmegaConf.select(saved, key) != OmegaConf.select(cfg, key)
        ]
        cause = (
            f"the checkpoint was written with {', '.join(differ)}"
            if differ
            else "the model code or its options changed since the checkpoint was written"
        )
        raise CheckpointMismatchError(
            f"cannot resume from {checkpoint.uri}: it holds another model's weights. {error}\nLikely cause: {cause}. "
            f"Resume with the same model settings, or start fresh with checkpoint.resume=never or another "
            f"checkpoint.uri"
        ) from None


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.fsdp = cfg.distributed.strategy == "fsdp"
        if cfg.model.device_map:  # a bad map is refused before any process group or allocation
            device_map.check(cfg.model, cfg.device)
        self.dist = distributed.init_distributed(
            cfg.device,
            cfg.distributed.backend,
            cfg.distributed.timeout_mins,
            single_process_group=self.fsdp,
            gpus_per_process=device_map.gpus_per_process(cfg.model.device_map),
        )
        self.device = self.dist.device
        try:
            self._set_up(cfg)
        except BaseException:  # a refused config or checkpoint leaves no process group behind
            self.close()
            raise

    def _set_up(self, cfg: DictConfig) -> None:
        """Storage, model, data, optimizer and resume: everything after the process group."""
        self.steps_per_epoch = cfg.limit_train_batches or cfg.data.train.steps_per_epoch
        self.total_steps = cfg.max_epochs * self.steps_per_epoch
        self.step = 0  # optimizer steps done (skipped non-finite steps included: they consume a batch)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._nonfinite_since = 0  # the first step of the current run of skipped steps
        self._pending: list[dict[str, Any]] = []  # records of steps whose device values are not read yet
        self._unrecorded: list[dict[str, Any]] = []  # read, not yet in the metrics and log
        self._progress: tqdm | None = None
        self._last_saved_step = -1
        self._sigterm_at: float | None = None  # when SIGTERM arrived (preemption)
        self._checkpoint_events: queue.SimpleQueue[CheckpointEvent] = queue.SimpleQueue()
        self._checkpoint_cost = CheckpointCost()
        stages = cfg.distributed.pipeline.stages
        self.pipeline: pipeline.Pipeline | None = None  # set at the end of the set-up
        self.mesh = pipeline.mesh_for(self.dist.world_size, stages, self.device.type) if stages > 1 else None
        # the data shard of this rank: under a pipeline every stage of a replica reads the replica's batches
        self.data_rank, self.data_world = (
            (self.mesh.get_local_rank("dp"), self.mesh.size(1)) if self.mesh else (self.dist.rank, self.dist.world_size)
        )

        ck = cfg.checkpoint  # storage is checked first: a wrong bucket or credentials fail within seconds
        manager = partial(ShardedCheckpointManager, device=self.dist.device) if self.fsdp else CheckpointManager
        self.checkpoints = manager(
            ck.uri,
            self.dist.rank,
            self.dist.world_size,
            ck.keep_last,
            dvgt.__version__,
            ck.async_mode,
            ck.s3,
            preflight=True,
            retry_budget_s=ck.retry_budget_s,
            spill_dir=ck.spill_dir,
        )
        self.checkpoints.say = self._print
        if self.dist.is_main:  # a final checkpoint spilled locally by the previous start goes up first
            self.checkpoints.upload_spilled(self._print)
        distributed.barrier()
        self.stop_vote = distributed.StopVote()
        if cfg.data.check:  # a missing file found now, not hours into the run
            self._check_data()
        seed_everything(cfg.seed_value)  # the same on every rank, so initial weights agree
        if cfg.model.anchor_dir:
            self._prepare_anchors()
        self.family = check_model_config(cfg.model)
        self.model = build_model(cfg.model)
        if cfg.model.device_map:
            devices = device_map.apply_device_map(self.model, cfg.model.device_map, self.device)
            self._print(f"model.device_map:\n{device_map.describe(self.model, cfg.model.device_map, devices)}")
        elif self.mesh is None:  # (a pipeline moves only its stage, once split)
            self.model.to(self.device)
        resume_from = self._find_resume_checkpoint()
        # A resumed run continues its log; a fresh run starts a new one.
        self.log = RunLogger(
            cfg.logging.log_dir,
            enabled=self.dist.is_main,
            tensorboard=cfg.logging.tensorboard,
            append=resume_from is not None,
        )
        self.metrics = (
            TrainingMetrics(cfg.logging.log_dir, rank_labels(cfg.exp_name), self.device)
            if cfg.logging.metrics
            else None
        )
        self.checkpoints.listeners.append(self._checkpoint_events.put)  # from the save thread; logged by the loop
        if resume_from is None:
            load_pretrained(self.model, cfg, self._print)
        frozen = freeze_modules(self.model, cfg.optim.frozen_module_names)
        if frozen:
            self._print(f"Frozen: {len(frozen)} parameter tensors matching {list(cfg.optim.frozen_module_names)}")
        self.frozen_part = feature_cache.largest_frozen_part(
            self.model, frozen, self.family.cacheable_parts
        )  # eval mode
        self.feature_cache: feature_cache.FeatureCache | None = None
        self.cached_part: feature_cache.FrozenPart | None = None
        if cfg.data.feature_cache:
            self.feature_cache, self.cached_part = feature_cache.open_for_training(cfg, self.model, frozen)
        self.amp_dtype = getattr(torch, cfg.optim.amp.amp_dtype)
        self.use_amp = cfg.optim.amp.enabled and self.device.type == "cuda"
        # MFU accounting (dvgt/train/flops.py) and the faster paths (dvgt/train/speedups.py)
        cached_kind = self.cached_part.kind if self.cached_part else None
        self.step_flops = self.family.flops(self.model, frozen, cached_kind) if self.family.flops else None
        self.peak_flops, peak_source = device_peak_flops(self.device, cfg.logging.peak_tflops)
        self._print(f"MFU peak: {f'{self.peak_flops / 1e12:g} TFLOP/s' if self.peak_flops else 'none'} ({peak_source})")
        self.attention_order, attention_line = training_attention(
            self.model, cfg.model.attention_backend, self.device, self.amp_dtype if self.use_amp else torch.float32
        )
        self._print(attention_line)
        if cfg.model.compile_blocks:
            self._print(f"Compiled {compile_blocks(self.model)} transformer blocks (model.compile_blocks)")
        if self.fsdp:  # parameters become DTensor shards: the clipper and the optimizer take those
            shard_model(
                self.model,
                init_device_mesh(self.device.type, (self.dist.world_size,)),
                cfg.distributed.fsdp,
                self.amp_dtype if self.use_amp else None,
            )
        self.clipper = GradientClipper(self.model, cfg.optim.gradient_clip)
        # Fused AdamW skips a non-finite step on the device (found_inf); with cpu_offload it runs unfused.
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim.lr,
            cfg.optim.weight_decay,
            cfg.optim.betas,
            fused=not cfg.distributed.fsdp.cpu_offload,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.train_model = self.model
        if self.dist.is_distributed and not self.fsdp and self.mesh is None:
            d = cfg.distributed
            self.train_model = DDP(
                self.model,
                # a model over several GPUs (model.device_map) takes no device_ids
                device_ids=[self.device.index] if self.device.type == "cuda" and not cfg.model.device_map else None,
                find_unused_parameters=d.find_unused_parameters,
                bucket_cap_mb=d.bucket_cap_mb,
                gradient_as_bucket_view=d.gradient_as_bucket_view,
            )

        self.patch_size = cast(int, self.model.patch_size)  # (every model family has one)
        if not self.dist.is_main:
            distributed.barrier()  # rank 0 first: it generates a synthetic dataset if one is missing
        self.train_loader = self._train_loader()
        self.val_loader = self._val_loader()
        if self.dist.is_main:
            distributed.barrier()
        self.epoch, self.step_in_epoch = 0, 0
        # Ranks differ from here on (data augmentation, RoPE jitter), and a resume restores this exactly.
        seed_everything(cfg.seed_value + 1000 * (self.dist.rank + 1))
        if resume_from is not None:
            self._resume(resume_from)
        self.loss = self.family.loss(self.model, cfg.loss)  # the weights are final (DVGT-2 reads its anchors)
        if self.feature_cache is not None and self.cached_part is not None:  # the weights are final now
            feature_cache.check_weights(self.feature_cache, self.cached_part, cfg, self.device)
        if self.mesh is not None:  # the weights are final: split the model
            self._set_up_pipeline()

    def _set_up_pipeline(self) -> None:
        """Keep this rank's stage of the model, with the optimizer state and clipping groups for it."""
        cfg = self.cfg
        assert self.mesh is not None  # set up with distributed.pipeline.stages > 1
        inputs = ("images", "ego_status") if cfg.model.enable_ego_status else ("images",)
        full_optimizer = self.optimizer
        skeleton = model_skeleton(cfg.model)
        freeze_modules(skeleton, cfg.optim.frozen_module_names)
        self.pipeline = pipeline.Pipeline(
            self.model,
            full_optimizer,
            self.mesh,
            self.device,
            cfg.distributed.pipeline.schedule,
            inputs,
            self.autocast,
            skeleton,
        )
        self._print(self.pipeline.report())
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim.lr,
            cfg.optim.weight_decay,
            cfg.optim.betas,
            fused=not cfg.distributed.fsdp.cpu_offload,
        )
        self.pipeline.carry_optimizer_state(full_optimizer, self.optimizer)
        self.clipper = GradientClipper(
            self.model, cfg.optim.gradient_clip, process_group=self.pipeline.pp_group, device=self.device
        )
        self.train_model = self.pipeline.wrapped

    # -- start-up -------------------------------------------------------------------------------
    def _check_data(self) -> None:
        """Rank 0 runs the quick data check of the parquets this run reads; all ranks refuse together."""
        failure = None
        if self.dist.is_main:
            try:
                evaluates = self.cfg.limit_val_batches != 0  # as _val_loader: no evaluation reads no val parquet
                self._print(require_clean(self.cfg.data, ("train", "val") if evaluates else ("train",)))
            except DataCheckError as error:
                failure = str(error)
        failure = distributed.broadcast_from_main(failure)
        if failure is not None:
            raise DataCheckError(failure)

    def _open(self, split: str):
        return open_datasets(
            self.cfg.data,
            split,
            patch_size=self.patch_size,
            gt_scale_factor=self.cfg.gt_scale_factor,
            targets=sample_targets(self.cfg.model, evaluation=split != "train"),
        )

    def _train_loader(self):
        cfg = self.cfg
        datasets = self._open("train")
        served = CachedDataset(datasets, self.feature_cache, cfg.data.train) if self.feature_cache is not None else None
        return build_train_loader(
            cfg.data,
            datasets,
            max_img_per_gpu=cfg.max_img_per_gpu,
            seed=cfg.seed_value,
            rank=self.data_rank,
            world_size=self.data_world,
            num_workers=cfg.num_workers,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
            prefetch_factor=cfg.data.prefetch_factor,
            persistent_workers=cfg.data.persistent_workers,
            steps_per_epoch=self.steps_per_epoch,
            served=served,
        )

    def _val_loader(self):
        """Every rank evaluates its share of the validation clips (none: no evaluation)."""
        if not self.cfg.data.val.datasets or self.cfg.limit_val_batches == 0:
            return None
        return build_eval_loader(
            self._open("val"), limit=self.cfg.limit_val_batches, rank=self.dist.rank, world_size=self.dist.world_size
        )

    def _prepare_anchors(self) -> None:
        """DVGT-2 anchors: a synthetic training set gets them computed on first use (rank 0 first)."""
        if not self.dist.is_main:
            distributed.barrier()
        ensure_anchors(self.cfg)
        if self.dist.is_main:
            distributed.barrier()

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The model on a batch's images (and ego status, for DVGT-2 with model.enable_ego_status; and the
        frozen part's outputs when a feature cache provides them)."""
        kwargs = feature_cache.model_inputs(self.cached_part, batch) | self.family.model_inputs(self.cfg.model, batch)
        return model(batch["images"], **kwargs)

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def _find_resume_checkpoint(self) -> tuple | None:
        """(checkpoint, its verified state) to resume from, or None to start fresh. With resume=auto a
        corrupt newest checkpoint falls back to the previous committed one, with a warning."""
        ck = self.cfg.checkpoint
        if ck.resume_checkpoint_path:
            parent, name = split_uri(ck.resume_checkpoint_path)
            step = STEP_DIR.match(name)
            try:
                if step is None:
                    raise FileNotFoundError(name)
                checkpoint = CheckpointManager(parent, s3=ck.s3).open(int(step.group(1)))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"checkpoint.resume_checkpoint_path '{ck.resume_checkpoint_path}' is not a committed checkpoint "
                    f"folder (expected .../step_NNNNNNNN with a manifest.json); committed checkpoints under "
                    f"{ck.uri}: {self.checkpoints.committed_steps() or 'none'}"
                ) from None
            return checkpoint, checkpoint.load_all(self.dist.rank)
        if ck.resume == "auto":
            return self.checkpoints.load_newest(self.dist.rank, warn=self._print)
        return None

    def _resume(self, resume_from: tuple) -> None:
        checkpoint, loaded = resume_from
        if checkpoint.sharded or self.fsdp:  # either format into either strategy, resharded
            try:
                restore(checkpoint, loaded, self.model, self.optimizer)
            except (CorruptCheckpointError, CheckpointException) as error:
                # A corrupt shard shows only once read; DCP hands every rank's failure to all ranks,
                # so with resume=auto they fall back together (restoring the older one overwrites all).
                failure = load_failure(error)
                if self.cfg.checkpoint.resume_checkpoint_path or self.cfg.checkpoint.resume != "auto":
                    raise CorruptCheckpointError(failure) from None
                self._print(f"warning: {failure}; falling back to the previous committed checkpoint")
                older = self.checkpoints.load_newest(self.dist.rank, warn=self._print, before=checkpoint.step)
                if older is None:
                    raise CorruptCheckpointError(
                        f"no intact checkpoint under {self.checkpoints.storage.uri}: {failure}; "
                        f"delete it or set checkpoint.resume=never"
                    ) from None
                return self._resume(older)
        else:
            load_checkpoint_weights(self.model, loaded["model"], checkpoint, self.cfg)
            self.optimizer.load_state_dict(loaded["optimizer"])
        state = loaded["trainer_state"]
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.nonfinite_total = state["nonfinite_total"]
        self.scaler.load_state_dict(state["scaler"])
        self._last_saved_step = self.step
        if loaded["rng"] is not None:
            set_rng_state(loaded["rng"])
        self._print(
            f"Resumed from {checkpoint.uri} at step {self.step} "
            f"(epoch {self.epoch}, step {self.step_in_epoch} of the epoch)"
        )

    # -- training -------------------------------------------------------------------------------
    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Forward/backward over accum_steps chunks, then one clipped optimizer step, skipped on the
        device when a loss or gradient is non-finite. Nothing here waits for the device: the record's
        losses, gradient norms and `skipped` flag stay device tensors until `read_steps` reads them
        (at the logging interval, before a save, at the end)."""
        self.train_model.train()
        if self.frozen_part is not None:
            self.frozen_part.module.eval()
        cache_counts = {}
        if self.cached_part is not None:  # the feature cache's misses are computed live
            with self.autocast():
                cache_counts = feature_cache.fill_misses(self.cached_part, batch)
        lr = warmup_cosine(
            self.step, self.total_steps, self.cfg.optim.warmup_fraction, self.cfg.optim.lr, self.cfg.optim.min_lr
        )
        set_lr(self.optimizer, lr)
        if self.pipeline is None:
            totals, finite = self._forward_backward(split_batch(batch, self.cfg.accum_steps))
        else:  # micro-batches of one shape
            chunks = split_batch(batch, pipeline.micro_batches(batch["images"].shape[0], self.cfg.accum_steps))
            totals, finite = self.pipeline.forward_backward(chunks, self.loss)
        self.scaler.unscale_(self.optimizer)
        norms = self.clipper.clip()
        if not self.scaler.is_enabled() and norms:  # (the fp16 grad scaler skips overflowing steps itself)
            finite = finite & torch.isfinite(torch.stack([n.to(self.device) for n in norms.values()])).all()
        finite = distributed.all_true(finite)
        self._optimizer_step(finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record: dict[str, Any] = {f"loss/{k}": v for k, v in totals.items()}
        record.update({f"grad_norm/{k}": v for k, v in norms.items()})
        record.update(step=self.step, lr=lr, skipped=~finite, **cache_counts)
        self._pending.append(record)
        return record

    def _forward_backward(self, chunks: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward and backward of every chunk (gradients reduced on the last one); returns the batch's
        losses and whether they are finite (a device flag)."""
        batch_size = sum(chunk["images"].shape[0] for chunk in chunks)
        totals: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with self._gradient_sync(last):
                with self.autocast():
                    predictions = self.forward(self.train_model, chunk)
                losses = self.loss(predictions, chunk)
                share = chunk["images"].shape[0] / batch_size
                finite = finite & torch.isfinite(losses["objective"].detach())
                self.scaler.scale(losses["objective"] * share).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() * share
        return totals, finite

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """The optimizer step, applied only where `finite` (a device flag) holds: fused AdamW takes the
        flag as its found_inf and skips on the device; the fp16 grad scaler and unfused AdamW (FSDP's
        cpu_offload) need the flag on the host, one read per step."""
        if self.scaler.is_enabled():
            if bool(finite):
                self.scaler.step(self.optimizer)
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).to(torch.float32)  # type: ignore[attr-defined]  # read by fused AdamW
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(finite):
            self.optimizer.step()
        self.scaler.update()

    def read_steps(self) -> list[dict[str, Any]]:
        """The records of the steps since the last read, with their device values read in one transfer
        (the only host-device synchronisation of the training loop), and the skipped steps counted
        (_record_steps then reports them and applies the stop rule)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        keys = [[k for k, v in record.items() if torch.is_tensor(v)] for record in pending]
        values = torch.stack(
            [record[k].detach().float().reshape(()) for record, ks in zip(pending, keys) for k in ks]
        ).tolist()
        at = 0
        for record, ks in zip(pending, keys):
            for k in ks:
                record[k] = values[at]
                at += 1
            record["skipped"] = bool(record["skipped"])
            if record["skipped"]:
                self._nonfinite_since = self._nonfinite_since if self.nonfinite_in_a_row else record["step"]
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
            else:
                self.nonfinite_in_a_row = 0
            record["nonfinite_skipped"] = self.nonfinite_total
        self._unrecorded += pending
        return pending

    def _check_nonfinite_streak(self) -> None:
        limit = self.cfg.optim.max_consecutive_nonfinite
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"steps {self._nonfinite_since}-{self._nonfinite_since + self.nonfinite_in_a_row - 1} "
                f"({self.nonfinite_in_a_row} in a row) had a non-finite loss or gradient and were skipped; the newest "
                f"checkpoint predates them. Lower optim.lr, check the data, or raise optim.max_consecutive_nonfinite "
                f"(now {limit})"
            )

    def _gradient_sync(self, enabled: bool):
        """DDP and FSDP reduce gradients only on the last micro-step of an optimizer step."""
        if enabled or not self.dist.is_distributed:
            return contextlib.nullcontext()
        return no_gradient_sync(self.model) if self.fsdp else cast(DDP, self.train_model).no_sync()

    def verify_replicas(self) -> None:
        """Under DDP, check that every rank holds bit-identical parameters (catches silent desync)."""
        if not self.dist.is_distributed:
            return
        fingerprint = torch.stack(
            [
                torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                for p in self.model.parameters()
            ]
        )
        gathered = [torch.empty_like(fingerprint) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, fingerprint)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"model replicas differ across ranks after step {self.step}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Held-out metrics (dvgt/train/evaluation.py): every rank evaluates its share of the validation
        clips, then the per-dataset sums are reduced across ranks. Returns {val/<dataset>/<metric>: mean}."""
        if self.val_loader is None:
            return None
        self.model.eval()
        accumulator = EvalAccumulator()
        for batch in self.val_loader:
            counted = batch.pop("counted")[0]  # a repeat that evens out the ranks runs the forward, counts nothing
            batch = move_to(batch, self.device)
            with self.autocast():
                predictions = self.forward(self.model, batch)
            if counted:
                accumulator.add(
                    batch["dataset"][0],
                    evaluate_batch(self.family, predictions, batch, self.cfg.gt_scale_factor, self.cfg.eval),
                )
                objective = self.loss(predictions, batch)["objective"]
                accumulator.add("loss", {"objective": [float(objective)]})
        self.model.train()
        return {f"val/{key}": value for key, value in accumulator.reduce(self.device).items()}

    def _evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.log.log({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics})
            if self.metrics is not None and self.dist.is_main:
                self.metrics.observe_eval(metrics)
            self._print(f"step {self.step} (epoch {self.epoch}): {format_record(metrics)}")
        return metrics or {}

    def save(self, final: bool = False, timeout: float | None = None) -> CheckpointEvent | None:
        """Checkpoint the current step (in the background unless final; see CheckpointManager.save),
        unless the last step was skipped as non-finite: its weights may have blown up in the steps
        before, and resume=auto would pick them."""
        self.read_steps()
        if self.step == self._last_saved_step and not final:
            return None
        if self.nonfinite_in_a_row:
            self._log_checkpoint(
                CheckpointEvent(
                    self.step,
                    "skipped",
                    0.0,
                    error=f"step {self.step} was skipped as non-finite ({self.nonfinite_in_a_row} "
                    f"in a row); a checkpoint is committed once a step is finite again",
                )
            )
            return None
        self._last_saved_step = self.step
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "nonfinite_total": self.nonfinite_total,
            "scaler": self.scaler.state_dict(),
        }
        if self.fsdp:  # sharded, keyed by parameter name (torch.distributed.checkpoint.state_dict)
            model_state, optimizer_state = (
                cast(dict[str, torch.Tensor], get_model_state_dict(self.model)),  # (DTensors)
                get_optimizer_state_dict(self.model, self.optimizer),
            )
        elif self.pipeline is not None:  # the stages gathered into the unsplit layout on rank 0
            model_state, optimizer_state = self.pipeline.full_state(
                self.optimizer, self.optimizer.param_groups[0]["lr"]
            )
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        return self.checkpoints.save(
            self.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            trainer_state=state,
            config_yaml=OmegaConf.to_yaml(self.cfg),
            epoch=self.epoch,
            final=final,
            timeout=timeout,
        )

    def _log_checkpoint(self, event: CheckpointEvent, cost_s: float | None = None) -> None:
        """One record of kind "checkpoint" (log and metrics). cost_s: the training time it cost."""
        record = {
            "kind": "checkpoint",
            "step": event.step,
            "outcome": event.outcome,
            "blocked_s": event.blocked_s,
            "upload_s": event.upload_s,
            "prune_s": event.prune_s,
            "cost_s": cost_s,
            "bytes": event.bytes,
            "retries": event.retries,
            **({"where": event.where} if event.where else {}),
            **({"error": event.error} if event.error else {}),
        }
        self.log.log(record)
        if self.metrics is not None:
            self.metrics.checkpoint_event(record)
        if event.outcome in ("failed", "skipped"):
            self._print(f"warning: checkpoint of step {event.step} {event.outcome}: {event.error}")

    def _checkpoints_done(self, waited_s: float | None = None) -> None:
        """Log the saves that finished since the last call, with what each cost: the extra time of the
        steps it overlapped, or for a save the loop waited for (the final one), that wait."""
        while not self._checkpoint_events.empty():
            event = self._checkpoint_events.get()
            if event.outcome == "skipped":
                cost = event.blocked_s
            elif waited_s is not None:
                cost = waited_s
            else:
                cost = self._checkpoint_cost.finish()
            self._log_checkpoint(event, cost)

    def _on_sigterm(self, signum, frame) -> None:
        if self._sigterm_at is None:
            self._sigterm_at = time.monotonic()

    def _record_steps(self) -> None:
        """Read the steps' device values, then metrics for every step, the log and progress bar at the
        logging interval, and the non-finite stop rule (after the skipped steps are counted)."""
        self.read_steps()
        records, self._unrecorded = self._unrecorded, []
        for record in records:
            if self.metrics is not None:
                self.metrics.observe_step(record)
            if record["step"] % self.cfg.logging.log_freq == 0 or record["step"] == 1:
                self.log.log(record)
        if records and self._progress is not None:
            self._progress.set_postfix(
                loss=f"{records[-1]['loss/objective']:.4g}", lr=f"{records[-1]['lr']:.2e}", refresh=False
            )
        self._check_nonfinite_streak()

    def fit(self) -> dict[str, Any]:
        """Train to the end, or until SIGTERM (then result["preempted"] is True; see _fit). Attention runs
        on model.attention_backend's kernels throughout (recomputation in backward included)."""
        with attention_context(self.attention_order):
            if threading.current_thread() is not threading.main_thread():
                return self._fit()
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            try:
                return self._fit()
            finally:
                signal.signal(signal.SIGTERM, previous)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        sampler = self.train_loader.batch_sampler
        self._print(
            f"Training {cfg.model.name} ({cfg.model.size}) on {self.dist.world_size} process(es), "
            f"device {self.device}; {self.total_steps} steps; checkpoints -> {cfg.checkpoint.uri}; "
            f"log -> {self.log.path}"
        )
        last_eval: dict[str, Any] = {}
        preempted = False
        if self.step == 0:
            last_eval = self._evaluate_and_log()  # the starting point of the held-out curves
        self._progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.dist.is_main and cfg.logging.progress),
            desc=cfg.exp_name,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 10.0,
        )
        try:
            while self.epoch < cfg.max_epochs:
                sampler.load_state_dict({"epoch": self.epoch, "step": self.step_in_epoch})
                preempted = self._train_epoch()
                if preempted:
                    break
                self.epoch += 1
                self.step_in_epoch = 0
                self._record_steps()
                if self.epoch % cfg.val_epoch_freq == 0 or self.epoch == cfg.max_epochs:
                    last_eval = self._evaluate_and_log() or last_eval
                if (self.epoch % cfg.checkpoint.save_freq == 0) and self.epoch < cfg.max_epochs:
                    started = time.perf_counter()
                    self.save()  # between epochs, so its blocked time is in no step's: counted here
                    self._checkpoint_cost.add(time.perf_counter() - started)
        finally:
            self.stop_vote.result()  # no vote left in flight on the process group
            self._progress.close()
        spilled = self._final_save(preempted)
        self.log.close()
        if self.metrics is not None:
            self.metrics.finished()
        return {"step": self.step, "preempted": preempted, "spilled": spilled, **last_eval}

    def _train_epoch(self) -> bool:
        """The steps of one epoch; True when the ranks agreed to stop for SIGTERM."""
        cfg = self.cfg
        started = time.perf_counter()  # each step's time runs from here to the end of its bookkeeping
        for batch in self.train_loader:
            data_time = time.perf_counter() - started
            saving = self.checkpoints.in_flight()  # a save overlapping this step makes it cost more
            batch = move_to(batch, self.device)
            images = batch["images"].shape[0] * batch["images"].shape[1] * batch["images"].shape[2]
            record = self.train_step(batch)
            self.step_in_epoch += 1
            if cfg.distributed.verify_replicas:
                self.verify_replicas()
            if self._progress is not None:
                self._progress.update(1)
            if cfg.checkpoint.save_every_steps and self.step % cfg.checkpoint.save_every_steps == 0:
                self.save()
                saving |= self._last_saved_step == self.step
            preempted = self.stop_vote.cast(self._sigterm_at is not None)
            ended = time.perf_counter()
            step_time = ended - started  # data wait, step, save and bookkeeping: the step's whole wall time
            record.update(
                kind="train",
                epoch=self.epoch,
                step_time=step_time,
                data_time=data_time,
                images=images,
                images_per_sec=images * self.dist.world_size / step_time,
            )
            if self.step_flops is not None:  # this rank's model FLOPs, their rate and MFU
                flops = self.step_flops(*batch["images"].shape[:3], *batch["images"].shape[-2:])
                record.update(model_flops=flops, model_flops_per_sec=flops / step_time)
                if self.peak_flops:
                    record["mfu"] = flops / step_time / self.peak_flops
            if self.step % cfg.logging.log_freq == 0 or self.step == 1 or preempted:
                self._record_steps()
            self._checkpoint_cost.observe(step_time, saving or self.checkpoints.in_flight())
            self._checkpoints_done()
            started = time.perf_counter()
            if preempted:
                return True
        return False

    def _final_save(self, preempted: bool) -> bool:
        """Commit the last step (waiting for the save in flight); True when it only reached the local
        spill folder. On preemption, within the budget (the pod's terminationGracePeriodSeconds)."""
        self._record_steps()
        timeout = None
        if preempted:
            if self._sigterm_at is None:  # another rank's SIGTERM (another node's pod): the budget runs from now
                self._sigterm_at = time.monotonic()
            timeout = max(0.0, self.cfg.checkpoint.preemption_budget_s - (time.monotonic() - self._sigterm_at))
            self._print(f"SIGTERM: committing a final checkpoint at step {self.step} (budget {timeout:.0f} s)")
        started = time.perf_counter()
        try:
            event = self.save(final=True, timeout=timeout)
        except OSError as error:
            if not preempted:
                raise
            self._print(f"warning: {error}")  # exit for a restart all the same: it resumes from the newest commit
            event = None
        self._checkpoints_done(waited_s=time.perf_counter() - started)
        return event is not None and event.outcome == "spilled"

    def close(self) -> None:
        """Let a save still uploading finish (up to a minute, without further retries), then leave the
        process group."""
        if getattr(self, "checkpoints", None) is not None:
            self.checkpoints.stop_retrying()
            self.checkpoints.wait(60.0)
        distributed.cleanup()


def train(cfg: DictConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()

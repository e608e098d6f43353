"""The trainer: one short loop over batches; model, data, optimizer, clipping, checkpoints and logs
each come from their own component."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dvgt
from dvgt.checkpoint.dcp import ShardedCheckpointManager, load_failure, restore
from dvgt.checkpoint.manager import (STEP_DIR, CheckpointEvent, CheckpointManager, CorruptCheckpointError,
                                     set_rng_state)
from dvgt.checkpoint.storage import split_uri
from dvgt.data.anchors import ensure_anchors
from dvgt.data.feature_cache import CachedDataset
from dvgt.data.loader import build_eval_loader, build_train_loader, open_datasets
from dvgt.metrics.labels import rank_labels
from dvgt.metrics.training import TrainingMetrics
from dvgt.models import build_model, sample_targets
from dvgt.models.conversions import initialise_from_pretrained
from dvgt.models.weights import load_weights
from dvgt.train import distributed, feature_cache
from dvgt.train.clipping import GradientClipper
from dvgt.train.dvgt2_losses import anchors_from_model, require_distinct_anchors
from dvgt.train.evaluation import EvalAccumulator, evaluate_batch
from dvgt.train.fsdp import no_gradient_sync, shard_model
from dvgt.train.logger import RunLogger, format_record
from dvgt.train.losses import compute_loss
from dvgt.train.optim import build_optimizer, freeze_modules, set_lr, warmup_cosine


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_batch(batch: Dict[str, Any], chunks: int) -> List[Dict[str, Any]]:
    """Split along the batch dimension into `chunks` parts (fewer when the batch is smaller)."""
    size = batch["images"].shape[0]
    chunks = max(1, min(chunks, size))
    bounds = np.linspace(0, size, chunks + 1).round().astype(int)
    return [{k: (v[a:b] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def load_pretrained(model: torch.nn.Module, cfg: DictConfig, say=print) -> None:
    """checkpoint.load_pretrained_weights_path (converted, e.g. VGGT-1B -> DVGT-1), then
    checkpoint.direct_load_pretrained_weights_path (same architecture, honours checkpoint.strict)."""
    ck = cfg.checkpoint
    for key in ("load_pretrained_weights_path", "direct_load_pretrained_weights_path"):
        if ck[key] and not str(ck[key]).startswith("s3://") and not Path(ck[key]).is_file():
            raise FileNotFoundError(f"checkpoint.{key}: weights file '{ck[key]}' does not exist; fix the path "
                                    f"or set checkpoint.{key}=null")
    if ck.load_pretrained_weights_path:
        report, conversion = initialise_from_pretrained(model, cfg.model.name, ck.load_pretrained_weights_path, s3=ck.s3)
        say(f"Initialised from {ck.load_pretrained_weights_path} ({conversion.description}):\n{report.summary()}")
    if ck.direct_load_pretrained_weights_path:
        report = load_weights(model, ck.direct_load_pretrained_weights_path, strict=ck.strict, s3=ck.s3)
        say(f"Loaded pretrained weights from {ck.direct_load_pretrained_weights_path}:\n{report.summary()}")


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.fsdp = cfg.distributed.strategy == "fsdp"
        self.dist = distributed.init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_mins,
                                                 single_process_group=self.fsdp)
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
        self._last_saved_step = -1
        self._sigterm_at: Optional[float] = None  # when SIGTERM arrived (preemption)

        ck = cfg.checkpoint  # storage is checked first: a wrong bucket or credentials fail within seconds
        manager = partial(ShardedCheckpointManager, device=self.dist.device) if self.fsdp else CheckpointManager
        self.checkpoints = manager(ck.uri, self.dist.rank, self.dist.world_size, ck.keep_last,
                                   dvgt.__version__, ck.async_mode, ck.s3, preflight=True)
        seed_everything(cfg.seed_value)  # the same on every rank, so initial weights agree
        if cfg.model.anchor_dir:
            self._prepare_anchors()
        self.model = build_model(cfg.model).to(self.device)
        resume_from = self._find_resume_checkpoint()
        # A resumed run continues its log; a fresh run starts a new one.
        self.log = RunLogger(cfg.logging.log_dir, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard,
                             append=resume_from is not None)
        self.metrics = (TrainingMetrics(cfg.logging.log_dir, rank_labels(cfg.exp_name), self.device)
                        if cfg.logging.metrics else None)
        self.checkpoints.listeners.append(self._on_checkpoint_event)
        if resume_from is None:
            load_pretrained(self.model, cfg, self._print)
        frozen = freeze_modules(self.model, cfg.optim.frozen_module_names)
        if frozen:
            self._print(f"Frozen: {len(frozen)} parameter tensors matching {list(cfg.optim.frozen_module_names)}")
        self.frozen_part = feature_cache.largest_frozen_part(self.model, frozen)  # it runs in eval mode
        self.feature_cache, self.cached_part = (
            feature_cache.open_for_training(cfg, self.model, frozen)
            if cfg.data.feature_cache else (None, None))
        self.amp_dtype = getattr(torch, cfg.optim.amp.amp_dtype)
        self.use_amp = cfg.optim.amp.enabled and self.device.type == "cuda"
        if self.fsdp:  # parameters become DTensor shards: the clipper and the optimizer take those
            shard_model(self.model, init_device_mesh(self.device.type, (self.dist.world_size,)), cfg.distributed.fsdp,
                        self.amp_dtype if self.use_amp else None)
        self.clipper = GradientClipper(self.model, cfg.optim.gradient_clip)
        self.optimizer = build_optimizer(self.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                         fused=self.device.type == "cuda" and not cfg.distributed.fsdp.cpu_offload)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.train_model = self.model
        if self.dist.is_distributed and not self.fsdp:
            d = cfg.distributed
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                   find_unused_parameters=d.find_unused_parameters, bucket_cap_mb=d.bucket_cap_mb,
                                   gradient_as_bucket_view=d.gradient_as_bucket_view)

        self.patch_size = self.model.patch_size
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
        self.anchors = anchors_from_model(self.model)  # DVGT-2: the planning/pose losses need them
        if self.anchors is not None:
            require_distinct_anchors(self.anchors)
        if self.feature_cache is not None:  # the weights are final now (pretrained or resumed)
            feature_cache.check_weights(self.feature_cache, self.cached_part, cfg, self.device)

    # -- start-up -------------------------------------------------------------------------------
    def _open(self, split: str):
        return open_datasets(self.cfg.data, split, patch_size=self.patch_size, gt_scale_factor=self.cfg.gt_scale_factor,
                             targets=sample_targets(self.cfg.model, evaluation=split != "train"))

    def _train_loader(self):
        cfg = self.cfg
        datasets = self._open("train")
        served = CachedDataset(datasets, self.feature_cache, cfg.data.train) if self.feature_cache is not None else None
        return build_train_loader(
            cfg.data, datasets, max_img_per_gpu=cfg.max_img_per_gpu, seed=cfg.seed_value, rank=self.dist.rank,
            world_size=self.dist.world_size, num_workers=cfg.num_workers,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor,
            persistent_workers=cfg.data.persistent_workers, steps_per_epoch=self.steps_per_epoch, served=served)

    def _val_loader(self):
        """Every rank evaluates its share of the validation clips (none: no evaluation)."""
        if not self.cfg.data.val.datasets or self.cfg.limit_val_batches == 0:
            return None
        return build_eval_loader(self._open("val"), limit=self.cfg.limit_val_batches, rank=self.dist.rank,
                                 world_size=self.dist.world_size)

    def _prepare_anchors(self) -> None:
        """DVGT-2 anchors: a synthetic training set gets them computed on first use (rank 0 first)."""
        if not self.dist.is_main:
            distributed.barrier()
        ensure_anchors(self.cfg)
        if self.dist.is_main:
            distributed.barrier()

    def forward(self, model: torch.nn.Module, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The model on a batch's images (and ego status, for DVGT-2 with model.enable_ego_status; and the
        frozen part's outputs when a feature cache provides them)."""
        kwargs = feature_cache.model_inputs(self.cached_part, batch)
        if self.cfg.model.enable_ego_status:
            kwargs["ego_status"] = batch["ego_status"]
        return model(batch["images"], **kwargs)

    def _print(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def _find_resume_checkpoint(self) -> Optional[tuple]:
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
                    f"{ck.uri}: {self.checkpoints.committed_steps() or 'none'}") from None
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
                    raise CorruptCheckpointError(f"no intact checkpoint under {self.checkpoints.storage.uri}: {failure}; "
                                                 f"delete it or set checkpoint.resume=never") from None
                return self._resume(older)
        else:
            self.model.load_state_dict(loaded["model"], strict=True)
            self.optimizer.load_state_dict(loaded["optimizer"])
        state = loaded["trainer_state"]
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.nonfinite_total = state["nonfinite_total"]
        self.scaler.load_state_dict(state["scaler"])
        self._last_saved_step = self.step
        if loaded["rng"] is not None:
            set_rng_state(loaded["rng"])
        self._print(f"Resumed from {checkpoint.uri} at step {self.step} "
                    f"(epoch {self.epoch}, step {self.step_in_epoch} of the epoch)")

    # -- training -------------------------------------------------------------------------------
    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """Forward/backward over accum_steps chunks, then one clipped optimizer step (or a counted skip)."""
        self.train_model.train()
        if self.frozen_part is not None:
            self.frozen_part.module.eval()
        cache_counts = {}
        if self.cached_part is not None:  # the feature cache's misses are computed live
            with self.autocast():
                cache_counts = feature_cache.fill_misses(self.cached_part, batch)
        lr = warmup_cosine(self.step, self.total_steps, self.cfg.optim.warmup_fraction, self.cfg.optim.lr,
                           self.cfg.optim.min_lr)
        set_lr(self.optimizer, lr)
        chunks = split_batch(batch, self.cfg.accum_steps)
        batch_size = batch["images"].shape[0]
        totals: Dict[str, float] = {}
        finite = True
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with self._gradient_sync(last):
                with self.autocast():
                    predictions = self.forward(self.train_model, chunk)
                losses = compute_loss(predictions, chunk, self.cfg.loss, self.anchors)
                share = chunk["images"].shape[0] / batch_size
                finite &= bool(torch.isfinite(losses["objective"]))
                self.scaler.scale(losses["objective"] * share).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * share
        self.scaler.unscale_(self.optimizer)
        norms = self.clipper.clip()
        finite &= self.scaler.is_enabled() or all(math.isfinite(n) for n in norms.values())
        if distributed.all_true(finite, self.device):
            self.scaler.step(self.optimizer)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            limit = self.cfg.optim.max_consecutive_nonfinite
            if self.nonfinite_in_a_row >= limit:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(last at step {self.step}); lower optim.lr, check the data, or raise "
                    f"optim.max_consecutive_nonfinite (now {limit})")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {f"loss/{k}": v for k, v in totals.items()}
        record.update({f"grad_norm/{k}": v for k, v in norms.items()})
        record.update(lr=lr, nonfinite_skipped=self.nonfinite_total, skipped=not bool(finite), **cache_counts)
        return record

    def _gradient_sync(self, enabled: bool):
        """DDP and FSDP reduce gradients only on the last micro-step of an optimizer step."""
        if enabled or not self.dist.is_distributed:
            return contextlib.nullcontext()
        return no_gradient_sync(self.model) if self.fsdp else self.train_model.no_sync()

    def verify_replicas(self) -> None:
        """Under DDP, check that every rank holds bit-identical parameters (catches silent desync)."""
        if not self.dist.is_distributed:
            return
        fingerprint = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                                   for p in self.model.parameters()])
        gathered = [torch.empty_like(fingerprint) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, fingerprint)
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"model replicas differ across ranks after step {self.step}")

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
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
                accumulator.add(batch["dataset"][0], evaluate_batch(predictions, batch, self.cfg.gt_scale_factor,
                                                                    self.cfg.eval))
                objective = compute_loss(predictions, batch, self.cfg.loss, self.anchors)["objective"]
                accumulator.add("loss", {"objective": [float(objective)]})
        self.model.train()
        return {f"val/{key}": value for key, value in accumulator.reduce(self.device).items()}

    def _evaluate_and_log(self) -> Dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.log.log({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics})
            if self.metrics is not None and self.dist.is_main:
                self.metrics.observe_eval(metrics)
            self._print(f"step {self.step} (epoch {self.epoch}): {format_record(metrics)}")
        return metrics or {}

    def save(self, final: bool = False, timeout: Optional[float] = None) -> None:
        """Checkpoint the current step (in the background unless final; see CheckpointManager.save)."""
        if self.step == self._last_saved_step and not final:
            return
        self._last_saved_step = self.step
        state = {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "nonfinite_total": self.nonfinite_total, "scaler": self.scaler.state_dict()}
        if self.fsdp:  # sharded, keyed by parameter name (torch.distributed.checkpoint.state_dict)
            model_state, optimizer_state = get_model_state_dict(self.model), get_optimizer_state_dict(self.model, self.optimizer)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        self.checkpoints.save(self.step, model_state=model_state, optimizer_state=optimizer_state, trainer_state=state,
                              config_yaml=OmegaConf.to_yaml(self.cfg), epoch=self.epoch, final=final, timeout=timeout)

    def _on_checkpoint_event(self, event: CheckpointEvent) -> None:
        record = {"kind": "checkpoint", "step": event.step, "outcome": event.outcome, "blocked_s": event.blocked_s,
                  "upload_s": event.upload_s, "bytes": event.bytes, **({"error": event.error} if event.error else {})}
        self.log.log(record)
        if self.metrics is not None:
            self.metrics.checkpoint_event(record)
        if event.outcome != "ok":
            self._print(f"warning: checkpoint of step {event.step} {event.outcome}"
                        f"{': ' + event.error if event.error else ' (the previous save is still uploading)'}")

    def _on_sigterm(self, signum, frame) -> None:
        if self._sigterm_at is None:
            self._sigterm_at = time.monotonic()

    def _preempted(self) -> bool:
        """True on every rank once any rank got SIGTERM (so all ranks stop after the same step)."""
        return not distributed.all_true(self._sigterm_at is None, self.device)

    def fit(self) -> Dict[str, Any]:
        """Train to the end, or until SIGTERM (then result["preempted"] is True; see _fit)."""
        if threading.current_thread() is not threading.main_thread():
            return self._fit()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._fit()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        sampler = self.train_loader.batch_sampler
        self._print(f"Training {cfg.model.name} ({cfg.model.size}) on {self.dist.world_size} process(es), "
                    f"device {self.device}; {self.total_steps} steps; checkpoints -> {cfg.checkpoint.uri}; "
                    f"log -> {self.log.path}")
        last_eval: Dict[str, Any] = {}
        preempted = False
        if self.step == 0:
            last_eval = self._evaluate_and_log()  # the starting point of the held-out curves
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not (self.dist.is_main and cfg.logging.progress),
                        desc=cfg.exp_name, unit="step", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0)
        while self.epoch < cfg.max_epochs:
            sampler.load_state_dict({"epoch": self.epoch, "step": self.step_in_epoch})
            wait_start = time.perf_counter()
            for batch in self.train_loader:
                data_time = time.perf_counter() - wait_start
                batch = move_to(batch, self.device)
                images = batch["images"].shape[0] * batch["images"].shape[1] * batch["images"].shape[2]
                record = self.train_step(batch)
                step_time = time.perf_counter() - wait_start
                self.step_in_epoch += 1
                if cfg.distributed.verify_replicas:
                    self.verify_replicas()
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss/objective']:.4g}", lr=f"{record['lr']:.2e}", refresh=False)
                record.update(kind="train", step=self.step, epoch=self.epoch, step_time=step_time,
                              data_time=data_time, images=images, images_per_sec=images * self.dist.world_size / step_time)
                if self.metrics is not None:
                    self.metrics.observe_step(record)
                if self.step % cfg.logging.log_freq == 0 or self.step == 1:
                    self.log.log(record)
                if cfg.checkpoint.save_every_steps and self.step % cfg.checkpoint.save_every_steps == 0:
                    self.save()
                preempted = self._preempted()
                if preempted:
                    break
                wait_start = time.perf_counter()
            if preempted:
                break
            self.epoch += 1
            self.step_in_epoch = 0
            if self.epoch % cfg.val_epoch_freq == 0 or self.epoch == cfg.max_epochs:
                last_eval = self._evaluate_and_log() or last_eval
            if (self.epoch % cfg.checkpoint.save_freq == 0) and self.epoch < cfg.max_epochs:
                self.save()
        progress.close()
        if preempted:
            # Finish within the budget (the pod's terminationGracePeriodSeconds): exit code 143 lets the
            # Training Operator restart the pod, which resumes from this checkpoint.
            budget = cfg.checkpoint.preemption_budget_s - (time.monotonic() - (self._sigterm_at or time.monotonic()))
            self._print(f"SIGTERM: committing a final checkpoint at step {self.step} (budget {budget:.0f} s)")
            try:
                self.save(final=True, timeout=max(budget, 0.0))
            except OSError as error:  # still exit for a restart: it resumes from the newest commit
                self._print(f"warning: {error}")
        else:
            self.save(final=True)  # waits for the save in flight; commits the last step unless it is
        self.log.close()
        if self.metrics is not None:
            self.metrics.finished()
        return {"step": self.step, "preempted": preempted, **last_eval}

    def close(self) -> None:
        distributed.cleanup()


def train(cfg: DictConfig) -> Dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()

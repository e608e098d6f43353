"""TrainingMetrics: the trainer's Prometheus instrumentation (every metric is listed in docs/metrics.md).

Each rank writes its own series, labelled with dvgt_job, stage, node_rank and local_rank, through
prometheus-client's multiprocess mode. Gauges use the `mostrecent` mode: the series of a rank is
identified by its labels alone, so it survives the merge of a pod's processes and carries on when a
rank restarts (the `all`/`liveall` modes would add a `pid` label and start a new series each time).

The cost per step is a few dozen writes into a memory-mapped file and no device synchronisation:
every value comes from the record the loop already has on the host.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dvgt.metrics.labels import LABEL_NAMES
from dvgt.metrics.multiproc import remove_stale_files, use_folder

STEP_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    60.0,
    300.0,
)  # seconds: tiny CPU runs to 2B-parameter GPU steps
CHECKPOINT_OUTCOMES = ("ok", "failed", "skipped", "spilled")

_folder: Path | None = None  # the folder this process writes to; prometheus-client fixes it once per process


def _prepare_folder(log_dir: str | Path, labels: Mapping[str, str]) -> Path:
    """Point prometheus-client at the run's folder and remove stale files, once per process."""
    global _folder
    if _folder is None:
        _folder = use_folder(log_dir)  # before prometheus_client is imported: it reads the variable then
        remove_stale_files(_folder, labels)
    from prometheus_client import values

    if not values.ValueClass._multiprocess:
        # prometheus_client was imported before the variable was set (a notebook, a test process):
        # switch to the value class the import would have chosen.
        values.ValueClass = values.MultiProcessValue()
    return _folder


class TrainingMetrics:
    """The metrics of one training process. `observe_step` once per optimizer step, `checkpoint_event`
    once per save, `finished` at the end of a run."""

    def __init__(self, log_dir: str | Path, labels: Mapping[str, str], device: Any = None) -> None:
        self.folder = _prepare_folder(log_dir, labels)
        from prometheus_client import Counter, Gauge, Histogram

        names = list(LABEL_NAMES)
        self.labels = {name: str(labels[name]) for name in names}
        self.device = device if device is not None and getattr(device, "type", "cpu") == "cuda" else None

        def gauge(name: str, doc: str, extra=()):
            return Gauge(name, doc, names + list(extra), registry=None, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str, extra=()):
            return Counter(name, doc, names + list(extra), registry=None)

        rank = self.labels
        self.step_duration = Histogram(
            "dvgt_step_duration_seconds",
            "Wall time of one optimizer step on this rank, data wait included",
            names,
            registry=None,
            buckets=STEP_BUCKETS,
        ).labels(**rank)
        self.last_step_duration = gauge("dvgt_step_last_duration_seconds", "Wall time of the last step").labels(**rank)
        self.data_wait = counter("dvgt_data_wait_seconds", "Time spent waiting for the next batch").labels(**rank)
        self.images = counter("dvgt_images", "Images trained on by this rank").labels(**rank)
        self.model_flops = counter(
            "dvgt_model_flops", "Model FLOPs of this rank's training steps (dvgt/train/flops.py)"
        ).labels(**rank)
        self.model_flops_rate = gauge(
            "dvgt_model_flops_per_second", "Model FLOPs per second of the last step on this rank, over its wall time"
        ).labels(**rank)
        # present only with a peak (a known GPU or logging.peak_tflops): its child is made at the first value
        self._mfu = gauge(
            "dvgt_mfu_ratio", "Model FLOPs utilisation of the last step: its FLOP/s over the GPU's dense bf16 peak"
        )
        self.cache_hits = counter(
            "dvgt_feature_cache_hits",
            "Images whose frozen-part outputs (backbone tokens or aggregator outputs) came from the feature cache",
        ).labels(**rank)
        self.cache_misses = counter(
            "dvgt_feature_cache_misses", "Images the feature cache did not hold, computed live by the frozen part"
        ).labels(**rank)
        self.optimizer_step = gauge("dvgt_optimizer_step", "Optimizer steps done (the run's global step)").labels(
            **rank
        )
        self.last_step_time = gauge(
            "dvgt_last_step_timestamp_seconds", "Unix time at which the last step completed"
        ).labels(**rank)
        self.learning_rate = gauge("dvgt_learning_rate", "Learning rate of the last step").labels(**rank)
        self.nonfinite = counter(
            "dvgt_nonfinite_steps_skipped", "Steps skipped for a non-finite loss or gradient"
        ).labels(**rank)
        self.completed = gauge("dvgt_training_completed", "1 once the run finished its last step, else 0").labels(
            **rank
        )
        self.completed.set(0)
        self._loss = gauge("dvgt_loss", "Training loss of the last step on this rank, by component", ["component"])
        self._grad_norm = gauge("dvgt_grad_norm", "Gradient norm before clipping, by clipping group", ["group"])
        self._eval = gauge(
            "dvgt_eval_metric",
            "Held-out metric of the last evaluation, official definition and "
            "name (docs/metrics.md), by validation dataset",
            ["dataset", "metric"],
        )
        self._children: dict[tuple, Any] = {}  # (family, labels) -> labelled child

        self.checkpoint_saves = counter(
            "dvgt_checkpoint_saves",
            "Checkpoint saves by outcome (ok, failed, "
            "skipped: not started while the previous one was still uploading or the last "
            "step was non-finite, spilled: committed to the local spill folder only)",
            ["outcome"],
        )
        for outcome in CHECKPOINT_OUTCOMES:  # every outcome exists from the start, at 0
            self.checkpoint_saves.labels(**rank, outcome=outcome)
        self.checkpoint_blocked = gauge(
            "dvgt_checkpoint_blocked_seconds", "Time the last save held up training"
        ).labels(**rank)
        self.checkpoint_upload = gauge(
            "dvgt_checkpoint_upload_seconds", "Time the last save took to reach storage (pruning not included)"
        ).labels(**rank)
        self.checkpoint_cost = gauge(
            "dvgt_checkpoint_cost_seconds",
            "Training time the last save cost: the extra "
            "wall time of the steps it overlapped (blocked time included), or the wait for a "
            "final save",
        ).labels(**rank)
        self.checkpoint_size = gauge("dvgt_checkpoint_size_bytes", "Bytes written by the last save").labels(**rank)

        self._memory = None
        if self.device is not None:
            self._memory = {
                key: gauge(f"dvgt_gpu_{key}_bytes", doc, ["gpu"]).labels(**rank, gpu=str(self.device.index))
                for key, doc in (
                    ("allocated", "GPU memory held by tensors (PyTorch allocator)"),
                    ("reserved", "GPU memory reserved by the PyTorch caching allocator"),
                    ("peak_allocated", "Peak of dvgt_gpu_allocated_bytes since start"),
                    ("peak_reserved", "Peak of dvgt_gpu_reserved_bytes since start"),
                )
            }

    def _child(self, family, **labels: str):
        """The child of a family with labels beyond the rank's (component, group, ...), made once."""
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._children:
            self._children[key] = family.labels(**self.labels, **labels)
        return self._children[key]

    def observe_step(self, record: Mapping[str, Any]) -> None:
        """One optimizer step, from the loop's record: step, step_time, data_time, images, model_flops,
        model_flops_per_sec, lr, skipped, `loss/<component>`, `grad_norm/<group>`, with a peak mfu and,
        with a feature cache, cache_hits and cache_misses."""
        self.step_duration.observe(record["step_time"])
        self.last_step_duration.set(record["step_time"])
        self.data_wait.inc(record["data_time"])
        self.images.inc(record["images"])
        if "model_flops" in record:
            self.model_flops.inc(record["model_flops"])
            self.model_flops_rate.set(record["model_flops_per_sec"])
        if "mfu" in record:
            self._child(self._mfu).set(record["mfu"])
        self.optimizer_step.set(record["step"])
        self.learning_rate.set(record["lr"])
        if record.get("skipped"):
            self.nonfinite.inc()
        if "cache_hits" in record:
            self.cache_hits.inc(record["cache_hits"])
            self.cache_misses.inc(record["cache_misses"])
        for key, value in record.items():
            if key.startswith("loss/"):
                self._child(self._loss, component=key[5:]).set(value)
            elif key.startswith("grad_norm/"):
                self._child(self._grad_norm, group=key[10:]).set(value)
        if self._memory is not None:
            import torch

            self._memory["allocated"].set(torch.cuda.memory_allocated(self.device))
            self._memory["reserved"].set(torch.cuda.memory_reserved(self.device))
            self._memory["peak_allocated"].set(torch.cuda.max_memory_allocated(self.device))
            self._memory["peak_reserved"].set(torch.cuda.max_memory_reserved(self.device))
        self.last_step_time.set(time.time())

    def observe_eval(self, metrics: Mapping[str, float]) -> None:
        """One evaluation's reduced means, keyed ``val/<dataset>/<metric>`` (``val/loss/objective`` included)."""
        for key, value in metrics.items():
            dataset, metric = key.removeprefix("val/").split("/", 1)
            self._child(self._eval, dataset=dataset, metric=metric).set(value)

    def checkpoint_event(self, record: Mapping[str, Any]) -> None:
        """One save, from a record of kind "checkpoint": outcome (ok | failed | skipped | spilled), and
        when known blocked_s, upload_s, cost_s and bytes."""
        outcome = record["outcome"]
        if outcome not in CHECKPOINT_OUTCOMES:
            raise ValueError(f"checkpoint outcome '{outcome}' is not one of {', '.join(CHECKPOINT_OUTCOMES)}")
        self.checkpoint_saves.labels(**self.labels, outcome=outcome).inc()
        for gauge, key in (
            (self.checkpoint_blocked, "blocked_s"),
            (self.checkpoint_upload, "upload_s"),
            (self.checkpoint_cost, "cost_s"),
            (self.checkpoint_size, "bytes"),
        ):
            if record.get(key) is not None:
                gauge.set(record[key])

    def finished(self) -> None:
        self.completed.set(1)

"""JobStatus: what `Client.status` reports about a job, on either backend, and the readers behind its
progress fields: the last completed step (the exporter's `dvgt_optimizer_step`, else the trainer's
log lines) and the newest committed checkpoint (the checkpoint store)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# Job phases, from the Training Operator's condition types; "Pending" = no condition yet.
PHASES = ("Pending", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
FINISHED = ("Succeeded", "Failed")
STEP_METRIC = "dvgt_optimizer_step"  # the run's global step (docs/metrics.md)


@dataclass
class Condition:
    type: str  # Created | Running | Restarting | Suspended | Succeeded | Failed
    status: bool  # whether the job is in this condition now
    reason: str = ""
    message: str = ""
    time: str = ""  # lastTransitionTime (RFC 3339)


@dataclass
class ReplicaStatus:
    active: int = 0  # running pods
    succeeded: int = 0
    failed: int = 0


@dataclass
class PodStatus:
    name: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    restarts: int = 0  # restarts of its pytorch container


@dataclass
class CheckpointInfo:
    step: int
    uri: str  # the checkpoint's folder, <checkpoint uri>/step_NNNNNNNN


@dataclass
class JobStatus:
    name: str
    namespace: str  # "" on the local backend
    phase: str  # one of PHASES
    conditions: list[Condition] = field(default_factory=list)
    replicas: dict[str, ReplicaStatus] = field(default_factory=dict)  # Master / Worker
    pods: list[PodStatus] = field(default_factory=list)
    stage: str = ""  # the chart's dvgt.io/stage label
    checkpoint_uri: str = ""  # where the trainer writes checkpoints (its checkpoint.uri argument)
    last_step: int | None = None  # last completed optimizer step
    last_step_source: str = ""  # "metrics" (the exporter) or "log" (the trainer's output)
    checkpoint: CheckpointInfo | None = None  # newest committed checkpoint
    notes: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: phase, pods, step and checkpoint (the live view of `dvgt wait`)."""
        running = sum(r.active for r in self.replicas.values())
        total = sum(r.active + r.succeeded + r.failed for r in self.replicas.values())
        parts = [f"{self.name}: {self.phase}", f"{running}/{total} pods running" if total else "no pods yet"]
        if self.last_step is not None:
            parts.append(f"step {self.last_step}")
        if self.checkpoint is not None:
            parts.append(f"checkpoint step {self.checkpoint.step}")
        return ", ".join(parts)

    def describe(self) -> str:
        """Several lines for `dvgt status`."""
        lines = [
            f"job        {self.name}" + (f" (namespace {self.namespace})" if self.namespace else ""),
            f"stage      {self.stage or '?'}",
            f"phase      {self.phase}",
        ]
        for c in self.conditions:
            lines.append(
                f"  {c.type:<11} {'True ' if c.status else 'False'} {c.time:<21} {c.reason}"
                + (f": {c.message}" if c.message else "")
            )
        for rtype, r in self.replicas.items():
            lines.append(f"{rtype:<10} {r.active} active, {r.succeeded} succeeded, {r.failed} failed")
        for pod in self.pods:
            lines.append(f"  pod {pod.name}: {pod.phase}, {pod.restarts} restart(s)")
        step = f"{self.last_step} (from the {self.last_step_source})" if self.last_step is not None else "unknown"
        lines.append(f"last step  {step}")
        ckpt = f"step {self.checkpoint.step} at {self.checkpoint.uri}" if self.checkpoint else "none"
        lines.append(
            f"checkpoint {ckpt}"
            + (f" (in {self.checkpoint_uri})" if self.checkpoint_uri and not self.checkpoint else "")
        )
        lines += [f"note       {note}" for note in self.notes]
        return "\n".join(lines)


def phase_of(conditions: list[Condition]) -> str:
    """The job's phase: the most decisive condition that is True (Failed over Succeeded over ...)."""
    true = {c.type for c in conditions if c.status}
    for phase in ("Failed", "Succeeded", "Suspended", "Restarting", "Running", "Created"):
        if phase in true:
            return phase
    return "Pending"


def checkpoint_uri_of(job: dict[str, Any]) -> str:
    """The trainer's checkpoint.uri: the last `checkpoint.uri=` argument of the Master's pytorch container
    (a TrainJob: of spec.trainer.args)."""
    if job.get("kind") == "TrainJob":
        args = (job["spec"].get("trainer") or {}).get("args") or []
    else:
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        args = next((c.get("args") or [] for c in master.get("containers") or [] if c.get("name") == "pytorch"), [])
    values = [str(a).split("=", 1)[1] for a in args if str(a).startswith("checkpoint.uri=")]
    return values[-1] if values else ""


def step_from_metrics(text: str) -> int | None:
    """The highest `dvgt_optimizer_step` of an exposition (one series per rank)."""
    from prometheus_client.parser import text_string_to_metric_families

    steps = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == STEP_METRIC
    ]
    return int(max(steps)) if steps else None


# Trainer output that names a completed step: the final JSON line of `dvgt train` ({"finished": ...,
# "step": N}), evaluation lines ("step N (epoch E): ..."), and resuming ("Resumed from ... at step N").
_STEP_LINES = (re.compile(r"^step (\d+) \(epoch \d+\)"), re.compile(r"^Resumed from \S+ at step (\d+)"))


def step_from_log(lines: Iterable[str]) -> int | None:
    """The step named by the newest trainer line that names one."""
    step = None
    for line in lines:
        line = line.strip()
        if line.startswith("{") and '"step"' in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                step = record["step"]
            continue
        for pattern in _STEP_LINES:
            match = pattern.match(line)
            if match:
                step = int(match.group(1))
    return step


def newest_checkpoint(uri: str) -> CheckpointInfo | None:
    """The newest committed checkpoint under `uri` (S3 settings from the standard AWS variables)."""
    from dvgt.checkpoint.manager import CheckpointManager

    checkpoint = CheckpointManager(uri).latest()
    return CheckpointInfo(checkpoint.step, checkpoint.uri) if checkpoint else None


def add_checkpoint(status: JobStatus, uri: str) -> None:
    """Fill status.checkpoint from the store; a store that cannot be read becomes a note."""
    status.checkpoint_uri = uri
    if not uri:
        return
    try:
        status.checkpoint = newest_checkpoint(uri)
    except Exception as error:
        status.notes.append(f"checkpoints in {uri} could not be read: {' '.join(str(error).split())}")

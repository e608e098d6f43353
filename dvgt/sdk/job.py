"""TrainingJob: one training run as typed fields, turned into the chart's values and rendered by
the chart itself: a PyTorchJob (api "pytorchjob", the default) or a Kubeflow Trainer v2 TrainJob with the
TrainingRuntime it references (api "trainjob").

Rendering runs the real `helm template` on the packaged chart (dvgt/k8s/chart = charts/dvgt) with
the job's values, so the SDK cannot drift from `helm install` or the ready manifests in k8s/: there
is one template, and tests/test_sdk_job.py checks, for every stage x profile, that the job equals
what a user gets from `helm template NAME charts/dvgt --set ...`. A job is checked before anything
is rendered or sent: its name, the chart's values.schema.json, then the Training Operator's
admission rules on the rendered PyTorchJob (Trainer v2's on the TrainJob and its runtime).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from dvgt.k8s import trainjob
from dvgt.k8s.catalog import CHART_DIR
from dvgt.k8s.pytorchjob import DNS1035, check_admission, load_pytorchjob
from dvgt.sdk.errors import InvalidJobError

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a namespace name

# TrainingJob field -> the chart value it sets (dotted path in values.yaml).
VALUE_OF_FIELD = {
    "api": "api",
    "stage": "stage",
    "profile": "profile",
    "nodes": "nodes",
    "gpus_per_node": "gpusPerNode",
    "images_per_step": "imagesPerStep",
    "max_images_per_forward": "maxImagesPerForward",
    "overrides": "overrides",
    "image": "image",
    "exporter_image": "exporter.image",
    "exporter": "exporter.enabled",
    "checkpoint_uri": "checkpoint.uri",
    "s3_secret": "checkpoint.s3Secret",
    "preemption_budget_s": "checkpoint.preemptionBudgetSeconds",
    "data_pvc": "data.pvc",
    "data_host_path": "data.hostPath",
    "data_root": "data.root",
    "restart_policy": "restartPolicy",
    "backoff_limit": "backoffLimit",
    "active_deadline_s": "activeDeadlineSeconds",
    "kueue_queue": "scheduling.kueueQueue",
    "kueue_priority_class": "scheduling.kueuePriorityClass",
    "runtime_name": "trainJob.runtime.name",
    "runtime_kind": "trainJob.runtime.kind",
    "create_runtime": "trainJob.runtime.create",
    "priority_class": "priorityClassName",
    "node_selector": "nodeSelector",
    "tolerations": "tolerations",
    "resources": "resources",
    "env": "extraEnv",
    "service_account": "serviceAccount.name",
}


def default_name(stage: str) -> str:
    """<stage>-<5 random letters/digits>: a DNS-1035 label (stage names start with a letter)."""
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    return f"{stage[:57].rstrip('-')}-{suffix}"


def image_values(image: str, what: str) -> dict[str, str]:
    """'registry:5000/dvgt/trainer:1.0' -> {registry: '', repository: registry:5000/dvgt/trainer, tag: '1.0'}
    (the reference names its registry, so the chart's default registry does not apply)."""
    if "@" in image:
        raise InvalidJobError(
            f"TrainingJob.{what} '{image}': the chart takes repository:tag, not a digest; "
            "push the image with a tag and give REPOSITORY:TAG"
        )
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return {"registry": "", "repository": repository, "tag": tag}


def format_override(key: str, value: Any) -> str:
    """One trainer override key=value; non-strings as JSON (5e-06, true, null, [1, 2]), which the
    trainer reads back as YAML."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
        )
    return out


@dataclass
class TrainingJob:
    """One training run: a stage of the chart's catalog sized by nodes, GPUs and a VRAM profile.

    Fields left at None take the chart's default (charts/dvgt/values.yaml, documented in
    charts/dvgt/README.md); `values` sets any other chart value (chart names, merged last)."""

    stage: str  # a stage of charts/dvgt/files/catalog.yaml, e.g. finetune-nuscenes
    api: str | None = None  # "pytorchjob" (Training Operator v1, the chart default) | "trainjob" (Trainer v2)
    nodes: int | None = None  # pods (1 Master + nodes-1 Workers); None: the stage's recipe
    gpus_per_node: int | None = None  # GPUs = torchrun processes per pod (chart default 8)
    profile: str | None = None  # VRAM profile of the catalog, e.g. h100-80g (chart default h20-146g)
    image: str | None = None  # trainer image REPOSITORY[:TAG] (chart default dvgt/trainer:<appVersion>)
    checkpoint_uri: str | None = None  # checkpoints go to <uri>/<name> (s3://bucket/prefix or a path in the pod)
    s3_secret: str | None = None  # existing Secret with the AWS_* variables ("" = none)
    overrides: Mapping[str, Any] | Sequence[str] = field(default_factory=dict)  # trainer config overrides
    name: str = ""  # the job's name (DNS-1035); "" (or None): <stage>-<random suffix>
    namespace: str | None = None  # None: the client's namespace (the kubeconfig context's)
    images_per_step: int | None = None  # images per GPU per optimizer step; None: the stage's recipe
    max_images_per_forward: int | None = None  # images per GPU per forward pass; None: the profile's
    exporter: bool | None = None  # the metrics exporter sidecar (chart default on)
    exporter_image: str | None = None  # exporter image REPOSITORY[:TAG]
    preemption_budget_s: int | None = None  # seconds to commit a final checkpoint after SIGTERM
    data_pvc: str | None = None  # PVC with the datasets ("" = none; chart default dvgt-data)
    data_host_path: str | None = None  # or a folder on every node (used when data_pvc is "")
    data_root: str | None = (
        None  # the trainer's data.root: a path in the pod or s3://bucket/prefix (cached on the node); None: the stage's
    )
    restart_policy: str | None = None  # OnFailure | ExitCode | Never
    backoff_limit: int | None = None  # restarts before the job fails
    active_deadline_s: int | None = None  # wall-clock limit of the job
    kueue_queue: str | None = None  # Kueue LocalQueue
    kueue_priority_class: str | None = None  # Kueue WorkloadPriorityClass
    runtime_name: str | None = None  # TrainJob: the runtime it references (chart default: the job's name)
    runtime_kind: str | None = None  # TrainJob: TrainingRuntime (chart default) | ClusterTrainingRuntime
    create_runtime: bool | None = None  # TrainJob: create the runtime with the job (chart default) or reference one
    priority_class: str | None = None  # PriorityClass of the pods
    node_selector: dict[str, str] | None = None  # node labels the pods must match
    tolerations: list[dict[str, Any]] | None = None  # pod tolerations (Kubernetes form)
    resources: dict[str, Any] | None = None  # cpu/memory requests and limits of the trainer container
    env: dict[str, str] | None = None  # extra env of the trainer (secrets only through `values` + valueFrom)
    service_account: str | None = None  # service account of the pods
    values: dict[str, Any] = field(default_factory=dict)  # any other chart value, e.g. {"rdma": {"enabled": True}}

    def __post_init__(self) -> None:
        if not self.name:
            self.name = default_name(self.stage)

    def to_values(self) -> dict[str, Any]:
        """The chart values this job sets (the chart's defaults fill in the rest)."""
        values: dict[str, Any] = {}
        for name, path in VALUE_OF_FIELD.items():
            value = getattr(self, name)
            if value is None or (name == "overrides" and not value):
                continue
            if name in ("image", "exporter_image"):
                value = image_values(value, name)
            elif name == "overrides":
                value = [format_override(k, v) for k, v in value.items()] if isinstance(value, Mapping) else list(value)
            elif name == "env":
                value = [{"name": k, "value": str(v)} for k, v in value.items()]
            *parents, leaf = path.split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        return deep_merge(values, self.values)

    def validate(self) -> dict[str, Any]:
        """Check the name, the namespace and the values against the chart's schema; the values."""
        if not DNS1035.match(self.name or ""):
            raise InvalidJobError(
                f"TrainingJob.name '{self.name}' is not a valid job name: use at most 63 "
                "lower-case letters, digits and '-', starting with a letter and ending with a letter or digit"
            )
        if self.namespace is not None and not DNS1123_LABEL.match(self.namespace):
            raise InvalidJobError(
                f"TrainingJob.namespace '{self.namespace}' is not a namespace name: use at most 63 "
                "lower-case letters, digits and '-'"
            )
        values = self.to_values()
        check_values(values)
        return values

    def objects(self) -> list[dict[str, Any]]:
        """What `helm template <name> charts/dvgt` renders with these values for the job, in creation
        order: the PyTorchJob; or the TrainingRuntime (when the job creates it) and the TrainJob."""
        from dvgt.k8s.generate import render

        values = self.validate()
        merged = deep_merge(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), values)
        if merged["api"] == "pytorchjob":
            templates = ["templates/pytorchjob.yaml"]
        else:
            templates = ["templates/trainjob.yaml"] + (
                ["templates/trainingruntime.yaml"] if merged["trainJob"]["runtime"]["create"] else []
            )
        try:
            text = render(self.name, {}, value_tree=values, namespace=self.namespace, show_only=templates)
            if merged["api"] == "pytorchjob":
                job = load_pytorchjob(text)
                check_admission(job)
                return [job]
            documents = trainjob.load_documents(text)
            job = next(d for d in documents if d["kind"] == "TrainJob")
            runtime = trainjob.find_runtime(job, documents)
            trainjob.check_admission(job, runtime, runtime_known=runtime is not None)  # else: the cluster's (Client)
            return ([runtime] if runtime is not None else []) + [job]
        except ValueError as error:
            raise InvalidJobError(f"job {self.name}: {error}") from None

    def render(self) -> dict[str, Any]:
        """The job (PyTorchJob or TrainJob), as `helm template <name> charts/dvgt` renders it with these values."""
        return self.objects()[-1]

    def to_yaml(self) -> str:
        """The job's objects as YAML documents (`dvgt submit --dry-run`; kubectl apply -f takes it)."""
        return yaml.safe_dump_all(self.objects(), sort_keys=False)


def check_values(values: dict[str, Any]) -> None:
    """The chart's values.schema.json on the chart's defaults merged with `values`; the first problem
    as an InvalidJobError naming the TrainingJob field (or the chart value) and what to do."""
    import jsonschema

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    merged = deep_merge(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), values)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(merged))
    if error is None:
        return
    path = ".".join(str(p) for p in error.absolute_path)
    fields_ = [f for f, v in VALUE_OF_FIELD.items() if path == v or path.startswith(v + ".")]
    where = f"TrainingJob.{fields_[0]}" if fields_ else f"chart value '{path or '(top level)'}' (TrainingJob.values)"
    if error.validator == "not":  # every `not` rule of the schema refuses a secret in the values
        problem = (
            f"{error.instance!r} looks like a secret; credentials never go into a job: pass them through "
            "an existing Secret (s3_secret, or extraEnv valueFrom.secretKeyRef in `values`)"
        )
    else:
        problem = f"{error.message}; see charts/dvgt/README.md for the value '{path}'"
    raise InvalidJobError(f"invalid {where}: {problem}")

"""What Kubeflow Trainer v2 (kubeflow/trainer v2.3.0, with JobSet and the Kubernetes Job controller)
does with a TrainJob before any pod runs: the admission rules of its webhooks, the runtime it
references, the pod each node gets (the runtime's pod with the TrainJob's trainer fields and runtime
patches applied) and the environment the torch plugin and the Job controller add. The local runner
reproduces it; the SDK checks a job with it before submitting. Sources are cited as file:line at
kubeflow/trainer tag v2.3.0 (commit 658725bd).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"  # pkg/constants/constants.go:41
NODE = "node"  # the trainer replicatedJob and its container (pkg/constants/constants.go:69)
MASTER_PORT = 29500  # constants.ContainerTrainerPort (pkg/constants/constants.go:72)
RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)  # constants.go:190-203
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Indexed Job's pod annotation and label
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def load_documents(source: str | Path) -> list[dict[str, Any]]:
    text = Path(source).read_text() if isinstance(source, Path) else source
    try:
        return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as error:
        raise ValueError(f"manifest {source if isinstance(source, Path) else ''} is not valid YAML: {error}") from None


def runtime_ref(trainjob: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of the runtime a TrainJob references (the CRD defaults kind to ClusterTrainingRuntime)."""
    ref = (trainjob.get("spec") or {}).get("runtimeRef") or {}
    return ref.get("kind", "ClusterTrainingRuntime"), ref.get("name", "")


def find_runtime(trainjob: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, Any] | None:
    kind, name = runtime_ref(trainjob)
    return next(
        (
            d
            for d in documents
            if d.get("apiVersion") == API_VERSION
            and d.get("kind") == kind
            and (d.get("metadata") or {}).get("name") == name
        ),
        None,
    )


def trainer_job(runtime: dict[str, Any]) -> dict[str, Any] | None:
    """The runtime's replicatedJob labelled trainjob-ancestor-step: trainer."""
    jobs = runtime["spec"]["template"]["spec"].get("replicatedJobs") or []
    return next(
        (
            j
            for j in jobs
            if ((j.get("template") or {}).get("metadata") or {}).get("labels", {}).get(ANCESTOR_LABEL) == "trainer"
        ),
        None,
    )


def admission_errors(trainjob: dict[str, Any], runtime: dict[str, Any] | None) -> list[str]:
    """The TrainJob and runtime webhooks (and what the controller would fail on), as a list of problems."""
    return job_errors(trainjob) + runtime_errors(trainjob, runtime)


def job_errors(trainjob: dict[str, Any]) -> list[str]:
    """The rules on the TrainJob alone."""
    errors = []
    if trainjob.get("apiVersion") != API_VERSION or trainjob.get("kind") != "TrainJob":
        errors.append(
            f"apiVersion/kind must be {API_VERSION} TrainJob, got {trainjob.get('apiVersion')} {trainjob.get('kind')}"
        )
    name = str((trainjob.get("metadata") or {}).get("name", ""))
    if not DNS1035.match(name):  # the CRD's CEL rules on metadata.name
        errors.append(
            f"metadata.name '{name}' must be a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )
    kind, _ = runtime_ref(trainjob)
    if kind not in RUNTIME_KINDS:  # pkg/webhooks/trainjob_webhook.go:114-117
        errors.append(f"spec.runtimeRef.kind '{kind}' is not supported ({', '.join(RUNTIME_KINDS)})")
    trainer = (trainjob.get("spec") or {}).get("trainer") or {}
    nodes = trainer.get("numNodes", 1)
    if not isinstance(nodes, int) or nodes < 1:  # it becomes the Job's parallelism and PET_NNODES (torch.go:116-118)
        errors.append(f"spec.trainer.numNodes must be at least 1, got {nodes}")
    reserved = sorted({e.get("name") for e in trainer.get("env") or []} & set(RESERVED_ENV))
    if reserved:  # pkg/runtime/framework/plugins/torch/torch.go:65-77
        errors.append(f"spec.trainer.env must not set the torch plugin's variables {reserved}")
    if isinstance(nodes, int) and len(f"{name}-{NODE}-0-{max(nodes - 1, 0)}-xxxxx") > 63:  # JobSet's pod names
        errors.append(
            f"metadata.name '{name}' is too long: its pods are named {name}-{NODE}-0-<index>-<5 characters>, "
            "at most 63 characters"
        )
    return errors


def runtime_errors(trainjob: dict[str, Any], runtime: dict[str, Any] | None) -> list[str]:
    """The rules on the runtime the TrainJob references (None: it is not there)."""
    kind, runtime_name = runtime_ref(trainjob)
    errors = []
    if runtime is None:  # pkg/runtime/core/trainingruntime.go:305-313
        errors.append(
            f"the {kind} '{runtime_name}' it references is not there: a TrainJob's runtime must exist before it"
        )
        return errors
    job = trainer_job(runtime)
    if job is None or job.get("name") != NODE:  # builder.go:113-141, torch.go:159-166
        errors.append(
            f"{kind} '{runtime_name}' needs a replicatedJob named '{NODE}' labelled {ANCESTOR_LABEL}: trainer"
        )
    elif job.get("replicas", 1) != 1:  # pkg/webhooks/trainingruntime_webhook.go:79-81
        errors.append(f"{kind} '{runtime_name}': the trainer replicatedJob must have replicas 1")
    elif not any(
        c.get("name") == NODE for c in pod_spec(job).get("containers") or []
    ):  # trainingruntime_webhook.go:88-101
        errors.append(f"{kind} '{runtime_name}': the trainer replicatedJob needs a container named '{NODE}'")
    return errors


def check_admission(trainjob: dict[str, Any], runtime: dict[str, Any] | None, runtime_known: bool = True) -> None:
    """Raise the problems as one ValueError; runtime_known False: the runtime is checked elsewhere (a cluster's)."""
    errors = admission_errors(trainjob, runtime) if runtime_known else job_errors(trainjob)
    if errors:
        raise ValueError("the TrainJob would be refused by Kubeflow Trainer: " + "; ".join(errors))


def pod_spec(replicated_job: dict[str, Any]) -> dict[str, Any]:
    return replicated_job["template"]["spec"]["template"].get("spec") or {}


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge as the runtime patches use it (trainingruntime.go:251-290): maps merge,
    lists of named objects (replicatedJobs, containers, env, volumes) merge by name, other values replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        merged = [dict(x) for x in base]
        for item in patch:
            at = next((i for i, x in enumerate(merged) if x["name"] == item["name"]), None)
            merged.append(item) if at is None else merged.__setitem__(at, strategic_merge(merged[at], item))
        return merged
    return patch


def upsert_env(env: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """apply.UpsertEnvVars: each item replaces the variable of its name, or is appended."""
    out = list(env)
    for item in items:
        at = next((i for i, e in enumerate(out) if e["name"] == item["name"]), None)
        out.append(item) if at is None else out.__setitem__(at, item)
    return out


def node_template(trainjob: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The trainer replicatedJob as the JobSet gets it: the runtime's, with the TrainJob's runtime patches
    merged in (trainingruntime.go:146-162) and its trainer fields on the `node` container: image, command,
    args (jobset/builder.go:128-137), env (torch.go:137-143) and resourcesPerNode (trainingruntime.go:199-219)."""
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    for patch in trainjob["spec"].get("runtimePatches") or []:
        patched = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec")
        if patched:
            spec = strategic_merge(spec, patched)
    trainer_template = trainer_job({"spec": {"template": {"spec": spec}}})
    assert trainer_template is not None, "admission_errors refuses a runtime without the trainer job"
    job = copy.deepcopy(trainer_template)
    trainer = trainjob["spec"].get("trainer") or {}
    for container in pod_spec(job).get("containers") or []:
        if container["name"] != NODE:
            continue
        for field in ("image", "command", "args"):
            if trainer.get(field) is not None:
                container[field] = trainer[field]
        container["env"] = upsert_env(container.get("env") or [], trainer.get("env") or [])
        if trainer.get("resourcesPerNode") is not None:
            container["resources"] = trainer["resourcesPerNode"]
    return job


def num_nodes(trainjob: dict[str, Any], runtime: dict[str, Any]) -> int:
    """The trainer's node count: the TrainJob's numNodes, else the runtime's mlPolicy (torch.go:116-118)."""
    trainer = trainjob["spec"].get("trainer") or {}
    return int(trainer.get("numNodes") or (runtime["spec"].get("mlPolicy") or {}).get("numNodes") or 1)


def nproc_per_node(trainjob: dict[str, Any], node: dict[str, Any]) -> str:
    """PET_NPROC_PER_NODE (torch.go:121-135): numProcPerNode, else "auto" with GPUs, else the CPU count."""
    value = (trainjob["spec"].get("trainer") or {}).get("numProcPerNode")
    if value is not None:
        return str(value)
    resources = node.get("resources") or {}
    if any("gpu" in k for k in {**(resources.get("limits") or {}), **(resources.get("requests") or {})}):
        return "auto"
    cpu = str((resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu") or "0")
    return str(max(1, int(float(cpu[:-1]) / 1000) if cpu.endswith("m") else int(float(cpu))))


def plugin_env(
    trainjob: dict[str, Any], runtime: dict[str, Any], index: int, master_addr: str, port: int
) -> dict[str, str]:
    """What each node's `node` container gets beyond its own env (torch.go:145-166): PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK (a fieldRef to the pod's job-completion-index annotation, so the
    node's index), PET_MASTER_ADDR (<job>-node-0-0.<job>: node 0's hostname in the JobSet's headless
    Service; here master_addr) and PET_MASTER_PORT (29500; here port); and JOB_COMPLETION_INDEX, which
    the Kubernetes Job controller sets in every container of an Indexed Job's pod."""
    node = next(c for c in pod_spec(node_template(trainjob, runtime))["containers"] if c["name"] == NODE)
    return {
        "PET_NNODES": str(num_nodes(trainjob, runtime)),
        "PET_NPROC_PER_NODE": nproc_per_node(trainjob, node),
        "PET_NODE_RANK": str(index),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(port),
        "JOB_COMPLETION_INDEX": str(index),
    }


def pod_fields(trainjob: dict[str, Any], index: int) -> dict[str, str]:
    """Downward-API fields of node `index`'s pod: the JobSet's labels (jobset name = TrainJob name) and
    the Indexed Job's completion index (label and annotation)."""
    name = trainjob["metadata"]["name"]
    return {
        "metadata.labels['jobset.sigs.k8s.io/jobset-name']": name,
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']": NODE,
        f"metadata.labels['{COMPLETION_INDEX}']": str(index),
        f"metadata.annotations['{COMPLETION_INDEX}']": str(index),
    }

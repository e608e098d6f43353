"""What the Kubeflow Training Operator (v1, release-1.9) does with a PyTorchJob before any pod runs:
its admission rules, and the environment it appends to every container of every replica
(../shared/ARCHITECTURE.md). The local runner reproduces both; tests check the chart against them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPLICA_TYPES = ("Master", "Worker")  # rank order: Master 0, Worker i -> node rank i + 1
CONTAINER = "pytorch"  # the container the operator configures (its default container name)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def load_pytorchjob(source: str | Path) -> dict[str, Any]:
    """The one PyTorchJob of a (multi-document) manifest file, or of YAML text."""
    text = Path(source).read_text() if isinstance(source, Path) else source
    try:
        documents = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as error:
        raise ValueError(f"manifest {source if isinstance(source, Path) else ''} is not valid YAML: {error}") from None
    jobs = [d for d in documents if d.get("kind") == "PyTorchJob"]
    if len(jobs) != 1:
        kinds = ", ".join(sorted({str(d.get("kind")) for d in documents})) or "nothing"
        raise ValueError(
            f"the manifest must hold exactly one PyTorchJob, it holds {len(jobs)} (kinds: {kinds}); "
            f"render one stage, e.g. helm template NAME charts/dvgt --set stage=dvgt1-demo"
        )
    return jobs[0]


def admission_errors(job: dict[str, Any]) -> list[str]:
    """The operator's validating webhook for PyTorchJob, as a list of problems (empty = admitted)."""
    errors = []
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        errors.append(
            f"apiVersion/kind must be kubeflow.org/v1 PyTorchJob, got {job.get('apiVersion')} {job.get('kind')}"
        )
    name = str((job.get("metadata") or {}).get("name", ""))
    if not DNS1035.match(name):
        errors.append(
            f"metadata.name '{name}' must be a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )
    spec = job.get("spec") or {}
    if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        errors.append("spec.elasticPolicy.nProcPerNode must not be used with spec.nprocPerNode")
    replicas = spec.get("pytorchReplicaSpecs")
    if not replicas:
        errors.append("spec.pytorchReplicaSpecs must be given")
        return errors
    for rtype, rspec in replicas.items():
        path = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in REPLICA_TYPES:
            errors.append(f"{path}: replica type '{rtype}' is not supported (Master, Worker)")
        containers = (((rspec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errors.append(f"{path}.template.spec.containers must be specified")
        for i, container in enumerate(containers):
            if not container.get("image"):
                errors.append(f"{path}.template.spec.containers[{i}].image must be specified")
        if containers and not any(c.get("name") == CONTAINER for c in containers):
            errors.append(f"{path}.template.spec.containers: there must be a container named '{CONTAINER}'")
        if rtype == "Master" and (rspec or {}).get("replicas") != 1:
            errors.append(f"{path}.replicas must be 1")
    return errors


def check_admission(job: dict[str, Any]) -> None:
    errors = admission_errors(job)
    if errors:
        raise ValueError("the PyTorchJob would be refused by the Training Operator: " + "; ".join(errors))


def replica_counts(job: dict[str, Any]) -> dict[str, int]:
    """Replicas per type, in rank order (a type without `replicas` has 1, as the operator defaults)."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    return {rtype: int(specs[rtype].get("replicas", 1)) for rtype in REPLICA_TYPES if rtype in specs}


def node_rank(counts: dict[str, int], rtype: str, index: int) -> int:
    return index + (counts.get("Master", 0) if rtype == "Worker" else 0)


def operator_env(job: dict[str, Any], rtype: str, index: int, master_addr: str, port: int) -> dict[str, str]:
    """The variables the operator appends to each container of a replica (no elasticPolicy)."""
    counts = replica_counts(job)
    nodes = sum(counts.values())
    nproc = str(job["spec"].get("nprocPerNode", "auto"))
    rank = str(node_rank(counts, rtype, index))
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": master_addr,
        "PET_MASTER_ADDR": master_addr,
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "WORLD_SIZE": str(nodes * int(nproc) if nproc.isdigit() else nodes),
        "RANK": rank,
        "PET_NODE_RANK": rank,
        "PET_NPROC_PER_NODE": nproc,
        "PET_NNODES": str(nodes),
    }

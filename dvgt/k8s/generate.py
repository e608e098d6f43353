"""Regenerate what the chart derives from its catalog: the stage and profile enums of
values.schema.json, the ready manifests k8s/<stage>.yaml (`helm template <stage> charts/dvgt
--set stage=<stage> --set monitoring.shared=true`, the chart's defaults otherwise), their Trainer v2 twins
k8s/trainjob/<stage>.yaml (a TrainJob referencing the TrainingRuntime `dvgt`) with that runtime in
k8s/trainjob/runtime.yaml, and the alert rules and dashboard that every job shares in k8s/monitoring.yaml.

    python -m dvgt.k8s.generate           # write them (`make manifests`)
    python -m dvgt.k8s.generate --check   # exit 1 and name the files that differ

Run it from a source checkout: it writes into the repository that holds charts/dvgt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvgt.k8s.catalog import CHART_DIR, load_catalog

MANIFEST_HEADER = (
    "# Generated from charts/dvgt by `make manifests` (helm template {stage} charts/dvgt --set stage={stage} "
    "--set monitoring.shared=true);\n# do not edit: change the chart and regenerate. Needs the PVC, the S3 "
    "Secret and the bucket named below;\n# alerts and dashboard: k8s/monitoring.yaml (once per namespace).\n"
)
JOB_VALUES = {"monitoring.shared": "true"}  # the rules and dashboard come once from k8s/monitoring.yaml
MONITORING_HEADER = (
    "# Generated from charts/dvgt by `make manifests` (helm template dvgt-monitoring charts/dvgt --set "
    "monitoring.only=true);\n# do not edit: change the chart and regenerate. The alert and recording rules "
    "and the Grafana dashboard\n# of every dvgt job: apply once per namespace (or once for the cluster).\n"
)
READY_RUNTIME = "dvgt"  # the TrainingRuntime of the ready TrainJobs (k8s/trainjob/runtime.yaml)
TRAINJOB_VALUES = {
    "api": "trainjob",
    "trainJob.runtime.create": "false",
    "trainJob.runtime.name": READY_RUNTIME,
    **JOB_VALUES,
}
TRAINJOB_HEADER = (
    "# Generated from charts/dvgt by `make manifests` (helm template {stage} charts/dvgt --set stage={stage} "
    "--set api=trainjob\n# --set trainJob.runtime.create=false --set trainJob.runtime.name=dvgt --set "
    "monitoring.shared=true); do not edit: "
    "change the chart and regenerate.\n# Needs the TrainingRuntime of runtime.yaml (kubectl apply -f "
    "k8s/trainjob/runtime.yaml, once per namespace).\n"
)
RUNTIME_HEADER = (
    "# Generated from charts/dvgt by `make manifests` (helm template dvgt charts/dvgt --set api=trainjob "
    "--show-only templates/trainingruntime.yaml);\n# do not edit: change the chart and regenerate. The "
    "TrainingRuntime every k8s/trainjob/<stage>.yaml references;\n# needs the PVC, the S3 Secret and the "
    "bucket named below.\n"
)


def find_helm() -> str:
    """helm from the running Python's environment (scripts/install-tools.sh puts it there), else PATH."""
    local = Path(sys.executable).parent / "helm"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("helm")
    if not found:
        raise FileNotFoundError("helm not found next to this Python or on PATH; run scripts/install-tools.sh")
    return found


def render(
    release: str,
    values: dict[str, str],
    chart: Path = CHART_DIR,
    value_tree: dict[str, Any] | None = None,
    namespace: str | None = None,
    show_only: str | Sequence[str] = (),
) -> str:
    """`helm template` of the chart with --set values (and a values tree, passed as a values file on
    stdin so that types survive; show_only: only these templates' output); errors carry helm's message."""
    command = [find_helm(), "template", release, str(chart)] + (["--namespace", namespace] if namespace else [])
    for template in [show_only] if isinstance(show_only, str) else show_only:
        command += ["--show-only", template]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    if value_tree is not None:
        command += ["--values", "-"]
    result = subprocess.run(
        command, capture_output=True, text=True, input=json.dumps(value_tree) if value_tree is not None else None
    )
    if result.returncode != 0:
        message = result.stderr.split("Use --debug flag")[0]  # helm's advice to itself is no help to a user
        raise ValueError(f"helm template {release} failed: {' '.join(message.split())}")
    return result.stdout


def schema_text(chart: Path = CHART_DIR) -> str:
    schema = json.loads((chart / "values.schema.json").read_text())
    catalog = load_catalog(chart / "files" / "catalog.yaml")
    schema["properties"]["stage"]["enum"] = list(catalog.stages)
    schema["properties"]["profile"]["enum"] = list(catalog.profiles)
    return json.dumps(schema, indent=2) + "\n"


def expected_files(chart: Path = CHART_DIR) -> dict[Path, str]:
    """Every generated file (path -> content); the schema first, since rendering validates against it."""
    root = chart.resolve().parent.parent
    files = {chart / "values.schema.json": schema_text(chart)}
    for stage in load_catalog(chart / "files" / "catalog.yaml").stages:
        files[root / "k8s" / f"{stage}.yaml"] = MANIFEST_HEADER.format(stage=stage) + render(
            stage, {"stage": stage, **JOB_VALUES}, chart
        )
        files[root / "k8s" / "trainjob" / f"{stage}.yaml"] = TRAINJOB_HEADER.format(stage=stage) + render(
            stage, {"stage": stage, **TRAINJOB_VALUES}, chart
        )
    files[root / "k8s" / "monitoring.yaml"] = MONITORING_HEADER + render(
        "dvgt-monitoring", {"monitoring.only": "true"}, chart
    )
    files[root / "k8s" / "trainjob" / "runtime.yaml"] = RUNTIME_HEADER + render(
        READY_RUNTIME, {"api": "trainjob"}, chart, show_only="templates/trainingruntime.yaml"
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvgt.k8s.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from the chart")
    args = parser.parse_args(argv)
    chart = CHART_DIR.resolve()
    if not args.check:  # the schema first: the manifests are rendered against it
        (chart / "values.schema.json").write_text(schema_text(chart))
    stale = []
    for path, text in expected_files(chart).items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

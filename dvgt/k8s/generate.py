"""Regenerate what the chart derives from its catalog: the stage and profile enums of
values.schema.json, the accumulation table files/accumulation.yaml the templates look up, the ready manifests
k8s/<stage>.yaml (`helm template <stage> charts/dvgt --set stage=<stage> --set monitoring.shared=true`, the
chart's defaults otherwise), their Trainer v2 twins k8s/trainjob/<stage>.yaml (a TrainJob referencing the
TrainingRuntime `dvgt`) with that runtime in k8s/trainjob/runtime.yaml, the alert rules and dashboard that every
job shares in k8s/monitoring.yaml, and the Markdown tables between `<!-- generated: NAME -->` and
`<!-- end generated -->` in README.md, charts/dvgt/README.md and docs/kubernetes.md (stages and profiles from the
catalog, exit codes from dvgt/train/exit_codes.py).

    python -m dvgt.k8s.generate           # write them (`make manifests`)
    python -m dvgt.k8s.generate --check   # exit 1 and name the files that differ

Run it from a source checkout: it writes into the repository that holds charts/dvgt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dvgt.config import accum_steps_for
from dvgt.k8s.catalog import CHART_DIR, Catalog, accumulation_table, load_catalog
from dvgt.train import exit_codes

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

ACCUMULATION_HEADER = (
    "# Generated from files/catalog.yaml by `make manifests` with the accumulation rule of dvgt/config.py\n"
    "# (accum_steps_for); do not edit. accumSteps.<stage>.<profile>: forward passes per optimizer step,\n"
    "# ceil(imagesPerStep / maxImagesPerForward). The templates look it up instead of computing it.\n"
)
# Markdown files (relative to the repository) and the tables generated into them, each between
# `<!-- generated: NAME -->` and `<!-- end generated -->`.
TABLE_DOCS = {
    "README.md": ("stages",),
    "charts/dvgt/README.md": ("stages", "profiles"),
    "docs/kubernetes.md": ("exit-codes",),
}
TABLE_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n).*?(<!-- end generated -->)", re.DOTALL)


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


def accumulation_text(catalog: Catalog) -> str:
    table = {"accumSteps": accumulation_table(catalog)}
    return ACCUMULATION_HEADER + yaml.safe_dump(table, sort_keys=False, default_flow_style=None, width=200)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(str(cell) for cell in line) + " |\n" for line in lines)


def markdown_tables(chart: Path = CHART_DIR) -> dict[str, str]:
    """The generated Markdown tables by block name."""
    catalog = load_catalog(chart / "files" / "catalog.yaml")
    defaults = yaml.safe_load((chart / "values.yaml").read_text())

    def named(name: str, key: str) -> str:
        return f"{name} (default)" if defaults[key] == name else name

    stages = markdown_table(
        ["stage", "model", "config", "max_img_per_gpu (images per GPU per optimizer step)", "recipe pods"],
        [[named(s.name, "stage"), s.model, s.config, s.images_per_step, s.nodes] for s in catalog.stages.values()],
    )
    per_step = sorted({s.images_per_step for s in catalog.stages.values()}, reverse=True)
    profiles = markdown_table(
        [
            "profile",
            "GPU memory",
            "images per forward",
            *(f"accum_steps at max_img_per_gpu {n}" for n in per_step),
            "status",
        ],
        [
            [
                named(p.name, "profile"),
                f"{p.memory_gib:g} GiB" if p.memory_gib else "-",
                p.max_images_per_forward,
                *(accum_steps_for(n, p.max_images_per_forward) for n in per_step),
                p.note,
            ]
            for p in catalog.profiles.values()
        ],
    )
    codes = markdown_table(
        ["code", "meaning", "a restart helps", "under `restartPolicy: ExitCode`"],
        [
            [
                c.code,
                c.meaning,
                "-" if c.code == 0 else "yes" if c.retryable else "no",
                "-" if c.code == 0 else "retried (128-255)" if c.retryable else "the job fails (1-127)",
            ]
            for c in exit_codes.CODES
        ],
    )
    return {"stages": stages, "profiles": profiles, "exit-codes": codes}


def filled_markdown(path: Path, tables: dict[str, str], names: Sequence[str]) -> str:
    """`path` with its generated blocks replaced by their tables: exactly the blocks `names`, each once."""
    text = path.read_text()
    found = [match["name"] for match in TABLE_BLOCK.finditer(text)]
    if sorted(found) != sorted(names):
        raise ValueError(
            f"{path} has the generated blocks {found or 'none'}, not {list(names)}: put each table between "
            "`<!-- generated: NAME -->` and `<!-- end generated -->` lines"
        )
    return TABLE_BLOCK.sub(lambda m: m.group(1) + tables[m["name"]] + m.group(3), text)


def expected_files(chart: Path = CHART_DIR) -> dict[Path, str]:
    """Every generated file (path -> content); the schema and the accumulation table first, since rendering
    validates against the one and reads the other."""
    root = chart.resolve().parent.parent
    files = {
        chart / "values.schema.json": schema_text(chart),
        chart / "files" / "accumulation.yaml": accumulation_text(load_catalog(chart / "files" / "catalog.yaml")),
    }
    tables = markdown_tables(chart)
    for doc, names in TABLE_DOCS.items():
        files[root / doc] = filled_markdown(root / doc, tables, names)
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
    if not args.check:  # the schema and the accumulation table first: the manifests are rendered with them
        (chart / "values.schema.json").write_text(schema_text(chart))
        (chart / "files" / "accumulation.yaml").write_text(
            accumulation_text(load_catalog(chart / "files" / "catalog.yaml"))
        )
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

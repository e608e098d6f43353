"""The SDK's commands of `dvgt`: submit, status, wait, logs, delete, list (added to the parser by
dvgt/cli.py). Each one is a thin layer over dvgt.sdk.Client; errors are SdkErrors, printed as one line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _key_value(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return text


def _client(args: argparse.Namespace):
    from dvgt.sdk import Client

    backend = "local" if args.local else args.backend
    return Client(backend, namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context, api=args.api)


def job_from_args(args: argparse.Namespace):
    """The TrainingJob the submit flags describe."""
    import yaml

    from dvgt.sdk import TrainingJob

    values: dict[str, Any] = {}
    if args.values:
        values = yaml.safe_load(Path(args.values).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--values {args.values}: expected a YAML mapping of chart values")
    return TrainingJob(
        stage=args.stage,
        api=args.api,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        profile=args.profile,
        image=args.image,
        exporter_image=args.exporter_image,
        checkpoint_uri=args.checkpoint_uri,
        s3_secret=args.s3_secret,
        data_pvc=args.data_pvc,
        data_host_path=args.data_host_path,
        data_root=args.data_root,
        overrides=list(args.set),
        name=args.name or "",
        namespace=args.namespace,
        values=values,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    if args.dry_run:
        sys.stdout.write(job.to_yaml())
        return 0
    client = _client(args)
    name = client.submit(job, replace=args.replace)
    where = f" in namespace {client.namespace}" if client.namespace else " on this machine"
    flags = " --local" if client.kind == "local" else (f" -n {client.namespace}" if args.namespace else "")
    flags += " --api trainjob" if args.api == "trainjob" else ""
    print(
        f"submitted {'TrainJob' if args.api == 'trainjob' else 'job'} {name}{where} (stage {job.stage})\n"
        f"follow it: dvgt wait {name}{flags} --for running; dvgt logs {name}{flags} -f; dvgt status {name}{flags}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).status(args.name)
    print(json.dumps(status.to_dict(), indent=1) if args.json else status.describe())
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait with a live one-line view (redrawn on a terminal, one line per change otherwise)."""
    from dvgt.sdk import JobFailedError

    client, started = _client(args), time.monotonic()
    timeout = args.timeout or None  # 0: no limit
    line = lambda status: f"{status.summary()}  [{time.monotonic() - started:.0f} s, waiting for {args.until}]"  # noqa: E731
    try:
        if sys.stdout.isatty():
            from rich.live import Live

            with Live("", refresh_per_second=4, transient=False) as live:
                status = client.wait(
                    args.name,
                    until=args.until,
                    timeout=timeout,
                    poll_s=args.poll,
                    callback=lambda s: live.update(line(s)),
                )
        else:
            seen: list[str] = []

            def show(status) -> None:
                if not seen or seen[-1] != status.summary():
                    seen.append(status.summary())
                    print(line(status), flush=True)

            status = client.wait(args.name, until=args.until, timeout=timeout, poll_s=args.poll, callback=show)
    except JobFailedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"job {args.name} is {status.phase}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    for line in _client(args).logs(args.name, follow=args.follow, replica=args.replica, index=args.index):
        print(line, flush=args.follow)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete(args.name)
    print(f"deleted job {args.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    jobs = _client(args).list()
    rows = [("NAME", "PHASE", "STAGE", "PODS")] + [
        (
            s.name,
            s.phase,
            s.stage or "?",
            f"{sum(r.active for r in s.replicas.values())}/"
            f"{sum(r.active + r.succeeded + r.failed for r in s.replicas.values())}",
        )
        for s in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _client_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where the job runs")
    where.add_argument(
        "--backend",
        choices=("cluster", "local"),
        default="cluster",
        help="cluster: the kubeconfig's cluster (or in-cluster); local: this machine (the local runner)",
    )
    where.add_argument("--local", action="store_true", help="same as --backend local")
    where.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    where.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    where.add_argument("--context", help="kubeconfig context (default: the current one)")
    where.add_argument(
        "--api",
        choices=("pytorchjob", "trainjob"),
        default="pytorchjob",
        help="the job kind: pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow Trainer v2)",
    )


def add_commands(sub) -> None:
    """Add submit / status / wait / logs / delete / list to the `dvgt` subparsers."""
    from dvgt.sdk.client import WAIT_FOR

    submit = sub.add_parser(
        "submit",
        help="submit a training job (a PyTorchJob, or with --api trainjob a TrainJob and its "
        "runtime, rendered by the chart); --dry-run prints it",
    )
    submit.add_argument(
        "--stage", required=True, help="stage of charts/dvgt/files/catalog.yaml, e.g. finetune-nuscenes"
    )
    submit.add_argument("--nodes", type=int, help="pods (default: the stage's recipe)")
    submit.add_argument("--gpus-per-node", type=int, help="GPUs (processes) per pod (chart default 8)")
    submit.add_argument("--profile", help="VRAM profile, e.g. h100-80g (chart default h20-146g)")
    submit.add_argument("--image", help="trainer image REPOSITORY[:TAG]")
    submit.add_argument("--exporter-image", help="metrics exporter image REPOSITORY[:TAG]")
    submit.add_argument("--checkpoint-uri", help="checkpoints go to URI/<name> (s3://bucket/prefix)")
    submit.add_argument("--s3-secret", help="existing Secret with the AWS_* variables ('' = none)")
    submit.add_argument("--data-pvc", help="PVC with the datasets ('' = none)")
    submit.add_argument("--data-host-path", help="or a folder on every node (with --data-pvc '')")
    submit.add_argument(
        "--data-root",
        help="the trainer's data.root: a path in the pod or s3://bucket/prefix "
        "(read through a node-local cache; with --data-pvc '' when no claim is needed)",
    )
    submit.add_argument("--name", help="job name (default: <stage>-<random suffix>)")
    submit.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="trainer config override, e.g. --set optim.lr=5e-6 (repeat it)",
    )
    submit.add_argument(
        "--values", metavar="FILE", help="YAML of any other chart values (charts/dvgt/values.yaml names)"
    )
    submit.add_argument("--replace", action="store_true", help="delete a job of the same name first")
    submit.add_argument(
        "--dry-run", action="store_true", help="print the job's YAML (a TrainJob's runtime first); nothing is sent"
    )
    _client_args(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="a job's conditions, pods, last step and newest committed checkpoint")
    status.add_argument("name")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    _client_args(status)
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser("wait", help="wait for a job to succeed (or --for another state), with a live status line")
    wait.add_argument("name")
    wait.add_argument(
        "--for",
        "--until",
        dest="until",
        default="Succeeded",
        type=str.capitalize,
        choices=WAIT_FOR,
        metavar="STATE",
        help=f"the state to wait for: {', '.join(s.lower() for s in WAIT_FOR)} "
        "(default succeeded; failing first is an error, exit 1)",
    )
    wait.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up after this many seconds (exit 2; default 600, 0 = no limit)",
    )
    wait.add_argument("--poll", type=float, default=2.0, help="seconds between two looks at the job")
    _client_args(wait)
    wait.set_defaults(func=cmd_wait)

    logs = sub.add_parser("logs", help="the trainer's output of one pod (the Master's by default)")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the container ends")
    logs.add_argument("--replica", default="master", choices=("master", "worker"))
    logs.add_argument("--index", type=int, default=0, help="replica index (worker-0 is node rank 1)")
    _client_args(logs)
    logs.set_defaults(func=cmd_logs)

    delete = sub.add_parser("delete", help="stop and delete a job (its pods go with it; checkpoints stay)")
    delete.add_argument("name")
    _client_args(delete)
    delete.set_defaults(func=cmd_delete)

    listing = sub.add_parser("list", help="the jobs of the namespace (or of this machine with --local)")
    _client_args(listing)
    listing.set_defaults(func=cmd_list)

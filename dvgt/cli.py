"""The `dvgt` command line: train, model-info, profile-memory, data, anchors, ckpt, cache, demo, infer,
exporter, local-run, and the SDK's submit, status, wait, logs, delete, list (dvgt/sdk/commands.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from dvgt.config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="stage config, e.g. train/dvgt1/demo.yaml (packaged configs first, then the working directory)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def cmd_train(args: argparse.Namespace) -> int:
    from dvgt.train import exit_codes
    from dvgt.train.loop import train

    cfg = load_config(args.config, args.overrides, debug=args.debug)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"finished": not result["preempted"], **result}))
    if result["preempted"]:
        return exit_codes.PREEMPTED
    return exit_codes.TEMPORARY if result["spilled"] else exit_codes.FINISHED


def cmd_model_info(args: argparse.Namespace) -> int:
    from dvgt.families import model_layout

    cfg = load_config(args.config, args.overrides)
    layout = model_layout(cfg.model)
    if args.json:
        print(json.dumps({"model": cfg.model.name, "size": cfg.model.size, **layout}))
        return 0
    by_module: dict = {}
    for key, (shape, _) in layout["state_dict"].items():
        count = 1
        for dim in shape:
            count *= dim
        by_module[key.split(".")[0]] = by_module.get(key.split(".")[0], 0) + count
    print(
        f"{cfg.model.name} ({cfg.model.size}): {layout['num_parameters']:,} parameters, "
        f"{len(layout['state_dict'])} state_dict entries"
    )
    for module, count in by_module.items():
        print(f"  {module:<20} {count:>15,}")
    return 0


def cmd_profile_memory(args: argparse.Namespace) -> int:
    from dvgt.train.profile_memory import profile_memory

    cfg = load_config(args.config, args.overrides)
    print("\n".join(profile_memory(cfg, margin=args.margin, out=args.out, frames=args.frames)))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from dvgt.data.synthetic import demo_spec, generate_synthetic_dataset

    for split in args.splits:
        started = time.perf_counter()
        spec = {**demo_spec(split), **({"num_scenes": args.scenes} if args.scenes else {})}
        path = generate_synthetic_dataset(args.out, split=split, **spec)
        print(f"wrote the {split} split of dataset demo: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from tqdm import tqdm

    from dvgt.data import check

    if args.config:
        targets = check.targets_of_config(load_config(args.config, args.positional).data)
        if args.dataset or args.split:
            targets = [t for t in targets if args.dataset in (None, t.dataset) and args.split in (None, t.split)]
    elif len(args.positional) == 1:
        targets = check.targets_of_tree(args.positional[0], args.dataset, args.split)
    else:
        raise ValueError(
            "dvgt data check: give one tree root (the folder holding data_annotation/), or --config "
            "STAGE [key=value ...] to check the trees a stage reads"
        )
    with tqdm(desc="decoding", unit="file", disable=not args.deep or not sys.stderr.isatty()) as bar:
        reports = check.check(targets, deep=args.deep, jobs=args.jobs, progress=bar.update)
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs: the whole table
    console.print(check.summary_table(reports, args.deep))
    problems = check.first_problems(reports, args.show)
    total = sum(r.num_problems for r in reports)
    if total:
        console.print(f"[red]{total:,} problem(s)[/red]; the first {len(problems)}:", highlight=False)
        for problem in problems:
            console.print(f"  {problem}", highlight=False, markup=False, soft_wrap=True)
    return 1 if total else 0


def cmd_data_dump(args: argparse.Namespace) -> int:
    from dvgt.data.dump import dump_samples

    for line in dump_samples(args.root, args.manifest, args.out):
        print(line)
    return 0


def cmd_data_metrics(args: argparse.Namespace) -> int:
    from dvgt.data.dump import score_metric_cases

    for line in score_metric_cases(args.cases, args.out):
        print(line)
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    from dvgt.data.anchors import PLOT_FILE, training_tables, write_anchors
    from dvgt.data.remote import is_s3

    cfg = load_config(args.config, args.overrides)
    if not (args.out or cfg.model.anchor_dir) and is_s3(cfg.data.root):
        raise ValueError(
            f"data.root is {cfg.data.root}: the anchors are written to a local folder; name it with "
            f"--out DIR (or model.anchor_dir) and upload it beside the tree if the runs read it there"
        )
    out = Path(args.out or cfg.model.anchor_dir or Path(cfg.data.root) / "data_annotation/anchors/train_total_20")
    write_anchors(training_tables(cfg), out, k=args.k)
    print(f"wrote {out}/future_anchors_{args.k}_rdf.npz, past_anchors_{args.k}_rdf.npz and {out / PLOT_FILE}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dvgt.demo import run_demo

    run_demo(args.config, args.out, args.overrides, metrics_port=args.metrics_port)
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    from dvgt.metrics.exporter import serve  # no torch: the sidecar starts in a fraction of a second

    if not args.dir:
        raise ValueError("dvgt exporter needs the trainer's metrics folder: pass --dir or set PROMETHEUS_MULTIPROC_DIR")
    serve(args.dir, port=args.port, host=args.host, job=args.job)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from dvgt.infer import infer

    infer(
        args.checkpoint,
        args.frames,
        args.out,
        window=args.window,
        width=args.width,
        config=args.config,
        overrides=args.overrides,
        seed=args.seed,
    )
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    from dvgt.checkpoint import tools

    ok = True
    if args.ckpt_command == "ls":
        lines = tools.ls(args.uri, spill=args.spill)
    elif args.ckpt_command == "show":
        lines = tools.show(args.uri)
    elif args.ckpt_command == "verify":
        lines, ok = tools.verify_location(args.uri, all_steps=args.all)
    elif args.ckpt_command == "export":
        lines = tools.export(args.uri, args.out)
    else:
        lines = tools.prune(args.uri, args.keep, dry_run=args.dry_run)
    print("\n".join(lines))
    return 0 if ok else 1


def cmd_cache(args: argparse.Namespace) -> int:
    if args.cache_command == "verify":
        from dvgt.checkpoint.storage import open_storage
        from dvgt.train.feature_cache import verify_cache

        print(f"{args.uri}: {verify_cache(open_storage(args.uri))}")
        return 0
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:  # one rank per process, via torchrun
        import subprocess

        command = [
            sys.executable,
            "-m",
            "dvgt.train.launch",
            "--standalone",
            f"--nproc_per_node={args.nproc_per_node}",
            "-m",
            "dvgt",
            "cache",
            "build",
            f"--config={args.config}",
            "--out",
            args.out,
            f"--shard-mb={args.shard_mb}",
            *(["--verify"] if args.verify else []),
            *([f"--part={args.part}"] if args.part else []),
            f"--dtype={args.dtype}",
            *args.overrides,
        ]
        return subprocess.run(command).returncode
    from dvgt.train import distributed
    from dvgt.train.feature_cache import build_cache

    cfg = load_config(args.config, args.overrides)
    try:
        build_cache(cfg, args.out, part=args.part, dtype=args.dtype, shard_mb=args.shard_mb, verify=args.verify)
    finally:
        distributed.cleanup()
    return 0


def _key_value(text: str) -> tuple:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return tuple(text.split("=", 1))


def cmd_local_run(args: argparse.Namespace) -> int:
    from dvgt.k8s.local_runner import Options, read_env_file, run_manifest

    options = Options(
        workdir=Path(args.workdir),
        volumes={k: Path(v) for k, v in args.volume},
        secrets={k: read_env_file(Path(v)) for k, v in args.secret},
        env=dict(args.env),
        overrides=[f"{k}={v}" for k, v in args.override],
        nproc_per_node=args.nproc_per_node,
        replicas={k: int(v) for k, v in args.replicas},
        restart_delay_s=args.restart_delay,
        targets_file=Path(args.targets_file) if args.targets_file else None,
    )
    return run_manifest(args.manifest, options, [Path(f) for f in args.runtime])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "dvgt", description="DVGT / VGGT training")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a stage (single process, or one rank under torchrun)")
    _add_config_args(train)
    train.add_argument(
        "--debug", action="store_true", help="few batches, log every step, save every epoch, no data workers"
    )
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("model-info", help="parameter count and state_dict layout (no weights allocated)")
    _add_config_args(info)
    info.add_argument("--json", action="store_true", help="print the layout as JSON (num_parameters, state_dict)")
    info.set_defaults(func=cmd_model_info)

    profile = sub.add_parser(
        "profile-memory",
        help="measure peak GPU memory per image and print the largest "
        "images per forward pass for each VRAM profile (needs a GPU); with model.device_map or "
        "distributed.pipeline.stages, each GPU's share of the split (accounted, no GPU needed)",
    )
    _add_config_args(profile)
    profile.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="share of GPU memory kept free (fragmentation, CUDA context, other processes)",
    )
    profile.add_argument(
        "--out", help="also write the measurements, card, driver and torch version as JSON (docs/distributed.md)"
    )
    profile.add_argument(
        "--frames",
        type=int,
        default=2,
        help="with model.device_map or distributed.pipeline.stages: frames of the clip per forward pass",
    )
    profile.set_defaults(func=cmd_profile_memory)

    data = sub.add_parser("data", help="dataset tools (the official DVGT format, docs/data.md)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic driving dataset (dataset demo) as an official tree")
    synth.add_argument("--out", required=True, help="tree root (the folder that gets data_annotation/)")
    synth.add_argument("--splits", nargs="+", default=["train", "val"])
    synth.add_argument("--scenes", type=int, default=0, help="scenes per split (default: the demo's)")
    synth.set_defaults(func=cmd_data_synth)
    data_check = data_sub.add_parser(
        "check",
        help="scan an official tree: per dataset and split, scenes, frames, "
        "cameras, rows, image and depth files present / missing (/ unreadable with "
        '--deep); exit code 1 on any problem (docs/data.md, "Checking a tree")',
    )
    data_check.add_argument(
        "positional",
        nargs="*",
        metavar="ROOT | key.path=value",
        help="the tree's root (the folder holding data_annotation/); with --config: overrides",
    )
    data_check.add_argument(
        "--config",
        help="check the trees a stage config reads (data.train and data.val), as the "
        "trainer reads them, instead of every parquet of one ROOT",
    )
    data_check.add_argument("--dataset", help="only this dataset (the parquet's prefix, e.g. nuscene)")
    data_check.add_argument("--split", help="only this split (e.g. val)")
    data_check.add_argument(
        "--deep",
        action="store_true",
        help="also decode every image and depth PNG (near/far "
        "present, sizes agree) and check every rotation is orthonormal",
    )
    data_check.add_argument("--jobs", type=int, default=None, help="decoding threads with --deep (default: CPUs)")
    data_check.add_argument("--show", type=int, default=20, help="offending files listed (all are counted)")
    data_check.set_defaults(func=cmd_data_check)
    dump = data_sub.add_parser(
        "dump",
        help="build the samples a manifest lists (official constructor arguments) with "
        "our loader and write them under the official key names, to compare with the "
        "official code's outputs (../shared/tools/check_data.py)",
    )
    dump.add_argument(
        "root", help="the official tree's root (the official working directory): a folder or s3://bucket/prefix"
    )
    dump.add_argument("--manifest", required=True, help="a samples_manifest.txt (JSON)")
    dump.add_argument("--out", required=True, help="output folder; each sample goes to OUT/<its file in the manifest>")
    dump.set_defaults(func=cmd_data_dump)
    scores = data_sub.add_parser(
        "metrics",
        help="score every case_*.npz (an official metric function's inputs) with our metrics into case_*.json",
    )
    scores.add_argument("cases", help="folder of case_*.npz")
    scores.add_argument("--out", required=True, help="output folder of case_*.json")
    scores.set_defaults(func=cmd_data_metrics)

    anchors = sub.add_parser(
        "anchors",
        help="k-means anchors of future trajectories and past translations (DVGT-2), "
        "as the official tool makes them, from a stage's training data",
    )
    _add_config_args(anchors)
    anchors.add_argument("--out", default=None, help="anchor folder (default: the config's model.anchor_dir)")
    anchors.add_argument("--k", type=int, default=20, help="anchors per set")
    anchors.set_defaults(func=cmd_anchors)

    ckpt = sub.add_parser("ckpt", help="list, inspect, verify, export and prune checkpoints (local or s3://)")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    where = "checkpoint location (a folder, file:// or s3://bucket/prefix), or one checkpoint: <location>/step_NNNNNNNN"
    for name, text in (
        ("ls", "committed checkpoints: step, size, age, where (unreadable ones marked)"),
        ("show", "one checkpoint (default: the newest): manifest, objects, model, config"),
        ("verify", "check every object's size and xxh3_128 (exit code 1 names the bad objects)"),
        ("export", "one model.safetensors plus config.yaml, to a folder or URI"),
        ("prune", "keep the newest K committed checkpoints; remove uncommitted leftovers"),
    ):
        command = ckpt_sub.add_parser(name, help=text)
        command.add_argument("uri", help=where)
        command.set_defaults(func=cmd_ckpt)
    ckpt_sub.choices["ls"].add_argument(
        "--spill",
        metavar="DIR",
        help="also list checkpoints spilled to this local "
        "folder (the trainer's checkpoint.spill_dir) for this location",
    )
    ckpt_sub.choices["verify"].add_argument("--all", action="store_true", help="every committed checkpoint")
    ckpt_sub.choices["export"].add_argument("--out", required=True, help="destination folder or URI")
    ckpt_sub.choices["prune"].add_argument("--keep", type=int, required=True, help="committed checkpoints to keep")
    ckpt_sub.choices["prune"].add_argument("--dry-run", action="store_true", help="only say what would go")

    cache = sub.add_parser(
        "cache",
        help="frozen-feature cache: precompute the outputs of the frozen backbone or "
        "aggregator (docs/feature-cache.md)",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    build = cache_sub.add_parser(
        "build",
        help="compute the frozen part's outputs for every training image (backbone) "
        "or clip (aggregator) once (resumable; under torchrun each rank builds its share "
        "of the shards)",
    )
    _add_config_args(build)
    build.add_argument(
        "--out",
        required=True,
        help="cache location: a folder, file:// or s3://bucket/prefix (then train with data.feature_cache=<it>)",
    )
    build.add_argument(
        "--verify",
        action="store_true",
        help="then check every shard's sha256 and recompute a few entries against the model",
    )
    build.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB")
    build.add_argument(
        "--part",
        choices=["backbone", "aggregator"],
        help="what to cache (default: the largest "
        "frozen prefix: the aggregator if optim.frozen_module_names freezes all of it, else the backbone)",
    )
    build.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="how outputs are "
        "stored: float32 (training gives the losses of live computation) or bfloat16 (half the "
        "storage, rounded to 8 mantissa bits)",
    )
    build.add_argument("--nproc-per-node", type=int, default=1, help="build with N processes (torchrun)")
    build.set_defaults(func=cmd_cache)
    verify = cache_sub.add_parser("verify", help="check every shard's size and sha256 against the manifest")
    verify.add_argument("uri", help="cache location")
    verify.set_defaults(func=cmd_cache)

    demo = sub.add_parser("demo", help="train the DVGT-1 demo on CPU and draw the result")
    demo.add_argument("--config", default="train/dvgt1/demo.yaml")
    demo.add_argument("--out", default="runs/demo", help="folder for data, checkpoints, log and figure")
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="serve the run's Prometheus metrics on 127.0.0.1:PORT while it trains (0: a free port)",
    )
    demo.add_argument("overrides", nargs="*", metavar="key.path=value")
    demo.set_defaults(func=cmd_demo)

    infer = sub.add_parser(
        "infer",
        help="DVGT-2 streaming inference over frame_k/CAM_*.jpg folders: point maps, "
        "poses, planned trajectory (npz + json) and a bird's-eye-view PNG",
    )
    infer.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint location (latest step), a step_NNNNNNNN "
        "folder, or a weights file (.pt/.pth/.safetensors, then --config names the architecture)",
    )
    infer.add_argument("--frames", required=True, help="folder of frame_<k>/ subfolders with one image per camera")
    infer.add_argument("--window", type=int, default=4, help="frames the model attends to (sliding window)")
    infer.add_argument("--out", default="runs/infer", help="output folder")
    infer.add_argument("--config", help="training config of the architecture (default: the checkpoint's own)")
    infer.add_argument("--width", type=int, default=512, help="image width fed to the model (height keeps the aspect)")
    infer.add_argument("--seed", type=int, default=0, help="seed of the planning decoder's starting noise")
    infer.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. model.size=tiny")
    infer.set_defaults(func=cmd_infer)

    exporter = sub.add_parser("exporter", help="serve the trainer's Prometheus metrics and per-GPU NVML readings")
    exporter.add_argument("--port", type=int, default=9400)
    exporter.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only; the chart's sidecar listens on the pod's interfaces)",
    )
    exporter.add_argument(
        "--dir",
        default=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
        help="the trainer's metrics folder (default: $PROMETHEUS_MULTIPROC_DIR)",
    )
    exporter.add_argument("--job", default=None, help="dvgt_job label of the GPU series (default: $DVGT_JOB_NAME)")
    exporter.set_defaults(func=cmd_exporter)

    local = sub.add_parser(
        "local-run", help="run a PyTorchJob or TrainJob manifest on this machine (each replica as local processes)"
    )
    local.add_argument(
        "manifest",
        help="a manifest holding one PyTorchJob or TrainJob, e.g. k8s/dvgt1-demo.yaml or "
        "k8s/trainjob/dvgt1-demo.yaml ('-' = stdin)",
    )
    local.add_argument(
        "--runtime",
        action="append",
        default=[],
        metavar="FILE",
        help="a manifest with the TrainJob's runtime when the job's manifest lacks it (default: the "
        "YAML files beside the manifest, e.g. k8s/trainjob/runtime.yaml)",
    )
    local.add_argument(
        "--workdir", default="runs/local-run", help="folder of the pods' files (emptyDirs, working directories)"
    )
    local.add_argument(
        "--volume",
        type=_key_value,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a local folder for the pod volume NAME (PVC, hostPath)",
    )
    local.add_argument(
        "--secret",
        type=_key_value,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="the keys of Secret (or ConfigMap) NAME, as KEY=VALUE lines (default: this environment)",
    )
    local.add_argument(
        "--env",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an env variable in every container",
    )
    local.add_argument(
        "--override",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trainer config override appended to the pytorch container's args",
    )
    local.add_argument("--nproc-per-node", type=int, help="processes per pod (replaces nprocPerNode)")
    local.add_argument(
        "--replicas",
        type=_key_value,
        action="append",
        default=[],
        metavar="TYPE=N",
        help="replica count of Master or Worker (Worker=0: the master alone); TrainJob: node=N",
    )
    local.add_argument(
        "--restart-delay",
        type=float,
        default=10.0,
        help="seconds before a container restarts in place (doubles per restart, like the kubelet)",
    )
    local.add_argument("--targets-file", help="write the sidecars' local ports as a Prometheus file_sd target list")
    local.set_defaults(func=cmd_local_run)

    from dvgt.sdk.commands import add_commands  # submit, status, wait, logs, delete, list (no torch, no kubernetes)

    add_commands(sub)
    return parser


# Errors reported as one line, without a traceback (DVGT_TRACEBACK=1 shows it); any other is a crash (exit 1).
USER_ERRORS = (ConfigError, OSError, NotImplementedError, ValueError, RuntimeError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (an error re-raised from a data worker carries the worker's
    traceback: its last line is the message)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def exit_process(code: int, program: bool = True) -> NoReturn:
    """sys.exit(code), unless this is the program (not a caller of main() such as a test) and native
    threads may still run: a background thread of ours (a checkpoint upload that outlived the
    trainer's wait for it), or the threads of a torch.distributed process group (a rank of a torchrun
    job). Caught inside native code while the interpreter shuts down, they abort the process
    ("terminate called without an active exception", exit 134: a needless restart, seen on a rank
    of a finished 2-rank job) instead of exiting with `code`. Then the output is flushed and the
    process ends at once (os._exit); everything it wrote is closed already, and an upload still
    running is abandoned uncommitted, as a killed one would be."""
    ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun for each rank
    if program and (
        ranked
        or any(
            thread.daemon and thread.is_alive() and thread.name.startswith("dvgt-") for thread in threading.enumerate()
        )
    ):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    program = argv is None or prog is not None  # the `dvgt` command or `python -m dvgt.train`, not a caller
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog is not None:  # `python -m dvgt.train ...` passes ["train"] and reads the rest from sys.argv
        argv = argv + sys.argv[1:]
    args = build_parser(prog).parse_args(argv)
    try:
        code = args.func(args)
    except USER_ERRORS as error:
        from dvgt.train.exit_codes import for_error

        if os.environ.get("DVGT_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        code = for_error(error)  # 2, or 203 where a restart can help (dvgt/train/exit_codes.py)
    except Exception:  # a crash: the traceback, then exit 1 the same way as every other outcome
        traceback.print_exc()
        code = 1
    exit_process(code, program)

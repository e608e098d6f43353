"""The `dvgt` command line: train, model-info, data, demo, local-run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from dvgt.config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="stage config, e.g. train/dvgt1/demo.yaml "
                        "(packaged configs first, then the working directory)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def cmd_train(args: argparse.Namespace) -> int:
    from dvgt.train.loop import train

    cfg = load_config(args.config, args.overrides, debug=args.debug)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"finished": True, **result}))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from dvgt.models import model_layout

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
    print(f"{cfg.model.name} ({cfg.model.size}): {layout['num_parameters']:,} parameters, "
          f"{len(layout['state_dict'])} state_dict entries")
    for module, count in by_module.items():
        print(f"  {module:<20} {count:>15,}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from dvgt.data.synthetic import demo_spec, generate_synthetic_dataset

    for split in args.splits:
        started = time.perf_counter()
        spec = {**demo_spec(split), **({"num_scenes": args.scenes} if args.scenes else {})}
        generate_synthetic_dataset(args.out, split=split, **spec)
        print(f"wrote {split} split to {Path(args.out) / split} in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dvgt.demo import run_demo

    run_demo(args.config, args.out, args.overrides)
    return 0


def _key_value(text: str) -> tuple:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return tuple(text.split("=", 1))


def cmd_local_run(args: argparse.Namespace) -> int:
    from dvgt.k8s.local_runner import Options, read_env_file, run_manifest

    options = Options(
        workdir=Path(args.workdir), volumes={k: Path(v) for k, v in args.volume},
        secrets={k: read_env_file(Path(v)) for k, v in args.secret}, env=dict(args.env),
        overrides=[f"{k}={v}" for k, v in args.override], nproc_per_node=args.nproc_per_node,
        replicas={k: int(v) for k, v in args.replicas}, restart_delay_s=args.restart_delay,
        targets_file=Path(args.targets_file) if args.targets_file else None)
    return run_manifest(args.manifest, options)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "dvgt", description="DVGT / VGGT training")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a stage (single process, or one rank under torchrun)")
    _add_config_args(train)
    train.add_argument("--debug", action="store_true",
                       help="few batches, log every step, save every epoch, no data workers")
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("model-info", help="parameter count and state_dict layout (no weights allocated)")
    _add_config_args(info)
    info.add_argument("--json", action="store_true", help="print the layout as JSON (num_parameters, state_dict)")
    info.set_defaults(func=cmd_model_info)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic driving dataset in the DVGT layout")
    synth.add_argument("--out", required=True, help="dataset root")
    synth.add_argument("--splits", nargs="+", default=["train", "val"])
    synth.add_argument("--scenes", type=int, default=0, help="scenes per split (default: the demo's)")
    synth.set_defaults(func=cmd_data_synth)

    demo = sub.add_parser("demo", help="train the DVGT-1 demo on CPU and draw the result")
    demo.add_argument("--config", default="train/dvgt1/demo.yaml")
    demo.add_argument("--out", default="runs/demo", help="folder for data, checkpoints, log and figure")
    demo.add_argument("overrides", nargs="*", metavar="key.path=value")
    demo.set_defaults(func=cmd_demo)

    local = sub.add_parser("local-run", help="run a PyTorchJob manifest on this machine (each replica as local processes)")
    local.add_argument("manifest", help="a manifest holding one PyTorchJob, e.g. k8s/dvgt1-demo.yaml ('-' = stdin)")
    local.add_argument("--workdir", default="runs/local-run", help="folder of the pods' files (emptyDirs, working directories)")
    local.add_argument("--volume", type=_key_value, action="append", default=[], metavar="NAME=PATH",
                       help="a local folder for the pod volume NAME (PVC, hostPath)")
    local.add_argument("--secret", type=_key_value, action="append", default=[], metavar="NAME=FILE",
                       help="the keys of Secret (or ConfigMap) NAME, as KEY=VALUE lines (default: this environment)")
    local.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="set an env variable in every container")
    local.add_argument("--override", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="a trainer config override appended to the pytorch container's args")
    local.add_argument("--nproc-per-node", type=int, help="processes per pod (replaces nprocPerNode)")
    local.add_argument("--replicas", type=_key_value, action="append", default=[], metavar="TYPE=N",
                       help="replica count of Master or Worker (Worker=0: the master alone)")
    local.add_argument("--restart-delay", type=float, default=10.0,
                       help="seconds before a container restarts in place (doubles per restart, like the kubelet)")
    local.add_argument("--targets-file", help="write the sidecars' local ports as a Prometheus file_sd target list")
    local.set_defaults(func=cmd_local_run)
    return parser


# Errors a user can fix: reported as one line, without a traceback (DVGT_TRACEBACK=1 shows it).
USER_ERRORS = (ConfigError, OSError, NotImplementedError, ValueError, RuntimeError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (an error re-raised from a data worker carries the worker's
    traceback: its last line is the message)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog is not None:  # `python -m dvgt.train ...` passes ["train"] and reads the rest from sys.argv
        argv = argv + sys.argv[1:]
    args = build_parser(prog).parse_args(argv)
    try:
        code = args.func(args)
    except USER_ERRORS as error:
        if os.environ.get("DVGT_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        code = 2
    sys.exit(code)


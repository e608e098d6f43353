"""Training time lost per checkpoint, against training without checkpoints, side by side in one run
(goal: at most 2% of the checkpoint's upload time), on the demo config with checkpoints on S3.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/checkpoint_cost.py [--pairs 6] [--window 6] [--server-nice 0] [--pin]

The demo stage (DVGT-1 small: 206 MB of model and AdamW state) trains on its synthetic data, with
a checkpoint every 2 x --window steps, so its steps come in pairs of windows: one in which a save
starts (at its first step) and uploads, and the quiet one after it. The wall time of every step is
taken where the loop asks for its batch (data wait, step, save and bookkeeping included), so the
same measure holds for any version of the trainer. Lost per checkpoint = the median over the
pairs of (window with a save - window without); against it: the save's upload time and the cost
the trainer reported for it (`cost_s`). SeaweedFS runs on this machine, so its own CPU is taken
from the training too, which a remote store's would not be: --server-nice 19 runs it at the lowest
priority, and --pin gives it a core of its own (the last; the trainer, its data workers and its
upload get the others), which is the closest this machine comes to a store on another machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import SeaweedS3

from dvgt.config import load_config
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer


class TimedLoader:
    """The trainer's data loader, noting when each batch is asked for: the starts of the steps."""

    def __init__(self, loader) -> None:
        self.loader, self.batch_sampler, self.asked = loader, loader.batch_sampler, []

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            self.asked.append(time.perf_counter())
            try:
                yield next(iterator)
            except StopIteration:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="window pairs (saves)")
    parser.add_argument("--window", type=int, default=6, help="steps per window")
    parser.add_argument("--server-nice", type=int, default=0, help="niceness of the SeaweedFS server (19: lowest)")
    parser.add_argument("--pin", action="store_true", help="the server on the last core, the training on the others")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin:
        os.sched_setaffinity(0, cores[:-1])  # (before torch starts its threads and the data workers are forked)
        torch.set_num_threads(len(cores) - 1)
    period = 2 * args.window
    steps = period * (args.pairs + 1) + 1  # saves at period, 2 period, ...; the last pair ends a step before the end
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = SeaweedS3(tmp / "weed").start()
        try:
            if args.server_nice:
                subprocess.run(
                    ["renice", "-n", str(args.server_nice), "-g", str(server.process.pid)],
                    check=True,
                    capture_output=True,
                )
            if args.pin:
                for task in Path(f"/proc/{server.process.pid}/task").iterdir():  # every thread of the server
                    os.sched_setaffinity(int(task.name), cores[-1:])
            os.environ.update(server.env())
            server.make_bucket("bench")
            data = tmp / "data"
            cfg = load_config(
                "train/dvgt1/demo.yaml",
                [
                    f"data.train.datasets.0.root={data}",
                    f"data.val.datasets.0.root={data}",
                    "limit_val_batches=0",
                    "max_epochs=1",
                    f"limit_train_batches={steps}",
                    f"checkpoint.save_every_steps={period}",
                    "checkpoint.uri=s3://bench/cost",
                    f"logging.log_dir={tmp / 'run'}",
                    "logging.progress=false",
                    "logging.log_freq=1",
                    "logging.metrics=false",
                ],
            )
            trainer = Trainer(cfg)
            loader = TimedLoader(trainer.train_loader)
            trainer.train_loader = loader
            try:
                trainer.fit()
            finally:
                trainer.close()
        finally:
            server.stop()
        records = read_log(tmp / "run" / "train_log.jsonl")
    wall = [b - a for a, b in zip(loader.asked, loader.asked[1:])]  # wall[k]: step k + 1
    saves = {
        r["step"]: r
        for r in records
        if r.get("kind") == "checkpoint"
        and r["outcome"] == "ok"
        and r["step"] % period == 0
        and r["step"] <= period * args.pairs
    }
    lost, quiet = [], []
    for step in sorted(saves):  # the save starts inside step `step`: that step opens the window with it
        with_save = sum(wall[step - 1 : step - 1 + args.window])
        without = sum(wall[step - 1 + args.window : step - 1 + period])
        lost.append(with_save - without)
        quiet.append(without / args.window)
    upload = statistics.median(r["upload_s"] for r in saves.values())
    reported = [r["cost_s"] for r in saves.values() if r.get("cost_s") is not None]
    size = statistics.median(r["bytes"] for r in saves.values())
    median_lost = statistics.median(lost)
    print(
        f"demo config (DVGT-1 {cfg.model.size}), {len(saves)} checkpoints of {size / 2**20:.0f} MB to SeaweedFS on "
        f"127.0.0.1 (nice {args.server_nice}{', on a core of its own' if args.pin else ''}); {os.cpu_count()} cores, "
        f"training on {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}"
    )
    print(f"  step without a save beside it (median): {statistics.median(quiet):.3f} s")
    print(f"  upload time per checkpoint (median):    {upload:.2f} s")
    print(
        f"  training time lost per checkpoint:      {median_lost:.3f} s (median of {len(lost)} window pairs of "
        f"{args.window} steps; each: {', '.join(f'{x:.2f}' for x in lost)})"
    )
    print(f"    = {100 * median_lost / upload:.1f}% of the upload time (goal <= 2%)")
    if reported:
        print(f"  cost the trainer reported (cost_s, median): {statistics.median(reported):.3f} s")


if __name__ == "__main__":
    main()

"""Metrics benchmarks, side by side in one run (goals from issues 5 and 20):

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/metrics.py [--steps 20] [--scrapes 30] [--rate 150]

1. Instrumentation overhead on a tiny CPU model: the same trainer runs steps with and without the
   per-step `TrainingMetrics.observe_step` call, interleaved (on, off, on, off, ...) so that machine
   noise hits both alike; the median of the per-pair ratios is reported (goal <= 1.01), of wall
   time and of the process's CPU time (less disturbed by other work on the machine). The cost of one
   observe_step call alone is timed too, over many calls, as a share of the median step: on a busy
   machine the pair ratios scatter by more than the overhead, and this is the precise number.
2. Exporter scrape time with 64 rank files: one rank's real metric files, copied for 64 ranks
   (labels and pids rewritten), served by `dvgt exporter`; median and max wall time over --scrapes
   GETs of /metrics (goal < 50 ms median), and the exporter's CPU time per scrape (on a busy machine
   the wall time includes waiting for a core); side by side, prometheus-client's own merge and text
   writer on the same files (what the exporter used before). Then under load: --rate scrapes per
   second from 16 clients for 5 s, median and p99 wall time.
3. Exporter start-up: from process start to the first answer on /healthz, against a bare
   `python -c pass` and `python -c "import torch"`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import free_port, tiny_overrides


def instrumentation_overhead(tmp: Path, steps: int) -> dict:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics-overhead")
    import torch

    from dvgt.config import load_config
    from dvgt.data.synthetic import generate_synthetic_dataset
    from dvgt.train.loop import Trainer

    root = tmp / "data"
    generate_synthetic_dataset(root, split="train", num_scenes=2, num_frames=4, height=64, width=128, seed=0)
    generate_synthetic_dataset(root, split="val", num_scenes=1, num_frames=4, height=64, width=128, seed=1)
    cfg = load_config("train/dvgt1/demo.yaml", tiny_overrides(root, tmp / "run", **{"data.train.fixed_num_frames": 2}))
    trainer = Trainer(cfg)
    batch = next(iter(trainer.train_loader))
    images = batch["images"].shape[0] * batch["images"].shape[1] * batch["images"].shape[2]

    def step(observe: bool) -> tuple:
        """(wall seconds, CPU seconds of this process, record) of one step."""
        started, cpu = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        record = trainer.read_steps()[-1]  # the host values, as the loop has them (here every step)
        step_time = time.perf_counter() - started
        record.update(
            kind="train",
            step=trainer.step,
            epoch=0,
            step_time=step_time,
            data_time=0.0,
            images=images,
            images_per_sec=images / step_time,
        )
        if observe:
            trainer.metrics.observe_step(record)
        return time.perf_counter() - started, time.process_time() - cpu, record

    step(True)  # warm-up
    on, off, ratios, cpu_ratios = [], [], [], []
    for i in range(steps):
        order = (True, False) if i % 2 == 0 else (False, True)
        times = {observe: step(observe) for observe in order}
        on.append(times[True][0])
        off.append(times[False][0])
        ratios.append(times[True][0] / times[False][0])
        cpu_ratios.append(times[True][1] / times[False][1])
    record = step(False)[2]
    calls = 2000
    started = time.perf_counter()
    for _ in range(calls):
        trainer.metrics.observe_step(record)
    per_call = (time.perf_counter() - started) / calls
    trainer.close()
    return {
        "threads": torch.get_num_threads(),
        "on": statistics.median(on),
        "off": statistics.median(off),
        "ratio": statistics.median(ratios),
        "cpu_ratio": statistics.median(cpu_ratios),
        "observe": per_call,
    }


def rank_files(tmp: Path, ranks: int) -> Path:
    """A folder with the metric files of `ranks` ranks: one rank's real files (from a process that
    ran TrainingMetrics), copied with each rank's labels and a pid of its own."""
    from prometheus_client.mmap_dict import MmapedDict

    one = tmp / "one-rank"
    script = """
import sys
from dvgt.metrics.training import TrainingMetrics
m = TrainingMetrics(sys.argv[1], {"dvgt_job": "bench", "stage": "dvgt2-pretrain", "node_rank": "0", "local_rank": "0"})
record = {"step": 1000, "step_time": 2.5, "data_time": 0.01, "images": 48, "lr": 1e-4, "skipped": False,
          **{f"loss/{k}": 1.0 for k in ("objective", "loss_conf_point", "loss_reg_point", "loss_grad_point",
                                        "loss_T", "loss_R", "loss_ego_pose")},
          **{f"grad_norm/{k}": 1.0 for k in ("aggregator", "point_head", "ego_pose_head")}}
for _ in range(10):
    m.observe_step(record)
m.checkpoint_event({"outcome": "ok", "blocked_s": 1.0, "upload_s": 30.0, "bytes": 2 ** 33})
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(one)}
    subprocess.run([sys.executable, "-c", script, str(one)], env=env, check=True)
    folder = tmp / "ranks"
    folder.mkdir()
    for path in one.glob("*.db"):
        prefix = path.stem.rsplit("_", 1)[0]
        entries = list(MmapedDict.read_all_values_from_file(str(path)))
        for rank in range(ranks):
            node, local = divmod(rank, 8)
            copy = MmapedDict(str(folder / f"{prefix}_{1_000_000 + rank}.db"))
            for key, value, timestamp, _ in entries:
                key = key.replace('"node_rank": "0"', f'"node_rank": "{node}"')
                key = key.replace('"local_rank": "0"', f'"local_rank": "{local}"')
                copy.write_value(key, value, timestamp)
            copy.close()
    return folder


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): what a scrape costs on an idle core,
    whatever else the machine is running."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_time(tmp: Path, ranks: int, scrapes: int, rate: float) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from dvgt.metrics.exporter import start_exporter
    from dvgt.metrics.exposition import MetricFiles

    folder = rank_files(tmp, ranks)
    port = free_port()
    exporter = start_exporter(folder, port, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        body = get(url)
        times = []
        cpu_before = cpu_seconds(exporter.pid)
        for _ in range(scrapes):
            started = time.perf_counter()
            get(url)
            times.append(time.perf_counter() - started)
        cpu = (cpu_seconds(exporter.pid) - cpu_before) / scrapes
        loaded = under_load(url, rate)
    finally:
        exporter.terminate()
        exporter.wait()
    registry = CollectorRegistry()  # in this process, side by side: the library's merge and writer, and ours
    MultiProcessCollector(registry, path=str(folder))
    files = MetricFiles(str(folder))
    library, ours = [], []
    for _ in range(scrapes):
        for render, own in ((lambda: generate_latest(registry), library), (files.render, ours)):
            started = time.perf_counter()
            render()
            own.append(time.perf_counter() - started)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {
        "median": statistics.median(times),
        "max": max(times),
        "cpu": cpu,
        "series": series,
        "bytes": len(body),
        "files": len(list(folder.glob("*.db"))),
        "library": statistics.median(library),
        "ours": statistics.median(ours),
        **loaded,
    }


def under_load(url: str, rate: float, seconds: float = 5.0, clients: int = 16) -> dict:
    """Scrapes from `clients` threads, started at `rate` per second in all for `seconds`."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(due: float) -> float:
        time.sleep(max(0.0, due - time.perf_counter()))
        started = time.perf_counter()
        get(url)
        return time.perf_counter() - started

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = sorted(pool.map(timed, [start + i / rate for i in range(int(rate * seconds))]))
    return {
        "load_median": statistics.median(times),
        "load_p99": times[int(0.99 * (len(times) - 1))],
        "load_count": len(times),
        "load_rate": len(times) / (time.perf_counter() - start),
    }


def start_up(tmp: Path, repeats: int = 5) -> dict:
    from dvgt.metrics.exporter import start_exporter

    def timed(start) -> float:
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            start()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    def exporter() -> None:
        process = start_exporter(tmp / "empty", free_port(), stderr=subprocess.DEVNULL)
        process.terminate()
        process.wait()

    return {
        "exporter": timed(exporter),
        "python": timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)),
        "torch": timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="step pairs (on, off) for the overhead")
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--rate", type=float, default=150.0, help="scrapes per second under load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overhead = instrumentation_overhead(
            tmp, args.steps
        )  # first: it sets PROMETHEUS_MULTIPROC_DIR before the import
        scrape = scrape_time(tmp, args.ranks, args.scrapes, args.rate)
        start = start_up(tmp)

    print(
        f"1. Instrumentation overhead, DVGT-1 tiny on CPU ({overhead['threads']} threads), {args.steps} interleaved pairs"
    )
    print(f"   step without metrics (median):  {overhead['off'] * 1000:9.1f} ms   ratio 1.000")
    print(
        f"   step with metrics (median):     {overhead['on'] * 1000:9.1f} ms   median per-pair ratio {overhead['ratio']:.3f}"
        f"   (goal <= 1.010)"
    )
    print(f"   same pairs, CPU time of the process: median per-pair ratio {overhead['cpu_ratio']:.3f}")
    print(
        f"   one observe_step call:          {overhead['observe'] * 1e6:9.1f} us   "
        f"= {overhead['observe'] / overhead['off']:.5f} of a step"
    )
    print(
        f"2. Exporter scrape, {args.ranks} ranks ({scrape['files']} files, {scrape['series']} samples, "
        f"{scrape['bytes'] / 1024:.0f} KiB), {args.scrapes} scrapes"
    )
    print(
        f"   wall time: median {scrape['median'] * 1000:6.1f} ms   max {scrape['max'] * 1000:6.1f} ms   (goal < 50 ms median)"
    )
    print(f"   exporter CPU time per scrape: {scrape['cpu'] * 1000:6.1f} ms (the wall time on an idle core)")
    print(
        f"   render alone, in one process: prometheus-client's merge + writer {scrape['library'] * 1000:6.1f} ms, "
        f"ours {scrape['ours'] * 1000:6.1f} ms (median; ratio {scrape['ours'] / scrape['library']:.2f})"
    )
    print(
        f"   under load ({scrape['load_count']} scrapes from 16 clients at {scrape['load_rate']:.0f}/s): median "
        f"{scrape['load_median'] * 1000:6.1f} ms   p99 {scrape['load_p99'] * 1000:6.1f} ms"
    )
    print("3. Start-up until the first answer (median of 5)")
    print(f"   python -c pass:           {start['python'] * 1000:7.0f} ms   ratio 1.00")
    print(
        f"   dvgt exporter (/healthz): {start['exporter'] * 1000:7.0f} ms   ratio {start['exporter'] / start['python']:.2f}"
    )
    print(
        f"   python -c 'import torch': {start['torch'] * 1000:7.0f} ms   ratio {start['torch'] / start['python']:.2f}"
    )


if __name__ == "__main__":
    main()

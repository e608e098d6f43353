"""`dvgt demo` (what `make demo` runs): train the DVGT-1 demo stage on CPU and draw the result, serving
the run's Prometheus metrics on localhost while it trains."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dvgt.config import load_config
from dvgt.data.loader import load_clip
from dvgt.metrics.exporter import start_exporter
from dvgt.metrics.labels import job_name
from dvgt.metrics.multiproc import folder_for
from dvgt.train.logger import read_log
from dvgt.train.loop import Trainer
from dvgt.viz import render_result_figure


def port_or_free(port: int) -> int:
    """`port` when nothing listens on it on 127.0.0.1, else (or for 0) a free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(config: str, out: str | Path, overrides: Sequence[str] = (), metrics_port: int = 9400) -> Path:
    out = Path(out)
    data_root = out / "data"
    cfg = load_config(
        config,
        [
            f"logging.log_dir={out}",
            f"checkpoint.uri={out / 'ckpts'}",
            f"data.root={data_root}",
            "checkpoint.resume=never",
            *overrides,
        ],
    )
    started = time.perf_counter()
    trainer = Trainer(cfg)  # generates the synthetic dataset on first use
    exporter = None
    try:
        port = port_or_free(metrics_port)
        exporter = start_exporter(folder_for(cfg.logging.log_dir), port, job=job_name(cfg.exp_name))
        print(f"Metrics (Prometheus format) while the demo trains: http://127.0.0.1:{port}/metrics", flush=True)
        result = trainer.fit()
    finally:
        trainer.close()
        if exporter is not None:
            exporter.terminate()
            exporter.wait()
    minutes = (time.perf_counter() - started) / 60

    history = read_log(out / "train_log.jsonl")
    evals = [r for r in history if r.get("kind") == "eval"]
    clip = load_clip(trainer.val_loader.dataset.datasets[0], 0)  # the first held-out clip, every camera
    with torch.inference_mode():
        predictions = trainer.model.eval()(clip["images"])
    figure = out / "demo_result.png"
    render_result_figure(
        history,
        clip,
        predictions,
        figure,
        family=trainer.family,
        gt_scale_factor=cfg.gt_scale_factor,
        title=f"{trainer.family.title} ({cfg.model.size}) demo: {result['step']} steps in {minutes:.1f} min",
    )

    print(f"\nDemo finished in {minutes:.1f} min")
    if evals:
        first, last = evals[0], evals[-1]
        print("  held-out metrics (official definitions; metres, AUC in %)")
        for key in sorted(k for k in last if k.startswith("val/") and k in first):
            print(f"  {key:<38} before {first[key]:9.4f}  after {last[key]:9.4f}")
    print(f"  data         {data_root}")
    print(f"  checkpoints  {out / 'ckpts'}")
    print(f"  log          {out / 'train_log.jsonl'}")
    print(f"  figure       {figure}")
    return figure

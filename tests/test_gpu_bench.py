"""benchmarks/gpu/run.sh, the one-command GPU check: its dry run (tiny models on the CPU, the same code as
on a GPU) completes and prints the table's header and every row, GPU-only values marked as such; without
a GPU and without --dry-run it refuses in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dvgt.k8s.catalog import load_catalog

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"


def test_dry_run_prints_the_whole_table():
    run = subprocess.run([str(RUN), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("GPU check: DRY RUN on the CPU") and "tiny models" in lines[0]
    assert lines[2:4] == ["| measure | setting | value |", "| --- | --- | --- |"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[4:]]
    by_measure = {}
    for measure, setting, value in rows:
        by_measure.setdefault(measure, []).append((setting, value))

    steps = dict(by_measure["DVGT-1 training step"])
    assert set(steps) == {"2 frames x 2 cameras, eager", "2 frames x 2 cameras, compiled"}
    for value in steps.values():  # step time and achieved model FLOP/s; no MFU without a peak
        assert re.fullmatch(r"\d+ ms, [\d.e+-]+ [kMGT]?FLOP/s, MFU n/a \(no peak on a CPU\)", value), value
    assert by_measure["peak memory vs the profile"] == [("DVGT-1 eager steps", "n/a (no GPU)")]
    assert by_measure["GPU memory: exporter (NVML) vs torch"][0][1].startswith("n/a (no GPU): NVML sees 0 GPUs")
    (setting, value), *_ = by_measure["checkpoint save (DVGT-1 model + AdamW)"]
    blocked, total = map(float, re.fullmatch(r"blocked ([\d.]+) s of ([\d.]+) s total \(ok\)", value).groups())
    assert 0 < blocked <= total and "no device copy" in setting
    (setting, value), *_ = by_measure["DVGT-2 streaming latency per frame"]
    assert re.fullmatch(r"\d+ ms \(first frame \d+ ms\)", value)


def test_without_a_gpu_it_asks_for_the_dry_run():
    run = subprocess.run([str(RUN)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: the GPU check needs a CUDA GPU and none is visible; run it with --dry-run on a CPU"
    )


def test_each_card_is_compared_with_its_own_profile():
    """The GPU-only part of the table that a CPU can check: which catalog profile a card's peak memory is
    held against (by name as a whole word, then by memory; an H200 is not an H20)."""
    sys.path.insert(0, str(RUN.parent))
    from bench import profile_of

    profiles = load_catalog().profiles
    assert profile_of("NVIDIA H100 80GB HBM3", 79.1, profiles) == "h100-80g"
    assert profile_of("NVIDIA A100-SXM4-40GB", 39.4, profiles) == "a100-40g"
    assert profile_of("NVIDIA A100-SXM4-80GB", 79.2, profiles) == "a100-80g"
    assert profile_of("NVIDIA H20", 95.0, profiles) == "h20-146g"
    assert profile_of("NVIDIA H200", 139.8, profiles) == "h20-146g"  # no H200 profile: the closest memory

"""The metrics folder of prometheus-client's multiprocess mode, and the clean-up of stale files.

Every process that writes metrics keeps its values in files named `<type>[_<mode>]_<pid>.db` in
$PROMETHEUS_MULTIPROC_DIR; the exporter merges all files of the folder on each scrape. The library
reads the variable when it is imported, so `use_folder` must run before the first import.

A process that died leaves its files behind, and the exporter would go on serving its series (a
counter of a restarted rank would even add the dead process's counts to the new one's). So when a
process starts it removes every file that is stale, which is a file
  - written by a pid that is not running: only the trainer container of a pod writes to its folder,
    so all writers share one pid namespace (the exporter sidecar only reads and needs no
    shareProcessNamespace);
  - named with this process's own pid although this process has not written yet: the pid was reused
    (a restarted container numbers its processes afresh);
  - holding series with this process's labels: an earlier life of the same rank, whatever pid it had.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def folder_for(log_dir: str | Path) -> Path:
    """Where a run's metrics go: $PROMETHEUS_MULTIPROC_DIR (the chart sets it to the emptyDir it
    shares with the exporter), else `<log_dir>/metrics`."""
    return Path(os.environ.get(ENV) or Path(log_dir) / "metrics")


def use_folder(log_dir: str | Path) -> Path:
    """Create the folder and point prometheus-client at it (sets the variable when it is unset)."""
    folder = folder_for(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    return folder


def file_pid(path: Path) -> int | None:
    """The pid in a prometheus-client file name (`counter_123.db`, `gauge_mostrecent_123.db`)."""
    pid = path.stem.rsplit("_", 1)[-1]
    return int(pid) if pid.isdigit() else None


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


def holds_labels(path: Path, labels: Mapping[str, str]) -> bool:
    """True when any series in the file carries all of `labels`."""
    from prometheus_client.multiprocess import MultiProcessCollector

    try:
        metrics = MultiProcessCollector.merge([str(path)], accumulate=False)
    except (FileNotFoundError, ValueError):  # removed meanwhile, or cut short by a crash mid-write
        return False
    wanted = set(labels.items())
    return any(wanted <= set(s.labels.items()) for metric in metrics for s in metric.samples)


def stale_files(folder: Path, labels: Mapping[str, str], pid: int) -> list[Path]:
    """The files in `folder` that no running process writes any more (see the module docstring);
    call before process `pid` writes its first value."""
    stale = []
    for path in sorted(folder.glob("*.db")):
        owner = file_pid(path)
        if owner is None:
            continue
        if owner == pid or not pid_running(owner) or holds_labels(path, labels):
            stale.append(path)
    return stale


def remove_stale_files(folder: Path, labels: Mapping[str, str], pid: int | None = None) -> list[Path]:
    removed = []
    for path in stale_files(folder, labels, os.getpid() if pid is None else pid):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another rank starting at the same time removed it first
            pass
    return removed

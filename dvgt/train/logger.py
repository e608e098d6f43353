"""Training log: JSON lines (one object per logged step or evaluation) and optional TensorBoard."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any


class RunLogger:
    """Rank 0 writes `<log_dir>/train_log.jsonl`; other ranks get a logger that writes nothing."""

    def __init__(self, log_dir: str | Path, enabled: bool, tensorboard: bool = False, append: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "train_log.jsonl"
        self._file = None
        self._tb = None
        self._lock = threading.Lock()  # checkpoint records arrive from the background save thread
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if append else "w", buffering=1)  # noqa: SIM115 (closed by close())
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self._lock:
            if self._file is None or self._file.closed:
                return
            self._file.write(json.dumps(clean) + "\n")
            if self._tb is not None and "step" in record:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (used by the demo figure and tests)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_record(record: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or [k for k in record if k not in ("step", "epoch", "kind")]
    parts = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)

"""Where checkpoint objects live, behind one small interface.

A location is a URI: a local path or file://... here; an object-store backend implements the same
five methods. Keys are '/'-separated paths relative to the location.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Protocol
from urllib.parse import urlparse


class Storage(Protocol):
    uri: str

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def read_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> List[str]: ...

    def delete_prefix(self, prefix: str) -> None: ...


class LocalStorage:
    """A folder on a local or mounted file system. Each object is written to a temporary name and
    renamed, so a reader never sees a half-written file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint object '{key}' not found under {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> List[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def open_storage(uri: str) -> Storage:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme == "file" else uri)
    raise ValueError(f"checkpoint location '{uri}': scheme '{parsed.scheme}://' is not supported by this "
                     f"release; use a local folder or file:// URI")

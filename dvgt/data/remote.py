"""Data roots in S3-compatible object storage (``data.root=s3://bucket/prefix``), read through a
bounded node-local cache.

An s3:// root is mirrored file by file, as the reader asks for them, under the cache folder:
``<data.s3_cache.dir>/<bucket>/<prefix>/data_annotation/...``. The reader (SceneDataset) works on the
mirror's paths exactly as on a local tree, and ``S3Root.read`` puts a file there before a reader opens
it. Local roots never come here: their files are opened where they are.

The cache (``NodeCache``) is shared by every process of a node (ranks and their DataLoader workers):
- a download goes to a temporary file renamed into place, so no reader ever sees half a file, and
  concurrent misses of one object wait for the first download (a lock per hash bucket of paths);
- a hit sets the file's modification time, so modification times order the files by last use;
- the total size is a counter in the folder, changed under a lock; past the bound, the least recently
  used files are deleted until the total is LOW_WATERMARK of the bound. A file that another process
  evicts between its fetch and its read is fetched again.
Objects are assumed not to change while cached (a preprocessed release is written once): after
replacing files in the bucket, empty the cache folder. Endpoint, region and credentials come from
the standard AWS variables (as for checkpoints: one Secret serves both) and ``data.s3.*``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from dvgt.checkpoint.storage import StorageError, s3_client, s3_error
from dvgt.data.format import DataFileError
from dvgt.s3_options import S3CacheConfig, S3Config

T = TypeVar("T")
LOW_WATERMARK = 0.9  # an eviction brings the cache down to this share of its bound
OBJECT_LOCKS = 1024  # concurrent misses of paths in one hash bucket download one after the other
STALE_TEMPORARY_S = 3600  # a temporary download this old belongs to a killed process: deleted at eviction
READ_ATTEMPTS = 3  # fetch + read tries of a file that other processes keep evicting


def is_s3(root: str | Path) -> bool:
    return str(root).startswith("s3://")


class NodeCache:
    """A folder of files bounded to ``max_bytes`` by least-recently-used eviction, safe to share
    between processes (module docstring). Paths handed to ``get`` lie inside ``folder``."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        self._temporary, self._locks, self._usage = self.folder / ".tmp", self.folder / ".locks", self.folder / ".usage"
        for folder_ in (self._temporary, self._locks):
            folder_.mkdir(parents=True, exist_ok=True)

    def get(self, path: Path, download: Callable[[Path], None], name: str) -> Path:
        """``path``, first written by ``download(temporary path)`` when it is not in the cache yet.
        ``name`` (what the file is, e.g. its URI) is what an error message calls it."""
        try:
            os.utime(path)  # a hit: now the most recently used file
            return path
        except FileNotFoundError:
            pass
        bucket = int.from_bytes(hashlib.blake2b(str(path).encode(), digest_size=4).digest(), "little") % OBJECT_LOCKS
        with self._locked(f"object-{bucket:04d}"):
            if path.exists():  # another process fetched it while this one waited
                return path
            temporary = self._temporary / f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                download(temporary)
                size = temporary.stat().st_size
                if size > self.max_bytes * LOW_WATERMARK:
                    raise StorageError(
                        f"{name} is {size / 2**30:.2f} GiB, more than the data cache can hold "
                        f"({self.max_bytes / 2**30:.2f} GiB at most, {LOW_WATERMARK:.0%} after an "
                        f"eviction); raise data.s3_cache.max_gib (the chart: data.s3CacheSize)"
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                with self._locked("usage"):
                    os.replace(temporary, path)
                    self._write_usage(self._read_usage() + size, keep=path)
            finally:
                temporary.unlink(missing_ok=True)
        return path

    def usage(self) -> int:
        """Bytes the cached files take, as the counter has them."""
        with self._locked("usage"):
            return self._read_usage()

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """An exclusive lock between the processes of the node (released when its file is closed)."""
        fd = os.open(self._locks / name, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_usage(self) -> int:
        try:
            return int(self._usage.read_text())
        except (FileNotFoundError, ValueError):  # a new folder (or a counter cut short): count the files
            return self._evict(target=self.max_bytes, keep=None)

    def _write_usage(self, used: int, keep: Path | None) -> None:
        if used > self.max_bytes:
            used = self._evict(target=int(self.max_bytes * LOW_WATERMARK), keep=keep)
        self._usage.write_text(str(used))

    def _evict(self, target: int, keep: Path | None) -> int:
        """Delete the least recently used files (never ``keep``) until the cached files take at most
        ``target`` bytes, and temporary files of killed processes; returns the bytes left."""
        files, now = [], time.time()
        for folder, subfolders, names in os.walk(self.folder):
            if folder == str(self.folder):
                subfolders[:] = [s for s in subfolders if not s.startswith(".")]
                names = [n for n in names if not n.startswith(".")]
            for name in names:
                try:
                    stat = os.stat(os.path.join(folder, name))
                except FileNotFoundError:  # deleted meanwhile by another process
                    continue
                files.append((stat.st_mtime, stat.st_size, os.path.join(folder, name)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= target:
                break
            if keep is not None and path == str(keep):
                continue
            Path(path).unlink(missing_ok=True)  # a reader that holds it open reads on; a later fetch downloads again
            total -= size
        for temporary in self._temporary.iterdir():
            try:
                if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                    temporary.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        return total


class S3Root:
    """A tree in S3 (``s3://bucket/prefix``) mirrored into a NodeCache as it is read. ``mirror`` is
    the folder a reader treats as the tree's root; ``read`` fills it. Picklable: each process (a
    DataLoader worker) makes its own S3 client."""

    def __init__(self, uri: str, cache: NodeCache, options: Any, settings: str = "data") -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{settings}.root '{uri}' names no bucket; use s3://bucket/prefix")
        self.uri, self.bucket, self.prefix = uri.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        self.cache, self.options, self.settings = cache, options, settings
        self.mirror = cache.folder / self.bucket / self.prefix if self.prefix else cache.folder / self.bucket
        self._transfer: Any = None
        self._pid = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transfer": None, "_pid": 0}

    def preflight(self) -> None:
        """Raise a one-line StorageError now if the root cannot be listed (no bucket, credentials
        rejected, endpoint down) or holds nothing: a client with short timeouts and two attempts."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.options, preflight=True)
        what = f"data root {self.uri}"
        try:
            listing = client.list_objects_v2(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1
            )
        except (BotoCoreError, ClientError) as error:
            raise s3_error(error, what, self.settings) from None
        if not listing.get("KeyCount", len(listing.get("Contents", []))):
            raise StorageError(
                f"{what} holds no object; upload the tree there (e.g. `aws s3 sync <tree> {self.uri}`) "
                f"or fix {self.settings}.root"
            )

    def listing(self, folder: Path) -> list[str]:
        """Every object under ``folder`` (a folder of the mirror), as paths relative to it: one paginated
        listing (1000 keys a request) instead of a request per file."""
        from botocore.exceptions import BotoCoreError, ClientError

        relative = Path(folder).relative_to(self.mirror).as_posix()
        prefix = "".join(f"{part}/" for part in (self.prefix, relative) if part and part != ".")
        try:
            pages = s3_client(self.options).get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as error:
            raise s3_error(error, f"list s3://{self.bucket}/{prefix}", self.settings) from None

    def object_uri(self, path: Path) -> str:
        return f"s3://{self.bucket}/{self.key(path)}"

    def key(self, path: Path) -> str:
        relative = Path(path).relative_to(self.mirror).as_posix()
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def fetch(self, path: Path) -> Path:
        """``path`` (a file of the mirror), downloaded into the cache unless it is there."""
        return self.cache.get(Path(path), lambda temporary: self._download(path, temporary), self.object_uri(path))

    def read(self, reader: Callable[[Path], T], path: Path) -> T:
        """``reader(path)`` once the file is in the cache; fetched again if another process evicted
        it between the fetch and the read."""
        for attempt in range(READ_ATTEMPTS):
            local = self.fetch(path)
            try:
                return reader(local)
            except OSError:
                if local.exists() or attempt == READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _download(self, path: Path, temporary: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._transfer_client().download_file(self.bucket, self.key(path), str(temporary))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise DataFileError(
                    f"{self.object_uri(path)} does not exist; check {self.settings}.root and the "
                    f"dataset and split (they name the parquet), or restore the file from the "
                    f"preprocessed release"
                ) from None
            raise s3_error(error, f"read {self.object_uri(path)}", self.settings) from None
        except Exception as error:
            raise s3_error(error, f"read {self.object_uri(path)}", self.settings) from None

    def _transfer_client(self) -> Any:
        """boto3's transfer manager (ranged parallel GETs for objects past one part), one per process."""
        if self._transfer is None or self._pid != os.getpid():
            from boto3.s3.transfer import S3Transfer, TransferConfig

            part = int(self.options.part_size_mb * 2**20)
            config = TransferConfig(
                multipart_threshold=part, multipart_chunksize=part, max_concurrency=self.options.concurrency
            )
            # (boto3-stubs types the config as s3transfer's base class; boto3's TransferConfig extends it)
            self._transfer, self._pid = S3Transfer(s3_client(self.options), config), os.getpid()  # type: ignore[arg-type]
        return self._transfer


def open_root(
    root: str | Path, cache: Any = None, s3: Any = None, settings: str = "data", preflight: bool = True
) -> tuple[Path, S3Root | None]:
    """(the folder a reader opens the tree's files in, the S3Root that fills it or None). A local
    root is that folder itself; an s3:// one is its mirror in the cache (``cache``: data.s3_cache,
    ``s3``: data.s3 options; None: their defaults), checked with one listing unless ``preflight`` is off."""
    if not is_s3(root):
        return Path(root), None
    cache, s3 = cache or S3CacheConfig(), s3 or S3Config()
    remote = S3Root(str(root), NodeCache(cache.dir, int(cache.max_gib * 2**30)), s3, settings)
    if preflight:
        remote.preflight()
    return remote.mirror, remote


def read_file(reader: Callable[[Path], T], path: Path, remote: S3Root | None) -> T:
    """``reader(path)``: a local file where it is, a file of an s3:// root through the node's cache."""
    return reader(path) if remote is None else remote.read(reader, path)

"""Where checkpoint objects live: one interface, two backends (a local folder, S3-compatible storage).

A location is a URI: a local path or file://..., or s3://bucket/prefix. Keys are '/'-separated paths
relative to it, checked by `check_key` before any read or write (no absolute path, no '.' or '..'
part, no backslash), so no key, wherever it comes from (a manifest), reaches outside the location.
Writes stream: `open_write(key)` returns a writer that takes chunks of bytes, hashes them (one
checksum, xxh3_128 by default: see CHECKSUM) as they pass, and makes the object visible only when
it is closed without an error; an exception inside `with storage.open_write(key) as w:` discards
the object (on S3 the multipart upload is aborted). Reads return a whole object (parallel ranged
GETs straight into one buffer on S3) or a range.

These primitives (a write stream per file, ranged reads, listing, deletion) are what a
torch.distributed.checkpoint StorageWriter/StorageReader needs from its file system, so FSDP's
sharded checkpoints sit on the same layer (dvgt/checkpoint/dcp.py).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import random
import shutil
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlparse

import xxhash

from dvgt.s3_options import S3Config

if TYPE_CHECKING:
    from types import TracebackType

    from mypy_boto3_s3 import S3Client  # boto3-stubs (the dev extra): only the type checker reads it
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef, MultipartUploadTypeDef

Progress = Callable[[int], None] | None  # called with the number of bytes just transferred
T = TypeVar("T")

# The checksum of every checkpoint object: xxh3_128 runs at memory speed (~20 GB/s a core), where
# sha256 (~1.5 GB/s) would cost a training node seconds of CPU per checkpoint. Against bit rot,
# truncation and a half-overwritten object it is as sure as sha256; against someone who can rewrite
# objects neither helps (they can rewrite the manifest beside them): that is the bucket policy's job.
CHECKSUM = "xxh3_128"


class Hasher(Protocol):
    """What a checksum is computed with: xxhash's and hashlib's objects alike."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


HASHERS: dict[str, Callable[[], Hasher]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
HASH_CHUNK = 8 * 2**20  # a local write is hashed and passed on in chunks of this size (S3: in parts)
READ_CHUNK = 4 * 2**20  # an S3 range is read into its place in chunks of this size


BACKGROUND_NICE = 10  # the niceness of the threads that move checkpoint bytes


def background_priority() -> None:
    """Let the calling thread yield the CPU to the training threads when both want it (Linux: this
    thread alone gets niceness 10; threads it starts inherit it). A checkpoint's upload then costs
    the training what it cannot take from idle cycles, not a fair share of every core."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except OSError:  # not permitted (never for lowering one's own priority): leave it
            pass


class StorageError(OSError):
    """Checkpoint storage cannot be used (unreachable, no permission, missing bucket, failed upload).
    `retryable`: a transient failure (unreachable, timeout, throttled, 5xx) worth trying again."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ObjectSizeError(StorageError):
    """An object is not of the size its reader was told (a manifest's): truncated or overwritten."""


class InvalidKeyError(ValueError):
    """An object key that would reach outside its location."""


def check_key(key: str, prefix: bool = False) -> str:
    """`key` if it is a relative '/'-separated path inside the location, else InvalidKeyError naming
    it. `prefix=True` also accepts "" and a trailing '/' (a folder to list or delete)."""
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    parts = body.split("/")
    if not body or body.startswith("/") or "\\" in body or "\0" in body or any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(
            f"object key '{key}' is not a relative path inside the checkpoint location (absolute, "
            f"empty, '.' or '..' parts, or a backslash); refusing to read or write it"
        )
    return key


def with_retries(
    what: str,
    attempt: Callable[[], T],
    deadline: float | None,
    cancelled: threading.Event | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """`attempt()`, tried again after a retryable StorageError with exponential backoff (1 s doubling
    to 30 s, jittered) until time.monotonic() passes `deadline` (None: one try) or `cancelled` is set."""
    delay = 1.0
    while True:
        try:
            return attempt()
        except StorageError as error:
            wait = delay * random.uniform(0.5, 1.0)
            if not error.retryable or deadline is None or time.monotonic() + wait > deadline:
                raise
            if on_retry:
                on_retry(f"{what}: {error}; retrying in {wait:.1f} s")
            if cancelled is not None and cancelled.wait(wait):
                raise
            if cancelled is None:
                time.sleep(wait)
            delay = min(2 * delay, 30.0)


class ObjectWriter(ABC):
    """A stream into one object: `write` chunks, then the context exit commits (or discards on error).
    The bytes given to `write` must stay unchanged until the writer is closed: on S3 they are uploaded
    from where they lie (a checkpoint's staged host buffers), not copied."""

    def __init__(self, key: str, progress: Progress = None, checksum: str = CHECKSUM) -> None:
        self.key = key
        self.size = 0
        self._checksum = checksum
        self._hasher = HASHERS[checksum]()
        self._progress = progress
        self.error: BaseException | None = None  # the first write failure (a serialiser may hide it)

    @property
    def digests(self) -> dict[str, str]:
        """{checksum name: hex digest} of everything written."""
        return {self._checksum: self._hasher.hexdigest()}

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self._write(view)
        except BaseException as error:
            self.error = self.error or error
            raise
        self.size += len(view)
        if self._progress:
            self._progress(len(view))
        return len(view)

    def flush(self) -> None:  # noqa: B027 (file-like no-op, not abstract)
        pass

    @abstractmethod
    def _write(self, view: memoryview) -> None:
        """Store the bytes, passing each piece to self._hasher (in order) just before it goes on, so
        that hashing overlaps the transfer."""

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Storage(ABC):
    uri: str

    @abstractmethod
    def open_write(self, key: str, progress: Progress = None, checksum: str = CHECKSUM) -> ObjectWriter: ...

    @abstractmethod
    def read(
        self, key: str, progress: Progress = None, hasher: Hasher | None = None, size: int | None = None
    ) -> bytearray:
        """The whole object, in a buffer the caller owns; `hasher` (an xxhash or hashlib object) is
        fed the bytes in order while they arrive, so verifying costs no second pass. `size`, when the
        caller knows it (a manifest), saves asking the store; an object of another size is then an
        ObjectSizeError (on S3; a local read returns the object as it is)."""

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under prefix (on S3, unfinished multipart uploads there too)."""

    @abstractmethod
    def unfinished(self, prefix: str = "") -> builtins.list[str]:
        """Keys of writes that never finished (a killed process): temporary files, open multipart uploads."""

    remote = False  # True where the objects live on another machine (a local spill location helps then)

    def preflight(self, write: bool) -> None:  # noqa: B027 (a no-op unless a location overrides it)
        """Raise a one-line StorageError now if the location cannot be read (or written)."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def write_bytes(self, key: str, data: Any, checksum: str = CHECKSUM) -> ObjectWriter:
        with self.open_write(key, checksum=checksum) as writer:
            writer.write(data)
        return writer

    def read_bytes(self, key: str) -> bytes:
        return bytes(self.read(key))

    def child(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


# ------------------------------------------------------------------------------------------------
# Local folder
# ------------------------------------------------------------------------------------------------


class LocalWriter(ObjectWriter):
    """Writes to a temporary name next to the target, fsyncs, and renames it into place on commit."""

    def __init__(self, path: Path, key: str, progress: Progress, checksum: str) -> None:
        super().__init__(key, progress, checksum)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by commit/abort)

    def _write(self, view: memoryview) -> None:
        for start in range(0, len(view), HASH_CHUNK):
            chunk = view[start : start + HASH_CHUNK]
            self._hasher.update(chunk)
            self._file.write(chunk)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalStorage(Storage):
    """A folder on a local or mounted file system; a reader never sees a half-written file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str, prefix: bool = False) -> Path:
        path = self.root / check_key(key, prefix)
        root = self.root.resolve()
        if path.exists() and root != path.resolve() and root not in path.resolve().parents:  # a link out
            raise InvalidKeyError(f"object key '{key}' leads outside {self.uri} (a symbolic link); refusing it")
        return path

    def open_write(self, key: str, progress: Progress = None, checksum: str = CHECKSUM) -> ObjectWriter:
        return LocalWriter(self._path(key), key, progress, checksum)

    def _open(self, key: str) -> io.BufferedReader:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"checkpoint object '{key}' not found under {self.uri}") from None

    def read(
        self, key: str, progress: Progress = None, hasher: Hasher | None = None, size: int | None = None
    ) -> bytearray:
        with self._open(key) as f:
            buffer = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buffer)
        if hasher is not None:
            hasher.update(buffer)
        if progress:
            progress(len(buffer))
        return buffer

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self._open(key) as f:
            f.seek(offset)
            return f.read(length)

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self._path(prefix, prefix=True)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and ".tmp-" not in p.name)

    def unfinished(self, prefix: str = "") -> builtins.list[str]:
        base = self._path(prefix, prefix=True)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*.tmp-*")) if base.is_dir() else []

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix, prefix=True)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------------------------------------
# S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS)
# ------------------------------------------------------------------------------------------------


def s3_client(options: Any, *, preflight: bool = False) -> S3Client:
    """A boto3 S3 client from `checkpoint.s3.*` (dvgt/s3_options.py S3Config) and the standard AWS
    variables (credentials, profile, region and endpoint are read by boto3 itself).

    Checksums: botocore >= 1.36 adds CRC32 checksums to every upload by default, which several
    S3-compatible stores reject or mishandle; they are sent only where an operation requires them
    (integrity is checked end to end by the manifest's checksums instead). Parameter validation is
    off because upload bodies are memoryviews of the staged state (sent as they lie, not copied),
    a bytes-like type that botocore sends but its validator does not list.
    """
    import boto3
    from botocore.config import Config

    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = options.addressing_style
    if style == "auto":
        style = "path" if endpoint else "virtual"  # MinIO, Ceph, SeaweedFS serve path-style by default
    config = Config(
        s3={"addressing_style": style},
        retries={
            "mode": "standard" if preflight else options.retry_mode,
            "max_attempts": 2 if preflight else options.max_attempts,
        },
        connect_timeout=min(2.0, options.connect_timeout_s) if preflight else options.connect_timeout_s,
        read_timeout=min(5.0, options.read_timeout_s) if preflight else options.read_timeout_s,
        max_pool_connections=max(10, 2 * options.concurrency),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        parameter_validation=False,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=options.endpoint_url or None, region_name=options.region or None, config=config
    )


PERMANENT_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidBucketName",
    "403",
    "404",
}


def s3_error(error: Exception, what: str, settings: str = "checkpoint") -> StorageError:
    """A StorageError with one line naming the problem and the fix, retryable unless the store said
    no for good (credentials, bucket, permission) or the request itself is wrong. `settings`: the
    config section whose location and S3 options the fix names (checkpoint: checkpoint.uri and
    checkpoint.s3.*; data: data.root and data.s3.*)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(
            f"{what}: cannot reach the S3 endpoint ({error}); check AWS_ENDPOINT_URL_S3 / "
            f"{settings}.s3.endpoint_url and that the server is up",
            retryable=True,
        )
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        retryable = code not in PERMANENT_CODES and (
            status >= 500 or status in (408, 429) or "Slow" in code or "Throttl" in code or "Timeout" in code
        )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(
                f"{what}: the S3 credentials were rejected ({code}); check AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE)"
            )
        if code in ("NoSuchBucket", "404"):
            location = "checkpoint.uri" if settings == "checkpoint" else f"{settings}.root"
            return StorageError(f"{what}: the bucket does not exist; create it or fix {location}")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            access = "read/write" if settings == "checkpoint" else "read"
            return StorageError(f"{what}: access denied; grant these credentials {access} on the bucket and prefix")
        return StorageError(f"{what}: S3 error {code}: {error.response.get('Error', {}).get('Message', '')}", retryable)
    return StorageError(f"{what}: {type(error).__name__}: {error}", retryable=True)  # connection closed, read timeout


class S3Writer(ObjectWriter):
    """A multipart upload fed from memory: written bytes are gathered by reference into parts of
    `part_size`; a part that lies in one buffer (the usual case: a staged checkpoint object is one
    buffer) is uploaded from there, one gathered from several pieces is copied into a part buffer
    that is reused from part to part. A thread pool uploads the parts, at most `concurrency` of all
    the storage's writers at once, so memory stays bounded by part size x (concurrency + writers).
    Small objects go up in one PUT. Failed uploads are aborted (leftovers of a killed process: see
    docs/checkpoints.md)."""

    def __init__(self, storage: S3Storage, key: str, progress: Progress, checksum: str) -> None:
        super().__init__(key, progress, checksum)
        self.s3 = storage
        self._object_key = storage.object_key(key)
        self._pieces: list[memoryview] = []  # the part being gathered, by reference
        self._gathered = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []

    def _write(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self.s3.part_size - self._gathered)
            self._hasher.update(view[:take])
            self._pieces.append(view[:take])
            self._gathered += take
            view = view[take:]
            if self._gathered == self.s3.part_size:
                self._submit_part()

    def _take_part(self) -> tuple[memoryview, bytearray | None]:
        """The gathered bytes as one body: the piece itself when there is one, else a reused buffer."""
        pieces, self._pieces, self._gathered = self._pieces, [], 0
        if len(pieces) == 1:
            return pieces[0], None
        buffer = self.s3.take_buffer()
        end = 0
        for piece in pieces:
            buffer[end : end + len(piece)] = piece
            end += len(piece)
        return memoryview(buffer)[:end], buffer

    def _submit_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self.s3.call(
                "start upload",
                self.key,
                self.s3.client.create_multipart_upload,
                Bucket=self.s3.bucket,
                Key=self._object_key,
            )["UploadId"]
        self.s3.slots.acquire()
        for done in self._parts:  # fail fast: stop feeding an upload whose earlier part failed
            error = done.exception() if done.done() else None
            if error is not None:
                self.s3.slots.release()
                raise error
        body, buffer = self._take_part()
        future = self.s3.pool.submit(self._upload_part, len(self._parts) + 1, body)

        def finished(_: Future[dict[str, Any]]) -> None:
            if buffer is not None:
                self.s3.give_buffer(buffer)
            self.s3.slots.release()

        future.add_done_callback(finished)
        self._parts.append(future)

    def _upload_part(self, number: int, body: memoryview) -> dict[str, Any]:
        response = self.s3.call(
            "upload part",
            self.key,
            self.s3.client.upload_part,
            Bucket=self.s3.bucket,
            Key=self._object_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                body = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
                self.s3.call(
                    "upload",
                    self.key,
                    self.s3.client.put_object,
                    Bucket=self.s3.bucket,
                    Key=self._object_key,
                    Body=body,
                )
                return
            if self._gathered:
                self._submit_part()
            parts = [future.result() for future in self._parts]
            self.s3.call(
                "finish upload",
                self.key,
                self.s3.client.complete_multipart_upload,
                Bucket=self.s3.bucket,
                Key=self._object_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self.abort()
            raise
        finally:
            self._pieces = []

    def abort(self) -> None:
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            if not future.cancelled():
                future.exception()  # wait for parts already running
        if self._upload_id is not None:
            try:
                self.s3.client.abort_multipart_upload(
                    Bucket=self.s3.bucket, Key=self._object_key, UploadId=self._upload_id
                )
            except Exception:
                pass
            self._upload_id = None
        self._pieces = []


class _InOrderHasher:
    """Feeds `hasher` the contiguous prefix of a buffer whose ranges complete out of order."""

    def __init__(self, buffer: bytearray, hasher: Hasher | None, start: int = 0) -> None:
        self._view, self._hasher = memoryview(buffer), hasher
        self._hashed = start  # bytes [0, _hashed) went into the hasher
        self._runs: dict[int, int] = {}  # completed but not yet hashed: start -> end
        self._lock = threading.Lock()

    def completed(self, start: int, end: int) -> None:
        if self._hasher is None:
            return
        with self._lock:
            self._runs[start] = end
            while self._hashed in self._runs:
                end = self._runs.pop(self._hashed)
                self._hasher.update(self._view[self._hashed : end])
                self._hashed = end


class S3Storage(Storage):
    remote = True

    def __init__(self, uri: str, options: Any) -> None:
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"checkpoint location '{uri}' names no bucket; use s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.options = options
        self.part_size = int(options.part_size_mb * 2**20)
        self.concurrency = options.concurrency
        self.client = s3_client(options)
        self.pool = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="dvgt-s3", initializer=background_priority
        )
        self.slots = threading.Semaphore(self.concurrency)  # parts in flight, over every writer at once
        self._buffers: list[bytearray] = []  # part buffers of gathered parts, reused
        self._buffers_lock = threading.Lock()

    def take_buffer(self) -> bytearray:
        with self._buffers_lock:
            return self._buffers.pop() if self._buffers else bytearray(self.part_size)

    def give_buffer(self, buffer: bytearray) -> None:
        with self._buffers_lock:
            self._buffers.append(buffer)

    def object_key(self, key: str, prefix: bool = False) -> str:
        check_key(key, prefix)
        return f"{self.prefix}/{key}" if self.prefix else key

    def call(self, what: str, key: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """One S3 request (botocore retries it); any failure becomes a one-line StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"checkpoint object '{key}' not found under {self.uri}") from None
            raise s3_error(error, f"{what} {self.child(key)}") from None
        except BotoCoreError as error:
            raise s3_error(error, f"{what} {self.child(key)}") from None

    def preflight(self, write: bool) -> None:
        """Fail fast, before training, when the bucket cannot be read (or written): a client with a
        short connect timeout and two attempts, so the answer comes within seconds."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.options, preflight=True)
        what = f"checkpoint storage {self.uri}"
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.object_key("", prefix=True), MaxKeys=1)
            if write:
                probe = self.object_key(f".dvgt-write-check-{uuid.uuid4().hex[:8]}")
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as error:
            raise s3_error(error, what) from None

    def open_write(self, key: str, progress: Progress = None, checksum: str = CHECKSUM) -> ObjectWriter:
        return S3Writer(self, key, progress, checksum)

    def _get(self, key: str, start: int, length: int, size: int | None = None) -> GetObjectOutputTypeDef:
        """A ranged GET; with `size`, one that shows the object is of another size is an ObjectSizeError."""
        try:
            response: GetObjectOutputTypeDef = self.call(
                "read",
                key,
                self.client.get_object,
                Bucket=self.bucket,
                Key=self.object_key(key),
                Range=f"bytes={start}-{start + length - 1}",
            )
        except StorageError as error:
            if size is not None and "InvalidRange" in str(error):  # the range starts past the object's end
                raise ObjectSizeError(f"{self.child(key)} is shorter than the {size} bytes expected") from None
            raise
        total = response.get("ContentRange", "").rpartition("/")[2]
        if size is not None and total.isdigit() and int(total) != size:
            response["Body"].close()
            raise ObjectSizeError(f"{self.child(key)} is {total} bytes, not the {size} bytes expected")
        return response

    def _read_into(self, key: str, response: Any, view: memoryview) -> None:
        """A GET's body into `view`, READ_CHUNK at a time (no copy of the whole range in between), and
        on to its end, so that the connection goes back to the pool for the next request."""
        body, filled = response["Body"], 0
        try:
            while filled < len(view):
                count = body.readinto(view[filled : filled + READ_CHUNK])
                if not count:
                    raise StorageError(
                        f"read {self.child(key)}: the server sent {filled} of {len(view)} bytes", retryable=True
                    )
                filled += count
            body.readinto(bytearray(1))  # the end of the body: the connection is released for reuse
        except StorageError:
            raise
        except Exception as error:
            raise s3_error(error, f"read {self.child(key)}") from None
        finally:
            body.close()

    def read(
        self, key: str, progress: Progress = None, hasher: Hasher | None = None, size: int | None = None
    ) -> bytearray:
        """Parallel ranged GETs of part size, each read straight into one buffer of the object's
        size. With `size` known (from a manifest) every range starts at once; otherwise the first
        range's answer tells the size (no HEAD request either way)."""
        part, start = self.part_size, 0
        if size is None:
            try:
                first = self._get(key, 0, part)
            except StorageError as error:
                if "InvalidRange" not in str(error):
                    raise
                return bytearray()  # the range of an empty object is not satisfiable
            total = first.get("ContentRange", "").rpartition("/")[2]
            size = int(total) if total.isdigit() else first["ContentLength"]
            buffer = bytearray(size)
            start = first["ContentLength"]
            self._read_into(key, first, memoryview(buffer)[:start])
        else:
            buffer = bytearray(size)
        hashing = _InOrderHasher(buffer, hasher)
        hashing.completed(0, start)
        if progress and start:
            progress(start)
        view = memoryview(buffer)

        def read_range(offset: int) -> None:
            end = min(offset + part, size)
            self._read_into(key, self._get(key, offset, end - offset, size), view[offset:end])
            hashing.completed(offset, end)
            if progress:
                progress(end - offset)

        for future in [self.pool.submit(read_range, offset) for offset in range(start, size, part)]:
            future.result()
        return buffer

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._get(key, offset, length)["Body"].read()

    def _list_objects(self, prefix: str) -> builtins.list[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self.object_key(prefix, prefix=True)
        keys = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        except Exception as error:
            raise s3_error(error, f"list {self.child(prefix)}") from None
        start = len(self.object_key("", prefix=True))
        return [(k[start:], size) for k, size in keys]

    def list(self, prefix: str = "") -> builtins.list[str]:
        return sorted(k for k, _ in self._list_objects(prefix) if not k.startswith(".dvgt-write-check-"))

    def _uploads(self, prefix: str) -> builtins.list[MultipartUploadTypeDef]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads: builtins.list[MultipartUploadTypeDef] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_key(prefix, prefix=True)):
                uploads += page.get("Uploads", [])
        except Exception as error:
            raise s3_error(error, f"list uploads {self.child(prefix)}") from None
        return uploads

    def unfinished(self, prefix: str = "") -> builtins.list[str]:
        start = len(self.object_key("", prefix=True))
        return sorted(u["Key"][start:] for u in self._uploads(prefix))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self.object_key(k) for k, _ in self._list_objects(prefix)]
        for start in range(0, len(keys), 1000):
            self.call(
                "delete",
                prefix,
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
            )
        for upload in self._uploads(prefix):
            self.call(
                "abort upload",
                upload["Key"],
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )


def open_storage(uri: str, s3: Any = None) -> Storage:
    """The backend for a location URI; `s3` holds the checkpoint.s3.* options (defaults if None)."""
    parsed = urlparse(str(uri))
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme == "file" else uri)
    if parsed.scheme == "s3":
        if s3 is None:
            s3 = S3Config()
        return S3Storage(str(uri), s3)
    raise ValueError(
        f"checkpoint location '{uri}': scheme '{parsed.scheme}://' is not supported; use a local "
        f"folder, file:// or s3://bucket/prefix"
    )


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/run/step_00000004/model.safetensors' -> ('s3://b/run/step_00000004', 'model.safetensors')."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent, name

"""Where checkpoint objects live: one interface, two backends (a local folder, S3-compatible storage).

A location is a URI: a local path or file://..., or s3://bucket/prefix. Keys are '/'-separated paths
relative to it. Writes stream: `open_write(key)` returns a writer that takes chunks of bytes, hashes
them (size, sha256 and xxh3_128: see Digest) as they pass, and makes the object visible only when
it is closed without an error; an exception inside `with storage.open_write(key) as w:` discards
the object (on S3 the multipart upload is aborted). Reads return a whole object (parallel ranged
GETs on S3) or a range.

These primitives (a write stream per file, ranged reads, listing, deletion) are what a
torch.distributed.checkpoint StorageWriter/StorageReader needs from its file system, so FSDP's
sharded checkpoints can sit on the same layer later.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import xxhash

Progress = Optional[Callable[[int], None]]  # called with the number of bytes just transferred


class StorageError(OSError):
    """Checkpoint storage cannot be used (unreachable, no permission, missing bucket, failed upload)."""


class Digest:
    """Checksums of an object's bytes, fed in order. Every object's manifest entry holds two:
    - sha256, the cryptographic digest, checked by `dvgt ckpt verify` and comparable with sha256sum;
    - xxh3_128, checked on every resume: it runs at memory speed (~20 GB/s a core), where sha256
      (~1.5 GB/s) would make a resume's download a third slower. Against bit rot and truncation the
      two are equally sure; against someone who can rewrite objects neither helps, because they can
      rewrite the manifest beside them.
    """

    def __init__(self, sha256: bool = True) -> None:
        self._hashers = {"xxh3_128": xxhash.xxh3_128()}
        if sha256:
            self._hashers["sha256"] = hashlib.sha256()

    def update(self, data: Any) -> None:
        for hasher in self._hashers.values():
            hasher.update(data)

    def hexdigests(self) -> Dict[str, str]:
        return {name: hasher.hexdigest() for name, hasher in self._hashers.items()}


class ObjectWriter(ABC):
    """A stream into one object: `write` chunks, then the context exit commits (or discards on error)."""

    def __init__(self, key: str, progress: Progress = None) -> None:
        self.key = key
        self.size = 0
        self._digest = Digest()
        self._progress = progress
        self.error: Optional[BaseException] = None  # the first write failure (a serialiser may hide it)

    @property
    def digests(self) -> Dict[str, str]:
        """sha256 and xxh3_128 of everything written (see Digest)."""
        return self._digest.hexdigests()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.size += len(view)
        try:
            self._write(view)
        except BaseException as error:
            self.error = self.error or error
            raise
        if self._progress:
            self._progress(len(view))
        return len(view)

    def flush(self) -> None:  # file-like: torch.save may call it
        pass

    @abstractmethod
    def _write(self, view: memoryview) -> None:
        """Store the bytes and feed them to self._digest, in order, by the time commit returns."""

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> "ObjectWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Storage(ABC):
    uri: str

    @abstractmethod
    def open_write(self, key: str, progress: Progress = None) -> ObjectWriter: ...

    @abstractmethod
    def read(self, key: str, progress: Progress = None, hasher: Any = None) -> bytearray:
        """The whole object, in a buffer the caller owns; `hasher` (a Digest or hashlib object) is fed
        the bytes in order while they arrive, so verifying costs no second pass."""

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> List[str]: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under prefix (on S3, unfinished multipart uploads there too)."""

    @abstractmethod
    def unfinished(self, prefix: str = "") -> List[str]:
        """Keys of writes that never finished (a killed process): temporary files, open multipart uploads."""

    def preflight(self, write: bool) -> None:
        """Raise a one-line StorageError now if the location cannot be read (or written)."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def write_bytes(self, key: str, data: bytes) -> ObjectWriter:
        with self.open_write(key) as writer:
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

    def __init__(self, path: Path, key: str, progress: Progress) -> None:
        super().__init__(key, progress)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = open(self._tmp, "wb")

    def _write(self, view: memoryview) -> None:
        self._digest.update(view)
        self._file.write(view)

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

    def _path(self, key: str) -> Path:
        return self.root / key

    def open_write(self, key: str, progress: Progress = None) -> ObjectWriter:
        return LocalWriter(self._path(key), key, progress)

    def _open(self, key: str):
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"checkpoint object '{key}' not found under {self.uri}") from None

    def read(self, key: str, progress: Progress = None, hasher: Any = None) -> bytearray:
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

    def list(self, prefix: str = "") -> List[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and ".tmp-" not in p.name)

    def unfinished(self, prefix: str = "") -> List[str]:
        base = self._path(prefix)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*.tmp-*")) if base.is_dir() else []

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------------------------------------
# S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS)
# ------------------------------------------------------------------------------------------------


def s3_client(options: Any, *, preflight: bool = False):
    """A boto3 S3 client from `checkpoint.s3.*` (see dvgt/config.py S3Config) and the standard AWS
    variables (credentials, profile, region and endpoint are read by boto3 itself).

    Checksums: botocore >= 1.36 adds CRC32 checksums to every upload by default, which several
    S3-compatible stores reject or mishandle; they are sent only where an operation requires them
    (integrity is checked end to end by the manifest's checksums instead: see Digest).
    """
    import boto3
    from botocore.config import Config

    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = options.addressing_style
    if style == "auto":
        style = "path" if endpoint else "virtual"  # MinIO, Ceph, SeaweedFS serve path-style by default
    config = Config(
        s3={"addressing_style": style},
        retries={"mode": "standard" if preflight else options.retry_mode,
                 "max_attempts": 2 if preflight else options.max_attempts},
        connect_timeout=min(2.0, options.connect_timeout_s) if preflight else options.connect_timeout_s,
        read_timeout=min(5.0, options.read_timeout_s) if preflight else options.read_timeout_s,
        max_pool_connections=max(10, 2 * options.concurrency),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=options.endpoint_url or None,
                                          region_name=options.region or None, config=config)


def _explain_s3_error(error: Exception, what: str) -> str:
    """One line naming the problem and the fix."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return (f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE)")
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return (f"{what}: cannot reach the S3 endpoint ({error}); check AWS_ENDPOINT_URL_S3 / "
                f"checkpoint.s3.endpoint_url and that the server is up")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return (f"{what}: the S3 credentials were rejected ({code}); check AWS_ACCESS_KEY_ID, "
                    f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE)")
        if code in ("NoSuchBucket", "404"):
            return f"{what}: the bucket does not exist; create it or fix checkpoint.uri"
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return f"{what}: access denied; grant these credentials read/write on the bucket and prefix"
        return f"{what}: S3 error {code}: {error.response.get('Error', {}).get('Message', '')}"
    return f"{what}: {type(error).__name__}: {error}"


class S3Writer(ObjectWriter):
    """A multipart upload fed from memory: bytes are copied into part-size buffers, each full buffer
    is uploaded by a thread pool, and at most `concurrency` parts of all the storage's writers are
    in flight, so memory stays bounded by part size x (concurrency + writers at once). Small objects
    go up in one PUT. Failed uploads are aborted (leftovers of a killed process: see
    docs/checkpoints.md)."""

    def __init__(self, storage: "S3Storage", key: str, progress: Progress) -> None:
        super().__init__(key, progress)
        self.s3 = storage
        self._object_key = storage.object_key(key)
        self._part_size = storage.part_size
        self._buffer = bytearray()  # the first part grows (small objects stay small); later ones are preallocated
        self._filled = 0
        self._upload_id: Optional[str] = None
        self._parts: List[Future] = []
        self._hashed = threading.Event()  # set once every byte before the next part is in the digest
        self._hashed.set()

    def _write(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self._part_size - self._filled)
            if len(self._buffer) == self._filled:
                self._buffer += view[:take]
            else:
                self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._part_size:
                self._submit_part()

    def _submit_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self.s3.call("start upload", self.key, self.s3.client.create_multipart_upload,
                                           Bucket=self.s3.bucket, Key=self._object_key)["UploadId"]
        self.s3.slots.acquire()
        for done in self._parts:  # fail fast: stop feeding an upload whose earlier part failed
            if done.done() and done.exception() is not None:
                self.s3.slots.release()
                raise done.exception()
        body = self._buffer
        del body[self._filled:]  # the last part may be short (in place, no copy)
        number = len(self._parts) + 1
        previous, self._hashed = self._hashed, threading.Event()
        future = self.s3.pool.submit(self._upload_part, number, body, previous, self._hashed)
        future.add_done_callback(lambda _: self.s3.slots.release())
        self._parts.append(future)
        self._buffer, self._filled = bytearray(self._part_size), 0

    def _upload_part(self, number: int, body: bytearray, previous: threading.Event,
                     hashed: threading.Event) -> Dict[str, Any]:
        """Hash the part once the parts before it are hashed (the digest covers the object in
        order), then upload it: the digests are computed beside the serialiser, not inside it. The
        pool runs parts in submission order, so the part waited for always holds a thread."""
        previous.wait()
        try:
            self._digest.update(body)
        finally:
            hashed.set()
        response = self.s3.call("upload part", self.key, self.s3.client.upload_part, Bucket=self.s3.bucket,
                                Key=self._object_key, UploadId=self._upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": response["ETag"]}

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                body = bytes(self._buffer[:self._filled])
                self._digest.update(body)
                self.s3.call("upload", self.key, self.s3.client.put_object, Bucket=self.s3.bucket,
                             Key=self._object_key, Body=body)
                return
            if self._filled:
                self._submit_part()
            parts = [future.result() for future in self._parts]
            self.s3.call("finish upload", self.key, self.s3.client.complete_multipart_upload,
                         Bucket=self.s3.bucket, Key=self._object_key, UploadId=self._upload_id,
                         MultipartUpload={"Parts": parts})
        except BaseException:
            self.abort()
            raise
        finally:
            self._buffer = bytearray()

    def abort(self) -> None:
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            if not future.cancelled():
                future.exception()  # wait for parts already running
        if self._upload_id is not None:
            try:
                self.s3.client.abort_multipart_upload(Bucket=self.s3.bucket, Key=self._object_key,
                                                      UploadId=self._upload_id)
            except Exception:  # noqa: BLE001 - the server may be down; prune or a lifecycle rule cleans up
                pass
            self._upload_id = None
        self._buffer = bytearray()


class _BufferTarget(io.RawIOBase):
    """A seekable, writable view of a preallocated buffer: the target of parallel ranged downloads.
    Ranges arrive out of order; `hasher` is fed the contiguous prefix as soon as it grows."""

    def __init__(self, buffer: bytearray, hasher: Any = None) -> None:
        self._view = memoryview(buffer)
        self._pos = 0
        self._hasher = hasher
        self._hashed = 0  # bytes [0, _hashed) went into the hasher
        self._runs: Dict[int, int] = {}  # written but not yet hashed: start -> end

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = offset if whence == io.SEEK_SET else self._pos + offset if whence == io.SEEK_CUR \
            else len(self._view) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        start, self._pos = self._pos, self._pos + len(data)
        self._view[start:self._pos] = data
        if self._hasher is not None:
            self._runs[start] = self._pos
            while self._hashed in self._runs:
                end = self._runs.pop(self._hashed)
                self._hasher.update(self._view[self._hashed:end])
                self._hashed = end
        return len(data)


class S3Storage(Storage):
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
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="dvgt-s3")
        self.slots = threading.Semaphore(self.concurrency)  # parts in flight, over every writer at once

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def call(self, what: str, key: str, method: Callable, **kwargs) -> Any:
        """One S3 request (botocore retries it); any failure becomes a one-line StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"checkpoint object '{key}' not found under {self.uri}") from None
            raise StorageError(_explain_s3_error(error, f"{what} {self.child(key)}")) from None
        except BotoCoreError as error:
            raise StorageError(_explain_s3_error(error, f"{what} {self.child(key)}")) from None

    def preflight(self, write: bool) -> None:
        """Fail fast, before training, when the bucket cannot be read (or written): a client with a
        short connect timeout and two attempts, so the answer comes within seconds."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.options, preflight=True)
        what = f"checkpoint storage {self.uri}"
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.object_key(""), MaxKeys=1)
            if write:
                probe = self.object_key(f".dvgt-write-check-{uuid.uuid4().hex[:8]}")
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                client.delete_object(Bucket=self.bucket, Key=probe)
        except (BotoCoreError, ClientError) as error:
            raise StorageError(_explain_s3_error(error, what)) from None

    def open_write(self, key: str, progress: Progress = None) -> ObjectWriter:
        return S3Writer(self, key, progress)

    def read(self, key: str, progress: Progress = None, hasher: Any = None) -> bytearray:
        from boto3.s3.transfer import TransferConfig

        head = self.call("read", key, self.client.head_object, Bucket=self.bucket, Key=self.object_key(key))
        buffer = bytearray(head["ContentLength"])
        config = TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                                max_concurrency=self.concurrency)
        self.call("download", key, self.client.download_fileobj, Bucket=self.bucket, Key=self.object_key(key),
                  Fileobj=_BufferTarget(buffer, hasher), Config=config, Callback=progress)
        return buffer

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        response = self.call("read", key, self.client.get_object, Bucket=self.bucket, Key=self.object_key(key),
                             Range=f"bytes={offset}-{offset + length - 1}")
        return response["Body"].read()

    def _list_objects(self, prefix: str) -> List[Tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self.object_key(prefix)
        keys = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        except Exception as error:  # noqa: BLE001
            raise StorageError(_explain_s3_error(error, f"list {self.child(prefix)}")) from None
        start = len(self.object_key(""))
        return [(k[start:], size) for k, size in keys]

    def list(self, prefix: str = "") -> List[str]:
        return sorted(k for k, _ in self._list_objects(prefix) if not k.startswith(".dvgt-write-check-"))

    def _uploads(self, prefix: str) -> List[Dict[str, Any]]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_key(prefix)):
                uploads += page.get("Uploads", [])
        except Exception as error:  # noqa: BLE001
            raise StorageError(_explain_s3_error(error, f"list uploads {self.child(prefix)}")) from None
        return uploads

    def unfinished(self, prefix: str = "") -> List[str]:
        start = len(self.object_key(""))
        return sorted(u["Key"][start:] for u in self._uploads(prefix))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self.object_key(k) for k, _ in self._list_objects(prefix)]
        for start in range(0, len(keys), 1000):
            self.call("delete", prefix, self.client.delete_objects, Bucket=self.bucket,
                      Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
        for upload in self._uploads(prefix):
            self.call("abort upload", upload["Key"], self.client.abort_multipart_upload, Bucket=self.bucket,
                      Key=upload["Key"], UploadId=upload["UploadId"])


def open_storage(uri: str, s3: Any = None) -> Storage:
    """The backend for a location URI; `s3` holds the checkpoint.s3.* options (defaults if None)."""
    parsed = urlparse(str(uri))
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme == "file" else uri)
    if parsed.scheme == "s3":
        if s3 is None:
            from dvgt.config import S3Config

            s3 = S3Config()
        return S3Storage(str(uri), s3)
    raise ValueError(f"checkpoint location '{uri}': scheme '{parsed.scheme}://' is not supported; use a local "
                     f"folder, file:// or s3://bucket/prefix")


def split_uri(uri: str) -> Tuple[str, str]:
    """'s3://b/run/step_00000004/model.safetensors' -> ('s3://b/run/step_00000004', 'model.safetensors')."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent, name

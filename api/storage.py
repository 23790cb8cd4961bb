"""Object store: where checkpoints and dataset archives live, behind one small interface.

Two backends: ``S3Store`` (boto3; AWS, MinIO or a moto server via ``PELTUNE_S3_ENDPOINT_URL``) and ``LocalStore``
(a folder). Rows in SQL keep full URIs (``s3://bucket/key``, ``file:///abs/path``), so a row stays readable
when the configured store changes; ``store_for_uri`` turns such a URI back into (store, key).

Nothing here reads a whole object into memory: uploads use boto3's managed transfer (multipart above
``s3_multipart_threshold_bytes``, parts read from the file as they are sent), downloads are written to a file
(ranged GETs above the threshold) or streamed in chunks. Every S3 call is retried by botocore with exponential
backoff on 5xx, throttling, connection errors and timeouts (``s3_retry_mode``, ``s3_max_attempts``, and
connect/read timeouts so a stalled endpoint cannot hang a request).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from api.settings import Settings, get_settings

CHUNK_SIZE = 1024 * 1024

log = logging.getLogger(__name__)


class StorageError(Exception):
    """A URI we cannot use, or an object that is not there."""


class ObjectNotFound(StorageError):
    pass


class ObjectStore(Protocol):
    def uri(self, key: str) -> str: ...

    def put_file(self, key: str, path: Path) -> str:
        """Upload a local file under key; returns the object's URI."""
        ...

    def get_file(self, key: str, dest: Path) -> Path:
        """Download key to dest (written under a temporary name, then renamed)."""
        ...

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""
        ...


class LocalStore:
    """A folder as an object store; keys are relative paths below it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    def path(self, key: str) -> Path:
        # normpath, not resolve(): refuse ".." in keys, but follow no symlinks (a registered file:// URI may be one).
        path = Path(os.path.normpath(self.root / key.lstrip("/")))
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return path

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_file(self, key: str, path: Path) -> str:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        shutil.copyfile(path, partial)
        partial.replace(dest)  # atomic: readers never see a half-written object
        return dest.as_uri()

    def get_file(self, key: str, dest: Path) -> Path:
        source = self._existing(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return dest

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        source = self._existing(key)  # raise now, not at the first next()

        def chunks() -> Iterator[bytes]:
            with open(source, "rb") as stream:
                while chunk := stream.read(chunk_size):
                    yield chunk

        return chunks()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def _existing(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object at {path.as_uri()}")
        return path


class S3Store:
    """An S3 bucket (optionally below a key prefix)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        settings: Settings | None = None,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        settings = settings or get_settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(
            endpoint_url,
            retry_mode=settings.s3_retry_mode,
            max_attempts=settings.s3_max_attempts,
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
        )
        # Multipart above the threshold, so multi-GB checkpoints go up and down in parts (each retried on its own)
        # and never sit in memory whole.
        # Downloads: parts arrive on 10 threads and wait for the one writer thread in a queue of 256 KiB pieces;
        # 16 of them (4 MiB, not boto3's 100) bound what a fast network can pile up in memory ahead of the disk.
        self._transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=settings.s3_multipart_chunk_bytes,
            max_io_queue=16,
        )

    def key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.key(key)}"

    def put_file(self, key: str, path: Path) -> str:
        from boto3.exceptions import S3UploadFailedError

        with _s3_errors(self.uri(key)):
            try:
                self.client.upload_file(str(path), self.bucket, self.key(key), Config=self._transfer)
            except S3UploadFailedError as exc:
                raise StorageError(f"{self.uri(key)}: {exc}") from exc
        return self.uri(key)

    def get_file(self, key: str, dest: Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            with _s3_errors(self.uri(key)):
                self.client.download_file(self.bucket, self.key(key), partial, Config=self._transfer)
            os.replace(partial, dest)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return dest

    def open_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with _s3_errors(self.uri(key)):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return chunks()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        with _s3_errors(self.uri(key)):
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(key))["ContentLength"])

    def delete(self, key: str) -> None:
        with _s3_errors(self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(key))


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Every boto3 failure as our own error: a missing object is ObjectNotFound, anything else (denied, no
    credentials, endpoint unreachable) a StorageError naming the object, so callers never see botocore types."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        if _is_not_found(exc):
            raise ObjectNotFound(f"no object at {uri}") from exc
        raise StorageError(f"{uri}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


@lru_cache(maxsize=8)
def s3_client(
    endpoint_url: str | None,
    *,
    retry_mode: str = "standard",
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """One boto3 client per endpoint and retry policy (clients are thread-safe; creating one costs tens of ms).

    ``max_attempts`` counts the first try; botocore backs off exponentially with jitter between attempts."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},  # botocore's "max_attempts" = retries
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


@contextmanager
def removed_on_error(store: ObjectStore, key: str) -> Iterator[None]:
    """Delete the object at key if the block fails: an object stored for a row that was never committed (the
    database went away, a constraint failed) must not stay behind as an orphan."""
    try:
        yield
    except BaseException:
        try:
            store.delete(key)
        except StorageError:
            log.warning("could not remove %s after a failed registration; it is an orphan", store.uri(key))
        raise


def _is_not_found(exc: Any) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def file_uri_path(uri: str) -> Path:
    """The local path of a ``file://`` URI (``file:///abs/path``; a host other than localhost is refused)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise StorageError(f"not a file:// URI: {uri!r}")
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"file:// URI with a host is not supported: {uri!r} (use file:///absolute/path)")
    path = unquote(parsed.path)
    if not path.startswith("/"):
        raise StorageError(f"file:// URI must hold an absolute path: {uri!r}")
    return Path(path)


def store_from_url(url: str, *, endpoint_url: str | None = None, settings: Settings | None = None) -> ObjectStore:
    """The store a ``PELTUNE_STORAGE_URL`` names: ``s3://bucket[/prefix]`` or ``file:///folder``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URL without a bucket: {url!r}")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, settings=settings)
    if parsed.scheme == "file":
        return LocalStore(file_uri_path(url))
    raise StorageError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///path")


def get_store(settings: Settings | None = None) -> ObjectStore:
    """The configured object store, where new objects are written."""
    settings = settings or get_settings()
    return store_from_url(settings.storage_url, endpoint_url=settings.s3_endpoint_url, settings=settings)


def store_for_uri(uri: str, settings: Settings | None = None) -> tuple[ObjectStore, str]:
    """(store, key) for a stored object's URI: ``s3://bucket/key`` or ``file:///abs/path``."""
    settings = settings or get_settings()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        key = parsed.path.lstrip("/")
        if not parsed.netloc or not key:
            raise StorageError(f"S3 URI must name a bucket and a key: {uri!r}")
        return S3Store(parsed.netloc, endpoint_url=settings.s3_endpoint_url, settings=settings), key
    if parsed.scheme == "file":
        path = file_uri_path(uri)
        return LocalStore(path.parent), path.name
    raise StorageError(f"unsupported URI {uri!r}: use s3://bucket/key or file:///absolute/path")


def localize(uri: str, tmp_dir: Path, settings: Settings | None = None) -> Path:
    """A local path for the object at uri: a ``file://`` path as is (no copy), an S3 object downloaded into tmp_dir.

    A ``file://`` URI may name a folder (datasets registered in place); an S3 URI must name one object.
    """
    if urlparse(uri).scheme == "file":
        path = file_uri_path(uri)
        if not path.exists():
            raise ObjectNotFound(f"nothing at {uri}")
        return path
    store, key = store_for_uri(uri, settings)
    name = Path(key).name or "object"
    return store.get_file(key, Path(tmp_dir) / name)


def normalise_uri(uri: str) -> str:
    """Canonical spelling of a URI, as the rest of this module reads it: the scheme lower-cased (``urlparse`` does,
    so ``S3://`` and ``FILE:`` reach the same objects as ``s3://`` and ``file:``), ``file:`` URIs as
    ``Path.as_uri()`` writes them (host dropped, ``..`` and repeated slashes folded), ``s3:`` as
    ``s3://bucket/key``. Registration checks read this form and rows store it, so what was checked is what is used.
    Other schemes come back stripped, for the store to refuse by name."""
    uri = uri.strip()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        # "//x" is a distinct path on POSIX (normpath keeps two leading slashes): fold it to "/x".
        return Path(os.path.normpath("/" + str(file_uri_path(uri)).lstrip("/"))).as_uri()
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI must name a bucket: {uri!r} (use s3://bucket/key)")
        if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
            raise StorageError(f"s3:// URIs may not contain '?' or '#': {uri!r}")
        return f"s3://{parsed.netloc}{parsed.path}"
    return uri


def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()

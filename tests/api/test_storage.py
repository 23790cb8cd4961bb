"""Object stores: the local folder and S3 (a real moto server over HTTP) behave alike."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from api.settings import Settings
from api.storage import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    file_digest,
    file_uri_path,
    localize,
    store_for_uri,
    store_from_url,
)
from tests.services import S3_BUCKET, s3_client
from tests.tcp_proxy import HttpFaultProxy


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, Settings]:
    if request.param == "local":
        return LocalStore(tmp_path / "objects"), Settings(home=tmp_path)
    endpoint = request.getfixturevalue("s3_endpoint")
    store = S3Store(S3_BUCKET, f"storage-{os.getpid()}-{tmp_path.name}", endpoint_url=endpoint)
    return store, Settings(home=tmp_path, s3_endpoint_url=endpoint)


@pytest.fixture
def store(store_settings: tuple[ObjectStore, Settings]) -> ObjectStore:
    return store_settings[0]


def test_round_trip_streams_and_existence(store_settings: tuple[ObjectStore, Settings], tmp_path: Path) -> None:
    store, settings = store_settings
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB chunks plus a remainder
    source = tmp_path / "source.bin"
    source.write_bytes(payload)

    uri = store.put_file("a/b/blob.bin", source)
    assert uri == store.uri("a/b/blob.bin")
    assert store.exists("a/b/blob.bin") and not store.exists("a/b/other.bin")
    assert store.size("a/b/blob.bin") == len(payload)

    chunks = list(store.open_stream("a/b/blob.bin", chunk_size=1024 * 1024))
    assert len(chunks) >= 4 and max(len(c) for c in chunks) <= 1024 * 1024
    assert b"".join(chunks) == payload

    dest = store.get_file("a/b/blob.bin", tmp_path / "out" / "copy.bin")
    assert dest.read_bytes() == payload

    # A stored URI resolves back to the same object, through a store built from the URI alone.
    other, key = store_for_uri(uri, settings)
    assert b"".join(other.open_stream(key)) == payload


def test_missing_objects_raise_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.open_stream("nope.bin")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope.bin", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        store.size("nope.bin")
    assert not (tmp_path / "x").exists()


def test_s3_objects_land_in_the_bucket_under_the_prefix(s3_endpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"hello")
    store = store_from_url(f"s3://{S3_BUCKET}/pfx/sub", endpoint_url=s3_endpoint)
    assert store.put_file("k.bin", source) == f"s3://{S3_BUCKET}/pfx/sub/k.bin"
    body = s3_client(s3_endpoint).get_object(Bucket=S3_BUCKET, Key="pfx/sub/k.bin")["Body"].read()
    assert body == b"hello"


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(StorageError, match="escapes"):
        store.path("../outside.bin")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file://server/share/x", "host"),
        ("http://example.com/x", "unsupported"),
        ("s3://bucket-only", "bucket and a key"),
    ],
)
def test_unusable_uris_are_refused(uri: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=message):
        store_for_uri(uri, Settings(home=tmp_path))


def test_localize_uses_local_files_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "data folder"
    folder.mkdir()
    assert file_uri_path(folder.as_uri()) == folder  # percent-encoding round-trips
    assert localize(folder.as_uri(), tmp_path / "scratch") == folder
    assert not (tmp_path / "scratch").exists()
    with pytest.raises(ObjectNotFound):
        localize((tmp_path / "missing").as_uri(), tmp_path / "scratch")


def test_s3_failures_are_storage_errors_naming_the_object(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from botocore.config import Config

    source = tmp_path / "x.bin"
    source.write_bytes(b"x")
    # No credentials anywhere: boto3 raises NoCredentialsError, which the API used to answer with a 500.
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    unreachable = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s").client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    for client in (anonymous, unreachable):
        store = S3Store(S3_BUCKET, "p", client=client)
        calls = [
            (store.size, ("k",)),
            (store.get_file, ("k", tmp_path / "out")),
            (store.put_file, ("k", source)),
            (store.open_stream, ("k",)),
        ]
        for method, args in calls:
            with pytest.raises(StorageError, match=f"s3://{S3_BUCKET}/p/k") as caught:
                method(*args)
            assert not isinstance(caught.value, ObjectNotFound)


# ------------------------------------------------------------------------------------ S3 faults and large files

MiB = 1024 * 1024


def s3_store_via(endpoint: str, tmp_path: Path, **settings: object) -> S3Store:
    """An S3Store with the service's own retry/transfer configuration built from Settings."""
    config = Settings(home=tmp_path, s3_endpoint_url=endpoint, **settings)
    return S3Store(S3_BUCKET, f"faults-{os.getpid()}-{tmp_path.name}", endpoint_url=endpoint, settings=config)


def moto_address(s3_endpoint: str) -> tuple[str, int]:
    host, port = s3_endpoint.removeprefix("http://").split(":")
    return host, int(port)


def test_s3_errors_are_retried_with_backoff(s3_endpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(100_000))
    proxy = HttpFaultProxy(moto_address(s3_endpoint), faults=2)  # the first two requests get 503 SlowDown
    try:
        store = s3_store_via(proxy.endpoint, tmp_path, s3_max_attempts=4)
        store.put_file("k.bin", source)
        assert [line.split()[0] for line in proxy.faulted] == ["PUT", "PUT"]  # the same upload, twice refused
        proxy.faults = 2
        copy = store.get_file("k.bin", tmp_path / "copy.bin")
        assert len(proxy.faulted) == 4
    finally:
        proxy.close()
    assert copy.read_bytes() == source.read_bytes()


def test_s3_read_timeouts_are_retried(s3_endpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(b"stalled once")
    # The first request is never answered: the client gives up after its read timeout and tries again.
    proxy = HttpFaultProxy(moto_address(s3_endpoint), faults=1, stall_s=5)
    try:
        store = s3_store_via(proxy.endpoint, tmp_path, s3_read_timeout_s=1, s3_max_attempts=3)
        store.put_file("stalled.bin", source)
        assert store.size("stalled.bin") == source.stat().st_size
        assert len(proxy.faulted) == 1
    finally:
        proxy.close()


def test_s3_gives_up_after_max_attempts_naming_the_object(s3_endpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(b"x")
    proxy = HttpFaultProxy(moto_address(s3_endpoint), faults=1000)  # the store is down for good
    try:
        store = s3_store_via(proxy.endpoint, tmp_path, s3_max_attempts=3)
        with pytest.raises(StorageError, match=rf"{store.uri('k.bin')}: .*\(503\).*max retries") as caught:
            store.size("k.bin")
        assert not isinstance(caught.value, ObjectNotFound)
        assert len(proxy.faulted) == 3  # exactly s3_max_attempts tries, then a clear error
        with pytest.raises(StorageError, match=store.uri("k.bin")):
            store.put_file("k.bin", source)
        assert len(proxy.faulted) == 6
    finally:
        proxy.close()


def test_large_files_go_up_and_down_as_multipart_streams(s3_endpoint: str, tmp_path: Path) -> None:
    size = 40 * MiB + 17  # nine parts of at most 5 MiB
    source = tmp_path / "large.bin"
    with open(source, "wb") as out:
        for _ in range(40):
            out.write(os.urandom(MiB))
        out.write(os.urandom(17))
    _, digest = file_digest(source)
    # Through a proxy that refuses the first three connections: failed parts are retried on their own.
    proxy = HttpFaultProxy(moto_address(s3_endpoint), faults=3)
    try:
        store = s3_store_via(
            proxy.endpoint, tmp_path, s3_multipart_threshold_bytes=5 * MiB, s3_multipart_chunk_bytes=5 * MiB
        )
        tracemalloc.start()
        try:
            store.put_file("large.bin", source)
            _, upload_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            copy = store.get_file("large.bin", tmp_path / "copy.bin")
            _, download_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(proxy.faulted) == 3
    finally:
        proxy.close()
    head = s3_client(s3_endpoint).head_object(Bucket=S3_BUCKET, Key=store.key("large.bin"))
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith("-9")  # a multipart object's ETag counts its parts
    assert file_digest(copy) == (size, digest)
    print(f"peak Python memory: upload {upload_peak / MiB:.1f} MiB, download {download_peak / MiB:.1f} MiB")
    # Streamed, not read whole: the peak stays well below the file's size.
    assert upload_peak < size / 2 and download_peak < size / 2

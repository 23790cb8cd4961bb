"""Object stores: the local folder and S3 (a real moto server over HTTP) behave alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.settings import Settings
from api.storage import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    file_uri_path,
    localize,
    store_for_uri,
    store_from_url,
)
from tests.services import S3_BUCKET, s3_client


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

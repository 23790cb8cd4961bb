"""Presigned checkpoint links signed for the public S3 endpoint, fetched over HTTP from a real (moto) S3 server."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient suggests httpx2 (as in tests/api/conftest.py)
    from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.factories import make_checkpoint
from tests.services import S3_BUCKET


@pytest.fixture
def settings(migrated_sqlite: str, s3_endpoint: str, tmp_path: Path) -> Settings:
    # The service reaches S3 as 127.0.0.1 (its "in-network" name here); clients are told to use "localhost", the
    # same server under another host name, as a compose stack has minio:9000 inside and 127.0.0.1:9000 outside.
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    return Settings(
        home=tmp_path / "home",
        database_url=migrated_sqlite,
        storage_url=f"s3://{S3_BUCKET}/links-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=s3_endpoint,
        s3_public_endpoint_url=public,
        auto_migrate=False,
    )


def test_link_is_signed_for_the_public_endpoint_and_downloads_the_bytes(settings: Settings, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "tiny.pt")
    with TestClient(create_app(settings)) as client:
        with open(path, "rb") as stream:
            created = client.post("/v1/checkpoints", files={"file": ("tiny.pt", stream)})
        assert created.status_code == 201, created.text
        checkpoint_id = created.json()["id"]
        response = client.get(f"/v1/checkpoints/{checkpoint_id}/link")
    assert response.status_code == 200, response.text
    url = urlparse(response.json()["url"])
    public = urlparse(settings.s3_public_endpoint_url)
    assert (url.hostname, url.port) == ("localhost", public.port)  # not the in-network 127.0.0.1
    assert url.path.startswith(f"/{S3_BUCKET}/")  # path-style: no per-bucket DNS name needed
    assert "X-Amz-Signature=" in url.query and "X-Amz-Expires=3600" in url.query
    download = httpx.get(response.json()["url"], timeout=30)
    assert download.status_code == 200
    assert download.content == path.read_bytes()
    assert f'filename="{checkpoint_id}.pt"' in download.headers["content-disposition"]


def test_no_link_for_a_local_folder_store(migrated_sqlite: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", database_url=migrated_sqlite, auto_migrate=False)
    path = make_checkpoint(tmp_path / "tiny.pt")
    with TestClient(create_app(settings)) as client:
        with open(path, "rb") as stream:
            checkpoint_id = client.post("/v1/checkpoints", files={"file": ("tiny.pt", stream)}).json()["id"]
        response = client.get(f"/v1/checkpoints/{checkpoint_id}/link")
        assert client.get(f"/v1/checkpoints/{uuid.uuid4().hex}/link").status_code == 404
    assert response.status_code == 409
    assert "/download" in response.json()["detail"]

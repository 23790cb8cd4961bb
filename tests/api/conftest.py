"""API test fixtures: the app on SQLite and on a fresh PostgreSQL database, schema by `alembic upgrade head`."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # Starlette's TestClient suggests httpx2; httpx is what pyproject pins and what the API's clients use.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import Settings
from tests.services import DUMMY_AWS, S3_BUCKET, alembic_upgrade_head, fresh_postgres_database, moto_s3_server


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One migrated database per backend for the whole session (tests use fresh ids, never assume emptiness)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite')}/peltune.db"
        alembic_upgrade_head(url)
        yield url
        return
    with fresh_postgres_database() as url:
        alembic_upgrade_head(url)
        yield url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Embedded defaults under a fresh home (local store, filesystem broker), the backend's database, and a queue
    of its own."""
    return Settings(
        home=tmp_path / "home",
        database_url=database_url,
        task_queue=f"test-{uuid.uuid4().hex[:8]}",
        auto_migrate=False,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server over HTTP for the session; dummy AWS credentials in the environment while it runs."""
    saved = {key: os.environ.get(key) for key in DUMMY_AWS}
    os.environ.update(DUMMY_AWS)
    try:
        with moto_s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
            yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    return settings.model_copy(update={"storage_url": f"s3://{S3_BUCKET}/{prefix}", "s3_endpoint_url": s3_endpoint})


@pytest.fixture
def s3_client_app(s3_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings)) as test_client:
        yield test_client

"""PostgreSQL goes away and comes back: the API answers 503 with Retry-After (never 500, never a hang), stores
nothing half-way, and serves again by itself once the database is reachable.

The API talks to a real PostgreSQL through a TCP forwarder that the test cuts, blackholes and restores; the shared
server itself is never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import make_url

from api.errors import DATABASE_UNAVAILABLE
from api.main import create_app
from api.settings import Settings, get_settings
from tests.factories import make_archive, make_dataset
from tests.services import PG_HOST, PG_PORT, alembic_upgrade_head, fresh_postgres_database
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxied_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, TcpProxy]]:
    """A migrated fresh database and a URL that reaches it only through a TcpProxy."""
    # The shortest connect timeout libpq allows, so the blackholed case answers in seconds.
    monkeypatch.setenv("PELTUNE_DB_CONNECT_TIMEOUT_S", "2")
    get_settings.cache_clear()
    with fresh_postgres_database() as url:
        alembic_upgrade_head(url)
        proxy = TcpProxy((PG_HOST, PG_PORT))
        try:
            yield make_url(url).set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False), proxy
        finally:
            proxy.close()
            get_settings.cache_clear()


def assert_unavailable(response) -> None:  # noqa: ANN001 - httpx.Response
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": DATABASE_UNAVAILABLE}
    assert response.headers["retry-after"] == "5"


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_database_outage_is_503_and_the_api_recovers_by_itself(
    proxied_database: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    url, proxy = proxied_database
    settings = Settings(home=tmp_path / "home", database_url=url, auto_migrate=False)
    archive = make_archive(make_dataset(tmp_path / "cells", n=3), tmp_path / "cells.zip")
    objects = settings.home / "objects"

    def upload():  # noqa: ANN202 - httpx.Response
        with open(archive, "rb") as stream:
            return client.post("/v1/datasets", files={"file": (archive.name, stream)})

    with TestClient(create_app(settings)) as client:
        before = upload()
        assert before.status_code == 201, before.text
        dataset_id = before.json()["id"]
        assert len(stored_files(objects)) == 1

        proxy.down()  # connections cut, new ones refused
        assert_unavailable(client.get("/v1/datasets"))
        assert_unavailable(client.get(f"/v1/datasets/{dataset_id}"))
        job = {"kind": "baseline", "dataset_id": dataset_id, "config": {"patch_size": 32}}
        assert_unavailable(client.post("/v1/jobs", json=job))
        # The archive was validated and stored before the insert failed: the stored copy is removed again.
        assert_unavailable(upload())
        assert len(stored_files(objects)) == 1
        assert stored_files(settings.home / "tmp" / "uploads") == []

        proxy.blackhole()  # connections accepted but never answered: the connect timeout ends the wait
        assert_unavailable(client.get("/v1/datasets"))

        proxy.up()  # the same API process, no restart: the pool reconnects
        listed = client.get("/v1/datasets")
        assert listed.status_code == 200, listed.text
        assert [d["id"] for d in listed.json()] == [dataset_id]
        after = upload()
        assert after.status_code == 201, after.text
        assert len(stored_files(objects)) == 2


def test_other_database_errors_are_not_disguised_as_outages(tmp_path: Path) -> None:
    # An unmigrated database answers, with "relation does not exist": a deployment bug, not "retry later", so it
    # stays a 500 (with its traceback in the log).
    with fresh_postgres_database() as url:
        settings = Settings(home=tmp_path / "home", database_url=url, auto_migrate=False)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            response = client.get("/v1/datasets")
    assert response.status_code == 500

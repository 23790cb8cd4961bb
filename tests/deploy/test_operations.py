"""/readyz, /metrics and the JSON log format, on the app with real dependencies (or real unreachable ones)."""

from __future__ import annotations

import json
import logging
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient suggests httpx2 (as in tests/api/conftest.py)
    from fastapi.testclient import TestClient

from api.db import crud
from api.db.models import JobKind, JobStatus, utcnow
from api.db.session import get_sessionmaker
from api.logs import JsonFormatter, current_job_id, current_scope, current_tenant
from api.main import create_app
from api.queue import enqueue_job
from api.settings import Settings
from tests.deploy.conftest import entrypoint_env, run_entrypoint
from tests.services import (
    REDIS_URL,
    S3_BUCKET,
    forget_redis_queue,
    free_port,
    fresh_postgres_database,
    redis_client,
)


@pytest.fixture
def settings(migrated_sqlite: str, tmp_path: Path) -> Settings:
    # A fresh database per test (jobs are counted): a copy of the migrated one.
    source = Path(migrated_sqlite.removeprefix("sqlite:///"))
    database = tmp_path / "peltune.db"
    database.write_bytes(source.read_bytes())
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{database}",
        task_queue=f"ops-{uuid.uuid4().hex[:8]}",
        auto_migrate=False,
    )


def client_for(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# -- /readyz --------------------------------------------------------------------------------------------------------


def test_ready_on_the_embedded_defaults(settings: Settings) -> None:
    with client_for(settings) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["failed"] == []
    assert set(body["checks"]) == {"database", "broker", "object_store"}


def test_unreachable_redis_is_named_and_answers_503(settings: Settings) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with client_for(settings.model_copy(update={"broker_url": dead})) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200  # the process itself is fine: liveness stays up
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unready"
    assert body["failed"] == ["broker"]
    assert "onnect" in body["checks"]["broker"]  # ConnectionError: ... connecting to 127.0.0.1:PORT
    assert body["checks"]["database"] == "ok"


def test_unreachable_database_is_named(settings: Settings) -> None:
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/peltune"
    with client_for(settings.model_copy(update={"database_url": dead})) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["database"]


def test_object_store_on_s3_ready_and_missing_bucket(settings: Settings, s3_endpoint: str) -> None:
    good = settings.model_copy(update={"storage_url": f"s3://{S3_BUCKET}/ops", "s3_endpoint_url": s3_endpoint})
    with client_for(good) as client:
        assert client.get("/readyz").status_code == 200
    missing = good.model_copy(update={"storage_url": f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/ops"})
    with client_for(missing) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["object_store"]
    assert "404" in response.json()["checks"]["object_store"]


# -- /metrics -------------------------------------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_and_status(settings: Settings) -> None:
    with client_for(settings) as client:
        for _ in range(2):
            assert client.get(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404
        assert client.get("/healthz").status_code == 200
        assert client.get("/no/such/route").status_code == 404
        values = samples(client)
    get = (("method", "GET"),)

    def requests(route: str, status: str) -> float:
        return values.get(("peltune_http_requests_total", (*get, ("route", route), ("status", status))), 0.0)

    assert requests("/v1/jobs/{job_id}", "404") == 2
    assert requests("/healthz", "200") == 1
    assert requests("/no/such/route", "404") == 0  # raw paths never become labels
    assert requests("unmatched", "404") == 1
    assert values[("peltune_http_request_duration_seconds_count", (*get, ("route", "/v1/jobs/{job_id}")))] == 2
    assert values[("peltune_http_request_duration_seconds_sum", (*get, ("route", "/v1/jobs/{job_id}")))] > 0


def _seed_jobs(settings: Settings) -> None:
    """One job in each of queued, running, succeeded (after 90 s) and failed (after 4000 s)."""
    start = utcnow() - timedelta(hours=3)
    with get_sessionmaker(settings.database_url)() as session:
        dataset = crud.create_dataset(session, name="d", uri="file:///data", num_images=3, splits={"train": 3})
        jobs = [
            crud.create_job(
                session, kind=JobKind.baseline, dataset_id=dataset.id, checkpoint_id=None, nprocs=1, config={}
            )
            for _ in range(4)
        ]
        for job in jobs[1:]:
            assert crud.claim_job(session, job_id=job.id, now=start)
        assert crud.finish_job(
            session, job_id=jobs[2].id, status=JobStatus.succeeded, now=start + timedelta(seconds=90)
        )
        assert crud.finish_job(
            session, job_id=jobs[3].id, status=JobStatus.failed, error="x", now=start + timedelta(seconds=4000)
        )
        session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The settings on a fresh migrated SQLite database, or on a fresh PostgreSQL one migrated by the entry point."""
    if request.param == "sqlite":
        yield settings
        return
    with fresh_postgres_database("peltune_ops") as url:
        result = run_entrypoint("migrate", env=entrypoint_env(tmp_path, PELTUNE_DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        yield settings.model_copy(update={"database_url": url})


def test_jobs_by_state_and_their_durations(any_database: Settings) -> None:
    _seed_jobs(any_database)
    with client_for(any_database) as client:
        values = samples(client)
    by_state = {labels[0][1]: value for (name, labels), value in values.items() if name == "peltune_jobs"}
    assert by_state == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 0}

    def duration(status: str, suffix: str, le: str | None = None) -> float:
        labels = (("le", le),) if le else ()
        return values[(f"peltune_job_duration_seconds_{suffix}", tuple(sorted((*labels, ("status", status)))))]

    assert duration("succeeded", "count") == 1
    assert duration("succeeded", "sum") == pytest.approx(90)
    assert (duration("succeeded", "bucket", "60.0"), duration("succeeded", "bucket", "300.0")) == (0, 1)
    assert duration("failed", "sum") == pytest.approx(4000)
    assert (duration("failed", "bucket", "3600.0"), duration("failed", "bucket", "7200.0")) == (0, 1)
    assert duration("cancelled", "count") == 0
    assert values[("peltune_scrape_errors", (("source", "database"),))] == 0


def test_queue_depth_on_the_filesystem_broker(settings: Settings) -> None:
    for _ in range(2):
        enqueue_job(uuid.uuid4().hex, settings)
    with client_for(settings) as client:
        values = samples(client)
    assert values[("peltune_queue_depth", (("queue", settings.task_queue),))] == 2
    # No remote control on the filesystem broker: no worker count rather than a made-up one.
    assert not any(name == "peltune_workers" for name, _ in values)


def test_queue_depth_and_workers_on_redis(settings: Settings) -> None:
    redis = redis_client()
    redis_settings = settings.model_copy(update={"broker_url": REDIS_URL, "readiness_timeout_s": 0.5})
    try:
        for _ in range(3):
            enqueue_job(uuid.uuid4().hex, redis_settings)
        with client_for(redis_settings) as client:
            values = samples(client)
    finally:
        forget_redis_queue(redis, settings.task_queue)
    queue = (("queue", settings.task_queue),)
    assert values[("peltune_queue_depth", queue)] == 3
    assert values[("peltune_workers", queue)] == 0  # nobody consumes this queue (the entrypoint test sees one)
    assert values[("peltune_scrape_errors", (("source", "broker"),))] == 0


def test_a_failing_source_is_reported_not_fatal(settings: Settings) -> None:
    dead = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "readiness_timeout_s": 0.5})
    with client_for(dead) as client:
        values = samples(client)
    assert values[("peltune_scrape_errors", (("source", "broker"),))] == 1
    assert values[("peltune_scrape_errors", (("source", "database"),))] == 0
    assert ("peltune_jobs", (("status", "queued"),)) in values


# -- JSON logs ------------------------------------------------------------------------------------------------------


def _format(**extra: object) -> dict:
    record = logging.LogRecord("worker.tasks", logging.INFO, __file__, 1, "job %s started", ("abc",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return json.loads(JsonFormatter("worker").format(record))


def test_json_log_lines_carry_the_job_id_and_tenant_where_known() -> None:
    entry = _format()
    assert (entry["message"], entry["level"], entry["logger"], entry["service"]) == (
        "job abc started",
        "INFO",
        "worker.tasks",
        "worker",
    )
    assert entry["job_id"] is None
    assert "tenant" in entry and entry["tenant"] is None  # unknown: null, never absent
    token = current_job_id.set("f" * 32)
    try:
        assert _format()["job_id"] == "f" * 32
        assert _format(job_id="e" * 32)["job_id"] == "e" * 32  # an explicit extra wins
    finally:
        current_job_id.reset(token)
    # The API request being served: its {job_id} path parameter and the tenant its authentication recorded
    # (request.state.tenant_id lives in the scope).
    scope_token = current_scope.set({"path_params": {"job_id": "d" * 32}, "state": {"tenant_id": "t1"}})
    tenant_token = current_tenant.set("t2")
    try:
        assert (_format()["job_id"], _format()["tenant"]) == ("d" * 32, "t2")  # the task's context first
        current_tenant.reset(tenant_token)
        assert _format()["tenant"] == "t1"
        assert _format(tenant="t3")["tenant"] == "t3"
    finally:
        current_scope.reset(scope_token)
    assert _format(attempt=2, path=Path("/x"))["attempt"] == 2  # extras become fields; odd types as strings
    assert _format(attempt=2, path=Path("/x"))["path"] == "/x"

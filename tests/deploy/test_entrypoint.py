"""deploy/entrypoint.sh, the command every image and manifest runs, run here as the containers run it."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text

from api.db import crud
from api.db.models import DEFAULT_TENANT_ID, JobKind, JobStatus
from api.db.session import get_sessionmaker
from api.observability import worker_count
from api.queue import enqueue_job
from api.settings import Settings
from tests.deploy.conftest import ENTRYPOINT, entrypoint_env, run_entrypoint
from tests.services import (
    REDIS_URL,
    forget_redis_queue,
    free_port,
    fresh_postgres_database,
    local_api_key,
    redis_client,
    running,
    wait_until,
)

EXPECTED_TABLES = {"alembic_version", "checkpoints", "datasets", "jobs", "metric_points"}


def migrated_tables(url: str) -> tuple[set[str], str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        return set(inspect(engine).get_table_names()), revision
    finally:
        engine.dispose()


def json_lines(what: str, output: str) -> list[dict]:
    """Every line of the output as JSON (fails naming the first line that is not)."""
    entries = []
    for line in output.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{what}: a line that is not JSON: {line!r}")
    return entries


def test_migrate_creates_the_schema_on_sqlite(migrated_sqlite: str) -> None:
    tables, revision = migrated_tables(migrated_sqlite)
    assert tables >= EXPECTED_TABLES
    assert revision


def test_migrate_on_postgresql_is_repeatable(tmp_path: Path) -> None:
    with fresh_postgres_database("peltune_deploy") as url:
        env = entrypoint_env(tmp_path, PELTUNE_DATABASE_URL=url)
        first = run_entrypoint("migrate", env=env)
        assert first.returncode == 0, first.stderr
        tables, revision = migrated_tables(url)
        # The migration Job may run again on every release: a second run is a no-op, not an error.
        second = run_entrypoint("migrate", env=env)
        assert second.returncode == 0, second.stderr
        assert migrated_tables(url) == (tables, revision)
    assert tables >= EXPECTED_TABLES


def test_api_answers_probes_and_logs_json_with_the_job_id(migrated_sqlite: str, tmp_path: Path) -> None:
    port = free_port()
    env = entrypoint_env(
        tmp_path / "home",
        PELTUNE_DATABASE_URL=migrated_sqlite,
        PELTUNE_AUTO_MIGRATE="false",
        PELTUNE_API_PORT=str(port),
    )
    base = f"http://127.0.0.1:{port}"
    job_id = uuid.uuid4().hex
    with running("api", [str(ENTRYPOINT), "api"], env=env,
                 log_path=tmp_path / "api.log") as api:  # fmt: skip
        wait_until(lambda: api.check() or httpx.get(f"{base}/healthz").status_code == 200, timeout=60, what="api")
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["failed"] == []
        # The embedded (development) mode generated the default tenant's key at startup, as the CLI finds it.
        key = local_api_key(tmp_path / "home")
        assert key, "the API wrote no local key"
        assert httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).status_code == 404
        metrics = httpx.get(f"{base}/metrics").text
        assert 'peltune_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in metrics
    entries = json_lines("api output", api.log(10**7))
    assert {entry["service"] for entry in entries} == {"api"}
    assert all("job_id" in entry and "tenant" in entry for entry in entries)  # null where unknown, never absent
    access = [entry for entry in entries if entry["logger"] == "api.access" and entry["route"] == "/v1/jobs/{job_id}"]
    # The job id from the path, the tenant from the key that authenticated the request.
    assert [(e["status"], e["job_id"], e["tenant"]) for e in access] == [(404, job_id, DEFAULT_TENANT_ID)]


def test_worker_consumes_its_queue_and_logs_json_with_the_job_id(migrated_sqlite: str, tmp_path: Path) -> None:
    redis = redis_client()
    queue = f"deploy-{uuid.uuid4().hex[:8]}"
    env = entrypoint_env(
        tmp_path / "home", PELTUNE_DATABASE_URL=migrated_sqlite, PELTUNE_BROKER_URL=REDIS_URL, PELTUNE_TASK_QUEUE=queue
    )
    if os.geteuid() == 0:
        # Celery warns about running as root before logging starts (plain text). The images run as a non-root
        # user, where it does not; silence only that warning when the tests themselves run as root.
        env["PYTHONWARNINGS"] = "ignore:You're running the worker with superuser privileges"
    settings = Settings(home=tmp_path / "home", database_url=migrated_sqlite, broker_url=REDIS_URL, task_queue=queue)
    job_id = _job_on_a_missing_dataset(migrated_sqlite)
    try:
        assert worker_count(settings) == 0
        # stdout and stderr apart: log records go to stderr; Celery prints its banner and shutdown notice to stdout.
        argv = ["sh", "-c", 'exec "$0" worker 2>"$1"', str(ENTRYPOINT), str(tmp_path / "stderr.log")]
        with running("worker", argv, env=env, log_path=tmp_path / "stdout.log") as worker:
            stderr = tmp_path / "stderr.log"
            wait_until(lambda: worker.check() or "ready." in stderr.read_text(), timeout=60, what="worker")
            assert worker_count(settings) == 1
            enqueue_job(job_id, settings)
            wait_until(lambda: "succeeded in" in stderr.read_text(), timeout=60, what="the task to finish")
    finally:
        forget_redis_queue(redis, queue)
    with get_sessionmaker(migrated_sqlite)() as session:
        job = crud.get_job(session, job_id=job_id)
        assert job is not None and job.status is JobStatus.failed, job and (job.status, job.error)
    records = json_lines("worker stderr", stderr.read_text())
    assert {record["service"] for record in records} == {"worker"}
    # Every record written while the task ran names its job and the job's tenant; the others carry nulls.
    task_lines = [record for record in records if record["job_id"] == job_id]
    assert any(record["logger"] == "worker.tasks" for record in task_lines)
    assert {record["tenant"] for record in task_lines} == {DEFAULT_TENANT_ID}
    assert all(record["tenant"] is None for record in records if record["job_id"] is None)


def _job_on_a_missing_dataset(database_url: str) -> str:
    """A queued job whose dataset folder does not exist: the worker claims it and fails it in a second."""
    with get_sessionmaker(database_url)() as session:
        dataset = crud.create_dataset(
            session, name="gone", uri="file:///nonexistent/peltune-dataset", num_images=3, splits={"train": 3}
        )
        job = crud.create_job(
            session, kind=JobKind.baseline, dataset_id=dataset.id, checkpoint_id=None, nprocs=1, config={}
        )
        session.commit()
        return job.id

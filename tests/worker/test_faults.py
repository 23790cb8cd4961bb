"""Faults survived, with real processes: cancel, a killed rank, a NaN loss, a database outage, a SIGKILLed worker,
a broker that lost its messages, duplicate deliveries. See docs/reliability.md for the table these tests back."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.db import crud
from api.db.models import Checkpoint, JobKind, JobStatus
from api.db.session import dispose_engines, session_scope
from api.queue import enqueue_job
from api.settings import Settings
from api.storage import get_store
from tests.factories import make_dataset
from tests.services import (
    REDIS_URL,
    REPO_ROOT,
    alembic_upgrade_head,
    forget_redis_queue,
    fresh_postgres_database,
    postgres_user,
    redis_client,
    running,
    wait_until,
)
from tests.worker.processes import alive, training_pids
from worker.tasks import execute_job, snapshot_key

# A run that lasts until it is interrupted; small enough that a step is milliseconds on one CPU thread.
ENDLESS = {
    "loss": "dice_ce",
    "patch_size": 32,
    "batch_size": 2,
    "steps": 1_000_000,
    "lr": 1e-3,
    "val_every": 1_000_000,
    "snapshot_every": 20,
    "model": {"width": 4, "depth": 1},
}
SHORT = {**ENDLESS, "steps": 12, "val_every": 6}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path}/faults.db"
    alembic_upgrade_head(url)
    return Settings(home=tmp_path / "home", database_url=url, poll_interval_s=0.2)


def add_job(settings: Settings, folder: Path, *, nprocs: int = 1, **config) -> str:
    with session_scope(settings.database_url) as session:
        dataset = crud.create_dataset(session, name="synthetic", uri=folder.as_uri(), num_images=6, splits={})
        job = crud.create_job(
            session, kind=JobKind.baseline, dataset_id=dataset.id, checkpoint_id=None, nprocs=nprocs, config=config
        )
        return job.id


def job_row(settings: Settings, job_id: str):  # noqa: ANN201 - a detached Job
    with session_scope(settings.database_url) as session:
        return crud.get_job(session, job_id=job_id)


def events(settings: Settings, job_id: str) -> list[tuple[str | None, str, str]]:
    with session_scope(settings.database_url) as session:
        return [
            (e.from_status.value if e.from_status else None, e.to_status.value, e.reason)
            for e in crud.list_job_events(session, job_id=job_id)
        ]


def output_checkpoints(settings: Settings, job_id: str) -> list[Checkpoint]:
    with session_scope(settings.database_url) as session:
        return session.query(Checkpoint).filter_by(source_job_id=job_id).all()


def metric_steps(settings: Settings, job_id: str) -> list[int]:
    with session_scope(settings.database_url) as session:
        return [p.step for p in crud.list_metric_points(session, job_id=job_id)]


@contextlib.contextmanager
def in_thread(job_id: str, settings: Settings) -> Iterator[dict]:
    """execute_job in a thread (as the Celery task runs it); the dict gets its "status" when it returns."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(status=execute_job(job_id, settings=settings)))
    thread.start()
    try:
        yield result
    finally:
        thread.join(timeout=180)
        assert not thread.is_alive(), "execute_job did not return"


def kill_rank(job_id: str, rank: str, settings: Settings, *, past_step: int = 0, after_snapshot: bool = False) -> int:
    """SIGKILL one rank of the job's running training once it trained past a step (and kept a snapshot); its pid."""

    def ready() -> bool:
        job = job_row(settings, job_id)
        trained = job.step > past_step and (job.resume_step > past_step or not after_snapshot)
        return trained and rank in training_pids(job_id).values()

    wait_until(ready, timeout=120, what=f"job {job_id} training on rank {rank}", interval=0.2)
    (pid,) = [pid for pid, r in training_pids(job_id).items() if r == rank]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_cancel_stops_a_running_job_and_every_rank(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, make_dataset(tmp_path / "d"), nprocs=2, **ENDLESS)
    with in_thread(job_id, settings) as result:
        wait_until(lambda: job_row(settings, job_id).step > 0, timeout=120, what="training", interval=0.2)
        pids = training_pids(job_id)
        assert sorted(pids.values()) == ["", "0", "1"]  # torchrun and its two ranks
        with session_scope(settings.database_url) as session:
            assert crud.cancel_job(session, job_id=job_id, reason="cancelled by request")
    assert result["status"] is JobStatus.cancelled
    survivors = [pid for pid in pids if alive(pid)]
    assert survivors == [], f"training processes survived the cancel: {survivors}"
    assert training_pids(job_id) == {}
    job = job_row(settings, job_id)
    assert job.status is JobStatus.cancelled and job.output_checkpoint_id is None
    assert [e[:2] for e in events(settings, job_id)] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "cancelled"),
    ]
    assert output_checkpoints(settings, job_id) == []
    assert not get_store(settings).exists(snapshot_key(job_id))  # a finished job keeps no snapshot


def test_a_killed_rank_is_retried_from_its_snapshot_until_attempts_run_out(settings: Settings, tmp_path: Path) -> None:
    two = settings.model_copy(update={"max_attempts": 2})
    job_id = add_job(two, make_dataset(tmp_path / "d"), nprocs=2, **ENDLESS)

    with in_thread(job_id, two) as first:
        kill_rank(job_id, "1", two, after_snapshot=True)
    assert first["status"] is JobStatus.queued
    job = job_row(two, job_id)
    assert job.attempt == 1 and job.resume_step > 0
    assert "rank 1 was killed by SIGKILL" in job.error and "(attempt 1 of 2; queued again)" in job.error
    messages = list(Path(two.broker_transport_options()["data_folder_in"]).glob(f"*.{two.task_queue}.msg"))
    assert len(messages) == 1  # the retry's run_job message
    resume_step = job.resume_step

    with in_thread(job_id, two) as second:
        kill_rank(job_id, "1", two, past_step=resume_step)
    assert second["status"] is JobStatus.failed
    job = job_row(two, job_id)
    assert job.attempt == 2 and job.output_checkpoint_id is None
    assert "rank 1 was killed by SIGKILL" in job.error and job.error.endswith("(attempt 2 of 2; no attempts left)")
    steps = metric_steps(two, job_id)
    # Points past the snapshot were dropped and written again by attempt 2: each step once, in order.
    assert steps == sorted(set(steps)) and max(steps) > resume_step
    assert [e[:2] for e in events(two, job_id)] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "failed"),
    ]
    assert events(two, job_id)[3][2].endswith(f"resuming from the snapshot at step {resume_step}")
    assert training_pids(job_id) == {}


def test_a_nan_loss_fails_the_job_at_that_step(settings: Settings, tmp_path: Path) -> None:
    # alpha = 1e39 overflows float32: the raw PEL term is -inf from the first step.
    job_id = add_job(settings, make_dataset(tmp_path / "d"), **{**SHORT, "loss": "pel_ce", "alpha": 1e39})
    assert execute_job(job_id, settings=settings) is JobStatus.failed
    job = job_row(settings, job_id)
    assert job.error == "FloatingPointError: the loss became -inf at step 1; no checkpoint was saved"
    assert job.attempt == 1  # an error the training reports itself is not retried
    assert job.output_checkpoint_id is None and output_checkpoints(settings, job_id) == []
    assert not (settings.work_dir / job_id / "out" / "model.pt").exists()


@contextlib.contextmanager
def postgres_outage(database_url: str) -> Iterator[None]:
    """The job's PostgreSQL database refuses connections and drops the open ones until the block ends (the server
    itself, shared with other tests, stays up)."""
    import psycopg

    name = database_url.rsplit("/", 1)[1]
    user = postgres_user()
    with psycopg.connect(host="127.0.0.1", user=user, dbname="test", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


def test_a_database_outage_does_not_stop_the_job(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        alembic_upgrade_head(url)
        settings = Settings(home=tmp_path / "home", database_url=url, poll_interval_s=0.2, keep_work_dirs=True)
        steps = 200
        job_id = add_job(settings, make_dataset(tmp_path / "d"), **{**ENDLESS, "steps": steps, "val_every": 100})
        summary = settings.work_dir / job_id / "out" / "summary.json"
        with in_thread(job_id, settings) as result:
            wait_until(lambda: job_row(settings, job_id).step > 0, timeout=120, what="training", interval=0.1)
            with postgres_outage(url):
                # Training goes on without the database and finishes during the outage.
                wait_until(summary.exists, timeout=120, what="training to finish", interval=0.2)
                time.sleep(2)  # the worker is now retrying its writes with backoff
                assert "status" not in result
            # The database is back: the worker reports what happened while it was away.
        assert result["status"] is JobStatus.succeeded
        job = job_row(settings, job_id)
        assert job.status is JobStatus.succeeded and job.attempt == 1 and job.step == steps
        assert metric_steps(settings, job_id) == [1, *range(10, steps + 1, 10)]  # no point lost, none twice
        assert [e[:2] for e in events(settings, job_id)] == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "succeeded"),
        ]
        assert len(output_checkpoints(settings, job_id)) == 1
        dispose_engines()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PELTUNE_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "PELTUNE_HOME": str(settings.home),
        "PELTUNE_DATABASE_URL": settings.database_url,
        "PELTUNE_BROKER_URL": settings.broker_url,
        "PELTUNE_TASK_QUEUE": settings.task_queue,
        "PELTUNE_POLL_INTERVAL_S": "0.2",
        **extra,
    }
    return env


WORKER_ARGV = [
    *[sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker"],
    *["--pool", "solo", "--concurrency", "1", "--without-gossip", "--without-mingle", "-l", "INFO"],
]


def test_a_sigkilled_worker_s_job_resumes_on_another_worker(settings: Settings, tmp_path: Path) -> None:
    env = worker_env(settings, PELTUNE_HEARTBEAT_TIMEOUT_S="3", PELTUNE_KEEP_WORK_DIRS="1")
    steps = 600
    job_id = add_job(settings, make_dataset(tmp_path / "d"), **{**ENDLESS, "steps": steps, "val_every": 300})
    enqueue_job(job_id, settings)
    with running("worker-a", WORKER_ARGV, env=env, log_path=tmp_path / "worker-a.log") as worker_a:
        wait_until(lambda: job_row(settings, job_id).resume_step > 0, timeout=120, what="a snapshot", interval=0.1)
        pids = training_pids(job_id)
        os.kill(worker_a.popen.pid, signal.SIGKILL)
        worker_a.popen.wait(timeout=10)
    # The training dies with its worker (parent-death signal): nothing trains on unsupervised.
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30, what="the orphaned training to stop")
    killed_at = job_row(settings, job_id)
    assert killed_at.status is JobStatus.running and killed_at.step < steps

    with running("worker-b", WORKER_ARGV, env=env, log_path=tmp_path / "worker-b.log") as worker_b:
        # Worker B's reaper finds the stale heartbeat, queues the job again and runs it from the snapshot.
        def done() -> bool:
            worker_b.check()
            return job_row(settings, job_id).status in (JobStatus.succeeded, JobStatus.failed)

        wait_until(done, timeout=180, what="the resumed job", interval=0.5)
    job = job_row(settings, job_id)
    assert job.status is JobStatus.succeeded, job.error
    assert job.attempt == 2 and job.step == steps
    history = events(settings, job_id)
    assert [e[:2] for e in history] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert history[2][2].startswith("worker lost: no heartbeat for more than 3 s during attempt 1 of 3")
    resumed_from = job.resume_step
    assert resumed_from >= killed_at.resume_step > 0
    assert history[3][2].endswith(f"resuming from the snapshot at step {killed_at.resume_step}")
    # The step counter continued: attempt 2's own log starts after the snapshot, and SQL holds each point once.
    first_line = (settings.work_dir / job_id / "out" / "metrics.jsonl").read_text().splitlines()[0]
    assert int(first_line.split('"step": ')[1].split(",")[0]) > killed_at.resume_step
    assert metric_steps(settings, job_id) == [1, *range(10, steps + 1, 10)]
    (checkpoint,) = output_checkpoints(settings, job_id)  # finished once: exactly one final checkpoint
    assert checkpoint.id == job.output_checkpoint_id
    assert len(list((settings.home / "objects" / "checkpoints").iterdir())) == 1
    assert not get_store(settings).exists(snapshot_key(job_id))


def test_jobs_lost_by_redis_or_delivered_twice_run_exactly_once(settings: Settings, tmp_path: Path) -> None:
    redis = redis_client()
    queue = f"faults-{uuid.uuid4().hex[:10]}"
    on_redis = settings.model_copy(update={"broker_url": REDIS_URL, "task_queue": queue})
    folder = make_dataset(tmp_path / "d")
    try:
        lost = add_job(on_redis, folder, **SHORT)
        enqueue_job(lost, on_redis)
        forget_redis_queue(redis, queue)  # Redis restarted without persistence: the message is gone
        assert redis.llen(queue) == 0
        twice = add_job(on_redis, folder, **SHORT)
        enqueue_job(twice, on_redis)
        enqueue_job(twice, on_redis)  # delivered twice (a redelivery, or a second producer)
        assert redis.llen(queue) == 2

        env = worker_env(on_redis, PELTUNE_HEARTBEAT_TIMEOUT_S="4", PELTUNE_REQUEUE_AFTER_S="2")
        with running("worker", WORKER_ARGV, env=env, log_path=tmp_path / "worker.log") as worker:

            def finished() -> bool:
                worker.check()
                return all(job_row(on_redis, j).status is JobStatus.succeeded for j in (lost, twice))

            wait_until(finished, timeout=180, what="both jobs", interval=0.5)
            wait_until(lambda: redis.llen(queue) == 0, timeout=30, what="the duplicates to be consumed")
            log = worker.log(1_000_000)
        assert f"job {lost} still queued" in log  # the reconciler re-sent the lost job's message
        for job_id in (lost, twice):
            job = job_row(on_redis, job_id)
            assert job.attempt == 1
            assert [e[:2] for e in events(on_redis, job_id)] == [
                (None, "queued"),
                ("queued", "running"),
                ("running", "succeeded"),
            ]
            assert len(output_checkpoints(on_redis, job_id)) == 1
            assert metric_steps(on_redis, job_id) == [1, 6, 10, 12]
    finally:
        forget_redis_queue(redis, queue)


def test_racing_deliveries_claim_each_attempt_once_on_postgresql(tmp_path: Path) -> None:
    """Eight workers receive the same message at the same moment, for the first attempt and again for a retry:
    exactly one claims each attempt (PostgreSQL, real concurrent connections)."""
    with fresh_postgres_database() as url:
        alembic_upgrade_head(url)
        settings = Settings(home=tmp_path / "home", database_url=url)
        job_id = add_job(settings, make_dataset(tmp_path / "d"), **SHORT)

        def race() -> list[bool]:
            barrier = threading.Barrier(8)
            wins: list[bool] = []

            def deliver() -> None:
                barrier.wait()
                with session_scope(url) as session:
                    wins.append(crud.claim_job(session, job_id=job_id))

            threads = [threading.Thread(target=deliver) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            return wins

        assert sorted(race()) == [False] * 7 + [True]
        assert job_row(settings, job_id).attempt == 1
        with session_scope(url) as session:
            assert crud.retry_job(session, job_id=job_id, reason="rank 0 was killed by SIGKILL")
        assert sorted(race()) == [False] * 7 + [True]
        assert job_row(settings, job_id).attempt == 2
        assert [e[:2] for e in events(settings, job_id)] == [
            (None, "queued"),
            ("queued", "running"),
            ("running", "queued"),
            ("queued", "running"),
        ]
        dispose_engines()


def test_the_shipper_uploads_only_a_snapshot_that_matches_its_info(settings: Settings, tmp_path: Path) -> None:
    from worker.tasks import SnapshotShipper

    job_id = add_job(settings, make_dataset(tmp_path / "d"), **SHORT)
    with session_scope(settings.database_url) as session:
        assert crud.claim_job(session, job_id=job_id)
    out = settings.work_dir / job_id / "out"
    out.mkdir(parents=True)
    shipper = SnapshotShipper(job_id, out, settings)
    store = get_store(settings)
    shipper.poll(recorded_step=100)  # nothing written yet
    assert not store.exists(snapshot_key(job_id))

    (out / "snapshot.pt").write_bytes(b"state of step 40")
    # The info names another file: snapshot.pt was replaced after it was written (the next snapshot is on its way).
    (out / "snapshot.json").write_text(f'{{"step": 20, "inode": {os.stat(out / "snapshot.pt").st_ino + 1}}}')
    shipper.poll(recorded_step=100)
    assert not store.exists(snapshot_key(job_id)) and job_row(settings, job_id).resume_step == 0

    (out / "snapshot.json").write_text(f'{{"step": 40, "inode": {os.stat(out / "snapshot.pt").st_ino}}}')
    # The metric points of steps 31-40 are not in SQL yet: a retry resuming at 40 would never write them again.
    shipper.poll(recorded_step=30)
    assert not store.exists(snapshot_key(job_id)) and job_row(settings, job_id).resume_step == 0
    shipper.poll(recorded_step=40)
    assert store.exists(snapshot_key(job_id)) and job_row(settings, job_id).resume_step == 40
    assert b"".join(store.open_stream(snapshot_key(job_id))) == b"state of step 40"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # the upload link is gone

"""run_job's steps for real: claim, stage, a real training subprocess, metrics into SQL, publish or fail."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from api.db import crud
from api.db.models import Checkpoint, JobKind, JobStatus, MetricPoint, utcnow
from api.db.session import session_scope
from api.settings import Settings
from api.storage import file_digest, file_uri_path, get_store
from tests.factories import make_archive, make_checkpoint, make_dataset, make_foreign_torch_file
from tests.pel.factories import write_blank_png
from tests.services import alembic_upgrade_head, running, wait_until
from worker.tasks import (
    Heartbeat,
    MetricsFollower,
    execute_job,
    failure_reason,
    prune_work_dirs,
    reap_periodically,
    reap_stale_jobs,
    reaper_interval_s,
    snapshot_key,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "loss": "dice_ce",
    "patch_size": 32,
    "batch_size": 4,
    "steps": 12,
    "lr": 1e-3,
    "val_every": 6,
    "model": {"width": 4, "depth": 1},
}


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('worker-db')}/peltune.db"
    alembic_upgrade_head(url)
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, poll_interval_s=0.2)


def add_job(settings: Settings, *, kind: JobKind, dataset_uri: str, checkpoint_uri: str | None = None, **config):
    with session_scope(settings.database_url) as session:
        dataset = crud.create_dataset(session, name="synthetic", uri=dataset_uri, num_images=6, splits={})
        checkpoint = None
        if checkpoint_uri is not None:
            size, sha256 = file_digest(file_uri_path(checkpoint_uri))  # as registration records them
            checkpoint = crud.create_checkpoint(
                session, name="init", uri=checkpoint_uri, size_bytes=size, sha256=sha256
            )
        job = crud.create_job(
            session,
            kind=kind,
            dataset_id=dataset.id,
            checkpoint_id=checkpoint.id if checkpoint else None,
            nprocs=1,
            config={**TINY, **config},
        )
        return job.id


def job_row(settings: Settings, job_id: str):  # noqa: ANN201 - a detached Job
    with session_scope(settings.database_url) as session:
        return crud.get_job(session, job_id=job_id)


def metric_count(settings: Settings, job_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return len(crud.list_metric_points(session, job_id=job_id))


def test_baseline_from_an_archive_in_the_store(settings: Settings, tmp_path: Path) -> None:
    archive = make_archive(make_dataset(tmp_path / "synthetic", n=6), tmp_path / "synthetic.zip")
    uri = get_store(settings).put_file("datasets/x/synthetic.zip", archive)
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=uri)

    assert execute_job(job_id, settings=settings) is JobStatus.succeeded
    job = job_row(settings, job_id)
    assert job.status is JobStatus.succeeded, job.error
    assert job.progress == 1.0 and job.step == 12 and job.total_steps == 12
    assert job.started_at <= job.finished_at
    assert job.summary["steps"] == 12 and job.summary["test_before"] is None
    with session_scope(settings.database_url) as session:
        output = session.get(Checkpoint, job.output_checkpoint_id)
        points = crud.list_metric_points(session, job_id=job_id)
    assert output.source_job_id == job_id and output.name == "baseline of synthetic"
    assert get_store(settings).exists(f"checkpoints/{output.id}/model.pt")
    assert [p.step for p in points] == [1, 6, 10, 12]
    assert "val_dice" in points[-1].values and "dice" in points[0].values
    assert not (settings.work_dir / job_id).exists()  # a succeeded job's work folder is cleaned up

    # A redelivered message finds the job claimed and does nothing.
    assert execute_job(job_id, settings=settings) is JobStatus.succeeded
    assert metric_count(settings, job_id) == 4


def test_finetune_with_a_foreign_checkpoint_fails_with_the_reason(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=6)
    foreign = make_foreign_torch_file(tmp_path / "foreign.pt")
    job_id = add_job(settings, kind=JobKind.finetune, dataset_uri=folder.as_uri(), checkpoint_uri=foreign.as_uri())

    assert execute_job(job_id, settings=settings) is JobStatus.failed
    job = job_row(settings, job_id)
    assert job.error.startswith("CheckpointError:") and "not a PEL Tune checkpoint" in job.error
    assert job.finished_at is not None and job.output_checkpoint_id is None
    assert (settings.work_dir / job_id / "train.log").is_file()  # kept for debugging
    assert folder.is_dir() and foreign.is_file()  # inputs used in place are never touched


def test_finetune_runs_from_a_real_checkpoint(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=6)
    init = make_checkpoint(tmp_path / "init.pt", width=4, depth=1)
    job_id = add_job(
        settings, kind=JobKind.finetune, dataset_uri=folder.as_uri(), checkpoint_uri=init.as_uri(), loss="pel_ce"
    )
    assert execute_job(job_id, settings=settings) is JobStatus.succeeded
    job = job_row(settings, job_id)
    assert job.summary["test_before"] is not None
    with session_scope(settings.database_url) as session:
        values = [p.values for p in crud.list_metric_points(session, job_id=job_id)]
        assert session.get(Checkpoint, job.output_checkpoint_id).name == "finetune of init"
    assert all(0.0 <= v["pel_norm"] <= 1.0 for v in values)


def test_a_checkpoint_changed_since_registration_fails_the_job(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=6)
    store = get_store(settings)
    uri = store.put_file("checkpoints/tampered/model.pt", make_checkpoint(tmp_path / "init.pt", width=4, depth=1))
    job_id = add_job(settings, kind=JobKind.finetune, dataset_uri=folder.as_uri(), checkpoint_uri=uri)
    with session_scope(settings.database_url) as session:
        checkpoint_id = crud.get_job(session, job_id=job_id).checkpoint_id
        registered = crud.get_checkpoint(session, checkpoint_id=checkpoint_id).sha256
    # The stored object is replaced by another valid checkpoint (same format, other weights).
    other = make_checkpoint(tmp_path / "other.pt", width=8, depth=1)
    store.put_file("checkpoints/tampered/model.pt", other)
    assert file_digest(other)[1] != registered

    assert execute_job(job_id, settings=settings) is JobStatus.failed
    error = job_row(settings, job_id).error
    assert error.startswith(
        f"checkpoint {checkpoint_id} changed since it was registered (sha256 {file_digest(other)[1]}"
    )
    assert f"registered sha256 {registered}" in error
    assert not (settings.work_dir / job_id / "train.log").exists()  # refused before any training started


def test_unreachable_inputs_fail_at_staging(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=(tmp_path / "gone.zip").as_uri())
    assert execute_job(job_id, settings=settings) is JobStatus.failed
    assert "could not stage the job's inputs" in job_row(settings, job_id).error


def test_an_image_over_the_pixel_limit_fails_the_job_before_training(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=6)
    # Registered in place, then a decompression bomb replaces a pair: 81M pixels in an 11 KB PNG.
    write_blank_png(folder / "images" / "img03.png", 9000, 9000)
    write_blank_png(folder / "masks" / "img03.png", 9000, 9000)
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=folder.as_uri())
    assert execute_job(job_id, settings=settings) is JobStatus.failed
    error = job_row(settings, job_id).error
    assert error.startswith("could not stage the job's inputs: image ")
    assert "images/img03.png is 9000×9000 (81000000 pixels), more than the limit of 64000000 pixels" in error
    assert not (settings.work_dir / job_id / "train.log").exists()  # refused before any training started


def test_a_job_over_its_time_limit_is_killed(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=6)
    # Long enough to start torch and log a few steps even on a loaded 2-core machine.
    limited = settings.model_copy(update={"job_timeout_s": 15.0})
    job_id = add_job(limited, kind=JobKind.baseline, dataset_uri=folder.as_uri(), steps=1_000_000, val_every=1_000_000)
    started = time.monotonic()
    assert execute_job(job_id, settings=limited) is JobStatus.failed
    assert time.monotonic() - started < 45
    job = job_row(limited, job_id)
    assert job.error.startswith("timed out")
    assert job.step > 0  # it was followed while it ran
    assert not any(job_id in cmd for cmd in _command_lines()), "training processes survived the timeout"


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    lines.append((entry / "cmdline").read_bytes().decode(errors="replace"))
            except (OSError, IndexError):
                continue
    return lines


def test_unknown_and_unclaimable_jobs_are_left_alone(settings: Settings, tmp_path: Path) -> None:
    assert execute_job("no-such-job", settings=settings) is None
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    with session_scope(settings.database_url) as session:
        assert crud.claim_job(session, job_id=job_id)  # another worker has it
    assert execute_job(job_id, settings=settings) is JobStatus.running
    assert not (settings.work_dir / job_id).exists()


def test_stale_running_jobs_are_queued_again_then_failed(settings: Settings, tmp_path: Path) -> None:
    two = settings.model_copy(update={"max_attempts": 2})
    job_id = add_job(two, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    with session_scope(two.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=utcnow() - timedelta(hours=1))
    assert job_id in reap_stale_jobs(two)
    job = job_row(two, job_id)
    assert job.status is JobStatus.queued and job.attempt == 1
    assert job.error == "worker lost: no heartbeat for more than 300 s during attempt 1 of 2; queued again"
    assert len(list(Path(two.broker_transport_options()["data_folder_in"]).glob("*.msg"))) == 1  # sent again

    with session_scope(two.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=utcnow() - timedelta(hours=1))
    assert job_id in reap_stale_jobs(two)
    job = job_row(two, job_id)
    assert job.status is JobStatus.failed and job.attempt == 2
    assert job.error == "worker lost: no heartbeat for more than 300 s during attempt 2 of 2"


def test_a_job_the_reaper_fails_for_good_loses_its_snapshot(settings: Settings, tmp_path: Path) -> None:
    two = settings.model_copy(update={"max_attempts": 2})
    store = get_store(two)
    (tmp_path / "snapshot.pt").write_bytes(b"state of step 40")
    job_id = add_job(two, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    store.put_file(snapshot_key(job_id), tmp_path / "snapshot.pt")
    with session_scope(two.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=utcnow() - timedelta(hours=1))
    reap_stale_jobs(two)
    assert job_row(two, job_id).status is JobStatus.queued
    assert store.exists(snapshot_key(job_id))  # the next attempt resumes from it
    with session_scope(two.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=utcnow() - timedelta(hours=1))
    reap_stale_jobs(two)
    assert job_row(two, job_id).status is JobStatus.failed
    assert not store.exists(snapshot_key(job_id))
    assert not (two.home / "objects" / "jobs" / job_id / "snapshot.pt").exists()


def test_old_work_folders_of_failed_and_cancelled_jobs_are_pruned(settings: Settings, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "d").as_uri()
    ids = {status: add_job(settings, kind=JobKind.baseline, dataset_uri=folder) for status in JobStatus}
    with session_scope(settings.database_url) as session:
        for status in (JobStatus.running, JobStatus.succeeded, JobStatus.failed):
            crud.claim_job(session, job_id=ids[status])
        crud.finish_job(session, job_id=ids[JobStatus.succeeded], status=JobStatus.succeeded)
        crud.finish_job(session, job_id=ids[JobStatus.failed], status=JobStatus.failed, error="boom")
        crud.cancel_job(session, job_id=ids[JobStatus.cancelled])
    for job_id in [*ids.values(), "not-a-job"]:
        (settings.work_dir / job_id / "inputs").mkdir(parents=True)
        (settings.work_dir / job_id / "train.log").write_text("log")
    week = settings.keep_failed_work_dirs_s
    assert week == 7 * 24 * 3600

    assert prune_work_dirs(settings, now=utcnow() + timedelta(seconds=week - 60)) == []  # kept for debugging
    assert len(list(settings.work_dir.iterdir())) == 6
    removed = prune_work_dirs(settings, now=utcnow() + timedelta(seconds=week + 60))
    assert sorted(removed) == sorted([ids[JobStatus.failed], ids[JobStatus.cancelled]])
    kept = {ids[JobStatus.queued], ids[JobStatus.running], ids[JobStatus.succeeded], "not-a-job"}
    assert {p.name for p in settings.work_dir.iterdir()} == kept

    # The worker's periodic reaper prunes them (here with no grace period at all).
    with session_scope(settings.database_url) as session:
        crud.cancel_job(session, job_id=ids[JobStatus.queued])
    stop = threading.Event()
    stop.set()  # one round, then return
    reap_periodically(settings.model_copy(update={"keep_failed_work_dirs_s": 0.0}), stop, 0.01)
    assert {p.name for p in settings.work_dir.iterdir()} == kept - {ids[JobStatus.queued]}


def test_an_idle_worker_reaps_stale_jobs_periodically(settings: Settings, tmp_path: Path) -> None:
    assert reaper_interval_s(settings) == 60.0  # the default 300 s timeout: every minute
    assert reaper_interval_s(settings.model_copy(update={"heartbeat_timeout_s": 1.0})) == 0.5
    quick = settings.model_copy(update={"heartbeat_timeout_s": 1.0, "max_attempts": 1})
    stop = threading.Event()
    reaper = threading.Thread(target=reap_periodically, args=(quick, stop, 0.2), daemon=True)
    reaper.start()
    try:
        # A job whose worker was killed after claiming it: "running", and its heartbeat stops here.
        job_id = add_job(quick, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
        with session_scope(quick.database_url) as session:
            crud.claim_job(session, job_id=job_id)
        assert job_row(quick, job_id).status is JobStatus.running
        deadline = time.monotonic() + 10
        while job_row(quick, job_id).status is JobStatus.running and time.monotonic() < deadline:
            time.sleep(0.1)
        job = job_row(quick, job_id)
        assert job.status is JobStatus.failed and job.error.startswith("worker lost"), job.error
    finally:
        stop.set()
        reaper.join(timeout=5)
    assert not reaper.is_alive()


def test_a_real_idle_worker_fails_a_killed_workers_job(tmp_path: Path) -> None:
    """A Celery worker process that runs no job fails a job whose heartbeat went stale after it started."""
    home = tmp_path / "home"
    database_url = f"sqlite:///{tmp_path}/idle.db"
    alembic_upgrade_head(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PELTUNE_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "PELTUNE_HOME": str(home),
        "PELTUNE_DATABASE_URL": database_url,
        "PELTUNE_HEARTBEAT_TIMEOUT_S": "1",  # the reaper runs every 0.5 s
        "PELTUNE_MAX_ATTEMPTS": "1",  # no retry: the lost job fails
    }
    argv = [
        *[sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker"],
        *["--pool", "solo", "--concurrency", "1", "--without-gossip", "--without-mingle", "-l", "INFO"],
    ]
    settings = Settings(home=home, database_url=database_url)
    with running("worker", argv, env=env, log_path=tmp_path / "worker.log") as worker:
        wait_until(lambda: "ready." in worker.log(), timeout=60, what="celery worker")
        # Claimed (fresh heartbeat) after the worker started, then never beaten again: its worker was killed.
        job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
        with session_scope(database_url) as session:
            assert crud.claim_job(session, job_id=job_id)
        wait_until(lambda: job_row(settings, job_id).status is JobStatus.failed, timeout=15, what="the reaper")
        worker.check()
    assert job_row(settings, job_id).error.startswith("worker lost")


def test_the_periodic_reaper_survives_database_errors(settings: Settings, tmp_path: Path) -> None:
    broken = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/missing/dir/x.db"})
    stop = threading.Event()
    reaper = threading.Thread(target=reap_periodically, args=(broken, stop, 0.05), daemon=True)
    reaper.start()
    time.sleep(0.3)  # several failed rounds
    assert reaper.is_alive()
    stop.set()
    reaper.join(timeout=5)
    assert not reaper.is_alive()


def test_heartbeat_beats_until_the_job_is_taken_away(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(settings.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=long_ago)
    with Heartbeat(job_id, settings, every_s=0.05) as heartbeat:
        deadline = time.monotonic() + 10
        while job_row(settings, job_id).heartbeat_at <= long_ago and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job_row(settings, job_id).heartbeat_at > long_ago
        assert not heartbeat.lost
        with session_scope(settings.database_url) as session:
            crud.finish_job(session, job_id=job_id, status=JobStatus.failed, error="reaped")
        while not heartbeat.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heartbeat.lost


def test_metrics_follower_reads_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read_new() == []  # not written yet
    with open(path, "w") as out:
        out.write('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
        out.flush()
        assert follower.read_new() == [{"step": 1, "loss": 1.0}]
        out.write('ss": NaN}\nnot json\n{"no_step": 1}\n{"step": 3, "loss": 0.5}\n')
        out.flush()
        # NaN becomes null (PostgreSQL's JSON refuses NaN); malformed lines are skipped, not fatal.
        assert follower.read_new() == [{"step": 2, "loss": None}, {"step": 3, "loss": 0.5}]
        assert follower.read_new() == []


def test_failure_reason_prefers_the_ranks_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "train.log"
    log.write_text("line\n" * 2000 + "Traceback: boom at the end\n")
    assert failure_reason(out, log, 1).endswith("Traceback: boom at the end")
    assert "exited with code 1" in failure_reason(out, log, 1)
    assert "killed by SIGKILL" in failure_reason(out, log, -9)

    (out / "error-rank1.txt").write_text("RuntimeError: gloo connection closed\n")
    (out / "error-rank0.txt").write_text("ValueError: bad patch\n")
    assert failure_reason(out, log, 1) == "rank 0: ValueError: bad patch\nrank 1: RuntimeError: gloo connection closed"
    (out / "error-rank1.txt").write_text("ValueError: bad patch\n")
    assert failure_reason(out, log, 1) == "ValueError: bad patch"  # identical reports are said once


def test_metric_points_keep_their_values(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    with session_scope(settings.database_url) as session:
        crud.add_metric_points(session, job_id=job_id, points=[{"step": 5, "loss": 0.1, "extra": [1, 2]}])
    with session_scope(settings.database_url) as session:
        (point,) = session.query(MetricPoint).filter_by(job_id=job_id).all()
    assert point.step == 5 and point.values == {"loss": 0.1, "extra": [1, 2]}
    assert json.dumps(point.values)

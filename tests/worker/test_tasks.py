"""run_job's steps for real: claim, stage, a real training subprocess, metrics into SQL, publish or fail."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from api.db import crud
from api.db.models import Checkpoint, JobKind, JobStatus, MetricPoint, utcnow
from api.db.session import session_scope
from api.settings import Settings
from api.storage import get_store
from tests.factories import make_archive, make_checkpoint, make_dataset, make_foreign_torch_file
from tests.services import alembic_upgrade_head
from worker.tasks import Heartbeat, MetricsFollower, execute_job, failure_reason, reap_stale_jobs

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
            checkpoint = crud.create_checkpoint(session, name="init", uri=checkpoint_uri, size_bytes=1, sha256="0")
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


def test_unreachable_inputs_fail_at_staging(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=(tmp_path / "gone.zip").as_uri())
    assert execute_job(job_id, settings=settings) is JobStatus.failed
    assert "could not stage the job's inputs" in job_row(settings, job_id).error


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


def test_stale_running_jobs_are_failed(settings: Settings, tmp_path: Path) -> None:
    job_id = add_job(settings, kind=JobKind.baseline, dataset_uri=make_dataset(tmp_path / "d").as_uri())
    with session_scope(settings.database_url) as session:
        crud.claim_job(session, job_id=job_id, now=utcnow() - timedelta(hours=1))
    assert job_id in reap_stale_jobs(settings)
    job = job_row(settings, job_id)
    assert job.status is JobStatus.failed and job.error.startswith("worker lost")


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

"""Data functions: keyword-only, they receive the session and only flush; the caller owns the transaction.

State changes of a job are conditional UPDATEs (``... WHERE status = 'running'``) so that two processes racing
on one job (a redelivered message, a reaper, the supervising worker) can never both win.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from api.db.models import Checkpoint, Dataset, Job, JobKind, JobStatus, MetricPoint, new_id, utcnow

# -- checkpoints ----------------------------------------------------------------------------------------------------


def create_checkpoint(
    session: Session,
    *,
    name: str,
    uri: str,
    size_bytes: int,
    sha256: str,
    source_job_id: str | None = None,
    checkpoint_id: str | None = None,
) -> Checkpoint:
    checkpoint = Checkpoint(
        id=checkpoint_id or new_id(),
        name=name,
        uri=uri,
        size_bytes=size_bytes,
        sha256=sha256,
        source_job_id=source_job_id,
    )
    session.add(checkpoint)
    session.flush()
    return checkpoint


def get_checkpoint(session: Session, *, checkpoint_id: str) -> Checkpoint | None:
    return session.get(Checkpoint, checkpoint_id)


def list_checkpoints(session: Session, *, limit: int = 100, offset: int = 0) -> Sequence[Checkpoint]:
    query = select(Checkpoint).order_by(Checkpoint.created_at.desc(), Checkpoint.id).limit(limit).offset(offset)
    return session.scalars(query).all()


# -- datasets -------------------------------------------------------------------------------------------------------


def create_dataset(
    session: Session,
    *,
    name: str,
    uri: str,
    num_images: int,
    splits: dict[str, int],
    dataset_id: str | None = None,
) -> Dataset:
    dataset = Dataset(id=dataset_id or new_id(), name=name, uri=uri, num_images=num_images, splits=splits)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(session: Session, *, limit: int = 100, offset: int = 0) -> Sequence[Dataset]:
    query = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)
    return session.scalars(query).all()


# -- jobs -----------------------------------------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    kind: JobKind,
    dataset_id: str,
    checkpoint_id: str | None,
    nprocs: int,
    config: dict[str, Any],
) -> Job:
    job = Job(
        id=new_id(),
        kind=kind,
        status=JobStatus.queued,
        dataset_id=dataset_id,
        checkpoint_id=checkpoint_id,
        nprocs=nprocs,
        config=config,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(session: Session, *, status: JobStatus | None = None, limit: int = 100, offset: int = 0) -> Sequence[Job]:
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    if status is not None:
        query = query.where(Job.status == status)
    return session.scalars(query).all()


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def _transition(session: Session, job_id: str, from_status: JobStatus, **values: Any) -> bool:
    """One conditional UPDATE: set values only while the job is in from_status; True when this call did it.
    The WHERE on the status is what makes claims and final states race-free across workers."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == from_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return _rowcount(result) == 1


def claim_job(session: Session, *, job_id: str, now: datetime | None = None) -> bool:
    """queued -> running, atomically; False when another delivery (or nothing) got there first."""
    now = now or utcnow()
    return _transition(
        session, job_id, JobStatus.queued, status=JobStatus.running, started_at=now, heartbeat_at=now, error=None
    )


def record_progress(
    session: Session,
    *,
    job_id: str,
    step: int | None = None,
    total_steps: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Refresh the heartbeat (and step/progress when given) of a running job; False if it is no longer running."""
    values: dict[str, Any] = {"heartbeat_at": now or utcnow()}
    if step is not None:
        values["step"] = step
        if total_steps:
            values["total_steps"] = total_steps
            values["progress"] = min(1.0, max(0.0, step / total_steps))
    return _transition(session, job_id, JobStatus.running, **values)


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    output_checkpoint_id: str | None = None,
    now: datetime | None = None,
) -> bool:
    """running -> succeeded|failed; False when the job was not running (already finished or reaped)."""
    if status not in (JobStatus.succeeded, JobStatus.failed):
        raise ValueError(f"finish_job needs a final status, got {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": now or utcnow(), "error": error}
    if status is JobStatus.succeeded:
        values.update(progress=1.0, summary=summary, output_checkpoint_id=output_checkpoint_id)
    return _transition(session, job_id, JobStatus.running, **values)


def fail_queued_job(session: Session, *, job_id: str, error: str) -> bool:
    """queued -> failed: for a job whose message never reached the broker."""
    return _transition(session, job_id, JobStatus.queued, status=JobStatus.failed, error=error, finished_at=utcnow())


def fail_stale_jobs(session: Session, *, heartbeat_timeout_s: float, now: datetime | None = None) -> list[str]:
    """Fail running jobs whose supervisor stopped beating (worker killed): they would otherwise stay running."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=heartbeat_timeout_s)
    stale = session.scalars(select(Job.id).where(Job.status == JobStatus.running, Job.heartbeat_at < cutoff)).all()
    reaped = []
    for job_id in stale:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.heartbeat_at < cutoff)
            .values(
                status=JobStatus.failed,
                finished_at=now,
                error=f"worker lost: no heartbeat for more than {heartbeat_timeout_s:.0f} s",
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) == 1:
            reaped.append(job_id)
    session.flush()
    return reaped


# -- metrics --------------------------------------------------------------------------------------------------------


def add_metric_points(session: Session, *, job_id: str, points: Iterable[dict[str, Any]]) -> int:
    """Store metrics.jsonl lines (each with an int "step"); returns how many were added."""
    rows = [
        MetricPoint(job_id=job_id, step=int(point["step"]), values={k: v for k, v in point.items() if k != "step"})
        for point in points
    ]
    session.add_all(rows)
    session.flush()
    return len(rows)


def list_metric_points(session: Session, *, job_id: str, after_step: int | None = None) -> Sequence[MetricPoint]:
    query = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step, MetricPoint.id)
    if after_step is not None:
        query = query.where(MetricPoint.step > after_step)
    return session.scalars(query).all()

"""Data functions: keyword-only, they receive the session and only flush; the caller owns the transaction.

State changes of a job go through ``_transition`` only: a conditional UPDATE (``... WHERE status = 'running'``)
along ``models.TRANSITIONS``, so that two processes racing on one job (a redelivered message, a reaper, the
supervising worker, a cancel) can never both win, plus a ``JobEvent`` row recording the move and its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, CursorResult, Select, delete, select, true, update
from sqlalchemy.orm import Session

from api.db.models import (
    DEFAULT_TENANT_ID,
    TRANSITIONS,
    ApiKey,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    MetricPoint,
    Tenant,
    new_id,
    utcnow,
)

TRUE = true()  # the default of an optional extra condition on a job's row

# The tenant-owned tables (each has id, tenant_id and created_at).
Owned = TypeVar("Owned", Checkpoint, Dataset, Job)

# -- tenants and API keys -------------------------------------------------------------------------------------------


def create_tenant(
    session: Session, *, name: str, s3_prefix: str | None, submissions_per_minute: int, now: datetime | None = None
) -> Tenant:
    tenant = Tenant(
        id=new_id(),
        name=name,
        s3_prefix=s3_prefix,
        submissions_per_minute=submissions_per_minute,
        submission_tokens=float(submissions_per_minute),  # a new tenant starts with a full bucket
        tokens_at=now or utcnow(),
    )
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def list_tenants(session: Session) -> Sequence[Tenant]:
    return session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()


def create_api_key(session: Session, *, tenant_id: str, key_id: str, secret_sha256: str, name: str = "") -> ApiKey:
    key = ApiKey(id=key_id, tenant_id=tenant_id, secret_sha256=secret_sha256, name=name)
    session.add(key)
    session.flush()
    return key


def get_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def revoke_api_key(session: Session, *, key_id: str, now: datetime | None = None) -> bool:
    """False when there is no such key or it was already revoked."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return _rowcount(result) == 1


def take_submission_token(session: Session, *, tenant_id: str, now: datetime | None = None) -> float:
    """Take one job submission from the tenant's token bucket: 0.0 when granted, else the seconds until a token is
    there. The bucket lives in the tenant's row and is updated by compare-and-set on its timestamp, so API replicas
    racing on one tenant never both spend the same token (the loser re-reads and tries again)."""
    for _ in range(20):
        now = now or utcnow()
        row = session.execute(
            select(Tenant.submissions_per_minute, Tenant.submission_tokens, Tenant.tokens_at).where(
                Tenant.id == tenant_id
            )
        ).one()
        capacity, rate = float(row.submissions_per_minute), row.submissions_per_minute / 60.0
        elapsed = max(0.0, (now - row.tokens_at).total_seconds()) if row.tokens_at is not None else capacity / rate
        tokens = min(capacity, row.submission_tokens + elapsed * rate)
        if tokens < 1.0:
            return (1.0 - tokens) / rate
        same = Tenant.tokens_at.is_(None) if row.tokens_at is None else Tenant.tokens_at == row.tokens_at
        result = session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id, same, Tenant.submission_tokens == row.submission_tokens)
            .values(submission_tokens=tokens - 1.0, tokens_at=now)
            .execution_options(synchronize_session=False)
        )
        session.flush()
        if _rowcount(result) == 1:
            return 0.0
        now = None  # another replica took a token meanwhile: read the bucket again
    raise RuntimeError(f"tenant {tenant_id}: the submission bucket kept changing under 20 attempts")


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
    format: str = "pel-tune",
    architecture: dict[str, Any] | None = None,
    tenant_id: str | None = None,
) -> Checkpoint:
    """``tenant_id`` defaults to the tenant of ``source_job_id`` (a job's output is its tenant's), else the default
    tenant (rows made outside the API)."""
    if tenant_id is None and source_job_id is not None:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == source_job_id))
    checkpoint = Checkpoint(
        id=checkpoint_id or new_id(),
        tenant_id=tenant_id or DEFAULT_TENANT_ID,
        name=name,
        uri=uri,
        size_bytes=size_bytes,
        sha256=sha256,
        format=format,
        architecture=architecture,
        source_job_id=source_job_id,
    )
    session.add(checkpoint)
    session.flush()
    return checkpoint


def _owned(session: Session, model: type[Owned], row_id: str, tenant_id: str | None) -> Owned | None:
    """The row, or None when it is missing or (with ``tenant_id``: every API read) another tenant's: the two are
    indistinguishable to the caller, so ids of other tenants leak nothing."""
    row = session.get(model, row_id)
    return row if row is not None and tenant_id in (None, row.tenant_id) else None


def _newest_first(model: type[Owned], tenant_id: str, limit: int, offset: int) -> Select[tuple[Owned]]:
    return (
        select(model)
        .where(model.tenant_id == tenant_id)
        .order_by(model.created_at.desc(), model.id)
        .limit(limit)
        .offset(offset)
    )


def get_checkpoint(session: Session, *, checkpoint_id: str, tenant_id: str | None = None) -> Checkpoint | None:
    return _owned(session, Checkpoint, checkpoint_id, tenant_id)


def list_checkpoints(session: Session, *, tenant_id: str, limit: int = 100, offset: int = 0) -> Sequence[Checkpoint]:
    return session.scalars(_newest_first(Checkpoint, tenant_id, limit, offset)).all()


# -- datasets -------------------------------------------------------------------------------------------------------


def create_dataset(
    session: Session,
    *,
    name: str,
    uri: str,
    num_images: int,
    splits: dict[str, int],
    dataset_id: str | None = None,
    min_height: int | None = None,
    min_width: int | None = None,
    num_classes: int | None = None,
    tenant_id: str = DEFAULT_TENANT_ID,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id or new_id(),
        tenant_id=tenant_id,
        name=name,
        uri=uri,
        num_images=num_images,
        splits=splits,
        min_height=min_height,
        min_width=min_width,
        num_classes=num_classes,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, *, dataset_id: str, tenant_id: str | None = None) -> Dataset | None:
    return _owned(session, Dataset, dataset_id, tenant_id)


def list_datasets(session: Session, *, tenant_id: str, limit: int = 100, offset: int = 0) -> Sequence[Dataset]:
    return session.scalars(_newest_first(Dataset, tenant_id, limit, offset)).all()


# -- jobs -----------------------------------------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    kind: JobKind,
    dataset_id: str,
    checkpoint_id: str | None,
    nprocs: int,
    config: dict[str, Any],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    now: datetime | None = None,
    tenant_id: str | None = None,
) -> Job:
    """``tenant_id`` defaults to the dataset's tenant (the API passes the caller's, after checking the dataset and
    checkpoint are the caller's own)."""
    now = now or utcnow()
    if tenant_id is None:
        tenant_id = session.scalar(select(Dataset.tenant_id).where(Dataset.id == dataset_id)) or DEFAULT_TENANT_ID
    job = Job(
        id=new_id(),
        tenant_id=tenant_id,
        kind=kind,
        status=JobStatus.queued,
        dataset_id=dataset_id,
        checkpoint_id=checkpoint_id,
        nprocs=nprocs,
        config=config,
        created_at=now,
        enqueued_at=now,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, at=now, from_status=None, to_status=JobStatus.queued, reason="submitted"))
    session.flush()
    return job


def get_job(session: Session, *, job_id: str, tenant_id: str | None = None) -> Job | None:
    return _owned(session, Job, job_id, tenant_id)


def get_job_by_idempotency_key(session: Session, *, key: str, tenant_id: str = DEFAULT_TENANT_ID) -> Job | None:
    return session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)).first()


def list_jobs(
    session: Session, *, tenant_id: str, status: JobStatus | None = None, limit: int = 100, offset: int = 0
) -> Sequence[Job]:
    query = _newest_first(Job, tenant_id, limit, offset)
    if status is not None:
        query = query.where(Job.status == status)
    return session.scalars(query).all()


def list_job_events(session: Session, *, job_id: str) -> Sequence[JobEvent]:
    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def _update_if(session: Session, job_id: str, in_status: JobStatus, *conditions: Any, **values: Any) -> bool:
    """One conditional UPDATE: set values only while the job is in ``in_status`` (and the extra conditions hold);
    True when this call did it. The WHERE on the status is what makes claims and final states race-free."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == in_status, *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return _rowcount(result) == 1


def _transition(
    session: Session,
    job_id: str,
    from_status: JobStatus,
    to_status: JobStatus,
    *conditions: Any,
    reason: str,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """The one place a job changes state: only along models.TRANSITIONS, only if it is still in from_status (a
    conditional UPDATE, so two racing processes never both win), and with a JobEvent row in the same transaction."""
    if to_status not in TRANSITIONS[from_status]:
        raise ValueError(f"illegal job transition {from_status.value} -> {to_status.value}")
    now = now or utcnow()
    if not _update_if(session, job_id, from_status, *conditions, status=to_status, **values):
        return False
    session.add(JobEvent(job_id=job_id, at=now, from_status=from_status, to_status=to_status, reason=reason))
    session.flush()
    return True


def claim_job(session: Session, *, job_id: str, now: datetime | None = None, worker: str = "") -> bool:
    """queued -> running, atomically, counting the attempt; False when another delivery (or nothing) got there
    first, or the job was cancelled."""
    row = session.execute(select(Job.status, Job.attempt, Job.resume_step).where(Job.id == job_id)).first()
    if row is None or row.status is not JobStatus.queued:
        return False
    now = now or utcnow()
    attempt = row.attempt + 1
    reason = f"attempt {attempt}" + (f" on {worker}" if worker else "")
    if row.resume_step:
        reason += f", resuming from the snapshot at step {row.resume_step}"
    return _transition(
        session,
        job_id,
        JobStatus.queued,
        JobStatus.running,
        Job.attempt == row.attempt,
        reason=reason,
        now=now,
        attempt=attempt,
        started_at=now,
        heartbeat_at=now,
        error=None,
        step=row.resume_step,  # where this attempt starts: 0, or the snapshot it resumes from
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
    return _update_if(session, job_id, JobStatus.running, **values)


def record_snapshot(session: Session, *, job_id: str, step: int) -> bool:
    """The running job's snapshot at ``step`` is in the object store: a later attempt resumes from it."""
    return _update_if(session, job_id, JobStatus.running, Job.resume_step < step, resume_step=step)


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    output_checkpoint_id: str | None = None,
    now: datetime | None = None,
    only_if: ColumnElement[bool] = TRUE,
) -> bool:
    """running -> succeeded|failed; False when the job was not running (already finished, cancelled or reaped) or
    ``only_if`` (an extra SQL condition on the row) no longer holds."""
    if status not in (JobStatus.succeeded, JobStatus.failed):
        raise ValueError(f"finish_job needs succeeded or failed, got {status!r}")
    now = now or utcnow()
    values: dict[str, Any] = {"finished_at": now, "error": error}
    if status is JobStatus.succeeded:
        values.update(progress=1.0, summary=summary, output_checkpoint_id=output_checkpoint_id)
    reason = "training finished" if status is JobStatus.succeeded else (error or "failed")
    return _transition(session, job_id, JobStatus.running, status, only_if, reason=reason[:2000], now=now, **values)


def retry_job(
    session: Session, *, job_id: str, reason: str, now: datetime | None = None, only_if: ColumnElement[bool] = TRUE
) -> bool:
    """running -> queued for another attempt (the caller checked the attempts left and sends the message);
    ``only_if`` is an extra SQL condition on the row."""
    now = now or utcnow()
    return _transition(
        session,
        job_id,
        JobStatus.running,
        JobStatus.queued,
        only_if,
        reason=reason[:2000],
        now=now,
        error=reason,
        heartbeat_at=None,
        enqueued_at=now,
    )


def cancel_job(session: Session, *, job_id: str, reason: str = "cancelled by request") -> bool:
    """queued|running -> cancelled; False when the job is already final. A queued job never starts (its claim
    fails); the worker supervising a running one sees the state at its next poll and kills the training group."""
    now = utcnow()
    for status in (JobStatus.queued, JobStatus.running):
        if _transition(session, job_id, status, JobStatus.cancelled, reason=reason, now=now, finished_at=now):
            return True
    return False


def fail_queued_job(session: Session, *, job_id: str, error: str) -> bool:
    """queued -> failed: for a job whose message never reached the broker."""
    now = utcnow()
    return _transition(
        session, job_id, JobStatus.queued, JobStatus.failed, reason=error, now=now, error=error, finished_at=now
    )


def recover_stale_jobs(
    session: Session, *, heartbeat_timeout_s: float, max_attempts: int, now: datetime | None = None
) -> tuple[list[str], list[str]]:
    """Running jobs whose supervisor stopped beating (worker killed, host gone) go back to the queue while attempts
    are left, else fail; returns (requeued ids, failed ids). The caller sends the requeued jobs' messages."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=heartbeat_timeout_s)
    stale = session.execute(
        select(Job.id, Job.attempt).where(Job.status == JobStatus.running, Job.heartbeat_at < cutoff)
    ).all()
    lost = f"worker lost: no heartbeat for more than {heartbeat_timeout_s:.0f} s"
    requeued, failed = [], []
    for job_id, attempt in stale:
        still_stale = Job.heartbeat_at < cutoff  # its worker may have beaten since the select
        reason = f"{lost} during attempt {attempt} of {max_attempts}"
        if attempt < max_attempts:
            if retry_job(session, job_id=job_id, reason=f"{reason}; queued again", now=now, only_if=still_stale):
                requeued.append(job_id)
        elif finish_job(session, job_id=job_id, status=JobStatus.failed, error=reason, now=now, only_if=still_stale):
            failed.append(job_id)
    return requeued, failed


def jobs_to_resend(session: Session, *, older_than_s: float, now: datetime | None = None) -> list[str]:
    """Queued jobs whose last message was sent more than ``older_than_s`` ago (the broker may have lost it: Redis
    restarted or flushed). Marks them sent now, so each is re-sent at most once per period across all workers."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    candidates = session.execute(
        select(Job.id, Job.enqueued_at).where(Job.status == JobStatus.queued, Job.enqueued_at < cutoff)
    ).all()
    return [
        job_id
        for job_id, sent in candidates
        if _update_if(session, job_id, JobStatus.queued, Job.enqueued_at == sent, enqueued_at=now)
    ]


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


def delete_metric_points_after(session: Session, *, job_id: str, step: int) -> None:
    """Drop the points past a resume step: the resumed attempt writes them again."""
    session.execute(
        delete(MetricPoint)
        .where(MetricPoint.job_id == job_id, MetricPoint.step > step)
        .execution_options(synchronize_session=False)
    )
    session.flush()


def list_metric_points(session: Session, *, job_id: str, after_step: int | None = None) -> Sequence[MetricPoint]:
    query = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step, MetricPoint.id)
    if after_step is not None:
        query = query.where(MetricPoint.step > after_step)
    return session.scalars(query).all()

"""/v1/jobs: submit (insert, commit, then enqueue; idempotent by key), list, get, events, cancel, metrics, the output
checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError

from api.db import crud
from api.db.models import Job, JobKind, JobStatus
from api.deps import JobDep, SessionDep, SettingsDep, StoreDep, TenantDep, get_tenant
from api.errors import Conflict, InvalidField, NotFound, ServiceUnavailable
from api.queue import EnqueueError, enqueue_job
from api.routes.checkpoints import checkpoint_stream
from api.routes.datasets import check_fits
from api.schemas import MAX_OFFSET, JobCreate, JobEventOut, JobOut, MetricsOut
from api.storage import ObjectStore, StorageError
from pel.config import TrainConfig

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(get_tenant)])


def resolved_config(body: JobCreate) -> dict[str, Any]:
    """The full TrainConfig the worker will run (defaults filled in), without ``mode`` (that is the kind)."""
    try:
        config = TrainConfig.from_dict({**body.config.model_dump(), "mode": body.kind.value}).to_dict()
    except (TypeError, ValueError) as exc:
        raise InvalidField(("body", "config"), str(exc)) from None
    config.pop("mode", None)
    return config


def request_hash(body: JobCreate) -> str:
    """sha256 of the canonical body (defaults filled in, keys sorted): the same request hashes alike however the
    client spelled it."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, digest: str, key: str) -> JobOut:
    """The job an earlier request with this key created, if it had the same body."""
    if job.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for a different request (job {job.id}); "
            "use a new key for a new job"
        )
    return JobOut.model_validate(job)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_job(
    tenant: TenantDep,
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="a client-chosen key: a retried request with the same key and body returns the same job "
            "(200) instead of queuing another; the same key with another body is 409",
        ),
    ] = None,
) -> JobOut:
    """Queue a training job. The row is committed before the message is sent, so a worker always finds it."""
    digest = request_hash(body)
    if idempotency_key is not None:
        earlier = crud.get_job_by_idempotency_key(session, key=idempotency_key, tenant_id=tenant.id)
        if earlier is not None:
            response.status_code = status.HTTP_200_OK
            return _replay(earlier, digest, idempotency_key)
    # A replay above is free; a new submission takes a token (spent only if this transaction commits).
    wait_s = crud.take_submission_token(session, tenant_id=tenant.id)
    if wait_s > 0:
        retry_after = max(1, math.ceil(wait_s))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"tenant {tenant.name!r} may submit {tenant.submissions_per_minute} jobs per minute: retry in "
            f"{retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    # Another tenant's dataset or checkpoint is "not found", like a missing one.
    dataset = crud.get_dataset(session, dataset_id=body.dataset_id, tenant_id=tenant.id)
    if dataset is None:
        raise InvalidField(("body", "dataset_id"), f"dataset {body.dataset_id!r} not found", kind="not_found")
    config = resolved_config(body)
    check_fits(dataset, config)  # a patch larger than the images fails here, not an hour into the run
    if body.kind is JobKind.finetune:
        if body.checkpoint_id is None:
            raise InvalidField(("body", "checkpoint_id"), "a finetune job needs an init checkpoint", kind="missing")
        if crud.get_checkpoint(session, checkpoint_id=body.checkpoint_id, tenant_id=tenant.id) is None:
            raise InvalidField(
                ("body", "checkpoint_id"), f"checkpoint {body.checkpoint_id!r} not found", kind="not_found"
            )
    elif body.checkpoint_id is not None:
        raise InvalidField(
            ("body", "checkpoint_id"), "a baseline job trains from scratch; omit checkpoint_id", kind="extra_forbidden"
        )
    try:
        job = crud.create_job(
            session,
            kind=body.kind,
            dataset_id=body.dataset_id,
            checkpoint_id=body.checkpoint_id,
            nprocs=body.nprocs,
            config=config,
            idempotency_key=idempotency_key,
            request_hash=digest,
            tenant_id=tenant.id,
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key got there first (the key is unique; the insert or the commit
        # fails, depending on the database): answer as its replay.
        session.rollback()
        earlier = (
            crud.get_job_by_idempotency_key(session, key=idempotency_key, tenant_id=tenant.id)
            if idempotency_key
            else None
        )
        if earlier is None:
            raise
        response.status_code = status.HTTP_200_OK
        return _replay(earlier, digest, idempotency_key)
    try:
        enqueue_job(job.id, settings)
    except EnqueueError as exc:
        # Never leave a queued row that no message will ever pick up.
        crud.fail_queued_job(session, job_id=job.id, error=str(exc))
        session.commit()
        raise ServiceUnavailable(f"job {job.id} was not queued: {exc}") from None
    return JobOut.model_validate(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> list[JobOut]:
    rows = crud.list_jobs(session, tenant_id=tenant.id, status=status, limit=limit, offset=offset)
    return [JobOut.model_validate(j) for j in rows]


@router.get("/{job_id}")
def get_job(job: JobDep) -> JobOut:
    return JobOut.model_validate(job)


@router.get("/{job_id}/events")
def get_events(job: JobDep, session: SessionDep) -> list[JobEventOut]:
    """Every state transition of the job, oldest first, with its time and reason."""
    return [JobEventOut.model_validate(e) for e in crud.list_job_events(session, job_id=job.id)]


@router.post("/{job_id}/cancel", responses={409: {"description": "the job has already finished"}})
def cancel_job(job: JobDep, session: SessionDep, store: StoreDep) -> JobOut:
    """Cancel a queued job (it will never run) or a running one (its worker kills the whole training process group
    at its next poll, within seconds). A finished job cannot be cancelled: 409."""
    if not crud.cancel_job(session, job_id=job.id):
        session.rollback()
        session.refresh(job)
        raise Conflict(f"job {job.id} is already {job.status.value}: only queued or running jobs can be cancelled")
    session.commit()
    session.refresh(job)
    # A queued job that an earlier attempt left a snapshot for is never claimed again, so no worker would delete
    # it. (A running one's worker deletes it too once the training is stopped, after its last upload.)
    drop_snapshot(store, job.id)
    return JobOut.model_validate(job)


def drop_snapshot(store: ObjectStore, job_id: str) -> None:
    """Best effort: the job's resume snapshot (worker.tasks.snapshot_key, not imported here: that module starts
    the Celery app) is of no use once the job is final; failing to delete it only leaves an object behind."""
    try:
        store.delete(f"jobs/{job_id}/snapshot.pt")
    except (StorageError, OSError) as exc:
        log.warning("job %s: could not delete its snapshot: %s", job_id, exc)


@router.get("/{job_id}/metrics")
def get_metrics(
    job: JobDep,
    session: SessionDep,
    after_step: int | None = Query(
        None, ge=-1, le=MAX_OFFSET, description="only points with a larger step (for incremental polling)"
    ),
) -> MetricsOut:
    points = crud.list_metric_points(session, job_id=job.id, after_step=after_step)
    return MetricsOut(job_id=job.id, points=[{"step": p.step, **p.values} for p in points])


@router.get(
    "/{job_id}/checkpoint",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the job's output model.pt, streamed"},
        409: {"description": "the job has not succeeded (yet)"},
    },
)
def download_job_checkpoint(job: JobDep, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    if job.status is not JobStatus.succeeded or job.output_checkpoint_id is None:
        raise Conflict(f"job {job.id} is {job.status.value}: its checkpoint exists once it has succeeded")
    checkpoint = crud.get_checkpoint(session, checkpoint_id=job.output_checkpoint_id)
    if checkpoint is None:
        raise NotFound("checkpoint", job.output_checkpoint_id)
    return checkpoint_stream(checkpoint, settings)

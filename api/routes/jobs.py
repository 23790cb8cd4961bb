"""/v1/jobs: submit (insert, commit, then enqueue), list, get, metrics, the output checkpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from api.db import crud
from api.db.models import JobKind, JobStatus
from api.deps import JobDep, SessionDep, SettingsDep
from api.errors import Conflict, InvalidField, NotFound, ServiceUnavailable
from api.queue import EnqueueError, enqueue_job
from api.routes.checkpoints import checkpoint_stream
from api.schemas import JobCreate, JobOut, MetricsOut
from pel.config import TrainConfig

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def resolved_config(body: JobCreate) -> dict[str, Any]:
    """The full TrainConfig the worker will run (defaults filled in), without ``mode`` (that is the kind)."""
    try:
        config = TrainConfig.from_dict({**body.config.model_dump(), "mode": body.kind.value}).to_dict()
    except (TypeError, ValueError) as exc:
        raise InvalidField(("body", "config"), str(exc)) from None
    config.pop("mode", None)
    return config


@router.post("", status_code=status.HTTP_201_CREATED)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a training job. The row is committed before the message is sent, so a worker always finds it."""
    if crud.get_dataset(session, dataset_id=body.dataset_id) is None:
        raise InvalidField(("body", "dataset_id"), f"dataset {body.dataset_id!r} not found", kind="not_found")
    if body.kind is JobKind.finetune:
        if body.checkpoint_id is None:
            raise InvalidField(("body", "checkpoint_id"), "a finetune job needs an init checkpoint", kind="missing")
        if crud.get_checkpoint(session, checkpoint_id=body.checkpoint_id) is None:
            raise InvalidField(
                ("body", "checkpoint_id"), f"checkpoint {body.checkpoint_id!r} not found", kind="not_found"
            )
    elif body.checkpoint_id is not None:
        raise InvalidField(
            ("body", "checkpoint_id"), "a baseline job trains from scratch; omit checkpoint_id", kind="extra_forbidden"
        )
    job = crud.create_job(
        session,
        kind=body.kind,
        dataset_id=body.dataset_id,
        checkpoint_id=body.checkpoint_id,
        nprocs=body.nprocs,
        config=resolved_config(body),
    )
    session.commit()
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
    status: JobStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> list[JobOut]:
    return [JobOut.model_validate(j) for j in crud.list_jobs(session, status=status, limit=limit, offset=offset)]


@router.get("/{job_id}")
def get_job(job: JobDep) -> JobOut:
    return JobOut.model_validate(job)


@router.get("/{job_id}/metrics")
def get_metrics(
    job: JobDep,
    session: SessionDep,
    after_step: int | None = Query(None, description="only points with a larger step (for incremental polling)"),
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

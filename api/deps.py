"""Annotated dependency aliases, so route signatures read as declarations: ``def get(job: JobDep) -> ...``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.db import crud
from api.db.models import ID_PATTERN, Checkpoint, Dataset, Job
from api.db.session import get_sessionmaker
from api.errors import NotFound
from api.routes._multipart import ReceivedForm, receive_form
from api.settings import Settings, get_settings
from api.storage import ObjectStore, get_store


def get_app_settings(request: Request) -> Settings:
    # create_app(settings) pins settings per app (tests); the deployed app reads the environment once.
    return getattr(request.app.state, "settings", None) or get_settings()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; routes commit explicitly (data functions only flush)."""
    with get_sessionmaker(settings.database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_object_store(settings: SettingsDep) -> ObjectStore:
    return get_store(settings)


StoreDep = Annotated[ObjectStore, Depends(get_object_store)]


async def get_upload_form(request: Request, settings: SettingsDep) -> AsyncIterator[ReceivedForm]:
    form, tmp_dir = await receive_form(
        request, max_file_bytes=settings.max_upload_bytes, tmp_root=settings.scratch_dir("uploads")
    )
    try:
        yield form
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


UploadFormDep = Annotated[ReceivedForm, Depends(get_upload_form)]


def _well_formed(resource_id: str) -> bool:
    # Ids are uuid4 hex; anything else cannot exist (and a NUL byte would be a database error on PostgreSQL).
    return ID_PATTERN.fullmatch(resource_id) is not None


def get_job_or_404(job_id: str, session: SessionDep) -> Job:
    job = crud.get_job(session, job_id=job_id) if _well_formed(job_id) else None
    if job is None:
        raise NotFound("job", job_id)
    return job


def get_checkpoint_or_404(checkpoint_id: str, session: SessionDep) -> Checkpoint:
    checkpoint = crud.get_checkpoint(session, checkpoint_id=checkpoint_id) if _well_formed(checkpoint_id) else None
    if checkpoint is None:
        raise NotFound("checkpoint", checkpoint_id)
    return checkpoint


def get_dataset_or_404(dataset_id: str, session: SessionDep) -> Dataset:
    dataset = crud.get_dataset(session, dataset_id=dataset_id) if _well_formed(dataset_id) else None
    if dataset is None:
        raise NotFound("dataset", dataset_id)
    return dataset


JobDep = Annotated[Job, Depends(get_job_or_404)]
CheckpointDep = Annotated[Checkpoint, Depends(get_checkpoint_or_404)]
DatasetDep = Annotated[Dataset, Depends(get_dataset_or_404)]

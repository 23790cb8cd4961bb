"""Annotated dependency aliases, so route signatures read as declarations: ``def get(job: JobDep) -> ...``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import UriRefused, check_registration_uri, same_secret, tenant_for_key
from api.db import crud
from api.db.models import ID_PATTERN, Checkpoint, Dataset, Job, Tenant
from api.db.session import get_sessionmaker
from api.errors import InvalidField, NotFound
from api.routes._multipart import ReceivedForm, receive_form
from api.settings import LOCAL_KEYS_FILE, Settings, get_settings
from api.storage import ObjectStore, StorageError, get_store


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


# Where api.guard.RequestGuard keeps the request's body cap ({"limit": bytes}; None: no cap).
BODY_CAP = "peltune.body_cap"


async def get_upload_form(request: Request, settings: SettingsDep) -> AsyncIterator[ReceivedForm]:
    if request.headers.get("content-type", "").startswith("multipart/form-data") and BODY_CAP in request.scope:
        # A file upload streams to disk, limited to max_upload_bytes by receive_form, not by the JSON body cap.
        request.scope[BODY_CAP]["limit"] = None
    form, tmp_dir = await receive_form(
        request, max_file_bytes=settings.max_upload_bytes, tmp_root=settings.scratch_dir("uploads")
    )
    try:
        yield form
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


UploadFormDep = Annotated[ReceivedForm, Depends(get_upload_form)]

# -- authentication -------------------------------------------------------------------------------------------------

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pel-tune"'}
# Declared for OpenAPI (the /docs "Authorize" button); the key itself is read by presented_key.
BEARER = Depends(HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer pt_..."))
API_KEY_HEADER = Depends(APIKeyHeader(name="X-API-Key", auto_error=False, description="or the key in X-API-Key"))
DeclaredKey = Annotated[object, BEARER]
DeclaredHeader = Annotated[object, API_KEY_HEADER]


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _admin_key(request: Request) -> str | None:
    # Set when the app starts (api.main): the configured key, or in development the generated local one.
    return getattr(request.app.state, "admin_key", None)


def missing_key(settings: Settings) -> HTTPException:
    # A hint, not the server's path: the caller needs to know which file, not where this server keeps it.
    hint = (
        f"; this server's local key is in {LOCAL_KEYS_FILE} under PELTUNE_HOME" if settings.env == "development" else ""
    )
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        f"missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'{hint}",
        headers=CHALLENGE,
    )


def get_tenant(
    request: Request, session: SessionDep, settings: SettingsDep, _b: DeclaredKey, _h: DeclaredHeader
) -> Tenant:
    """The caller's tenant, from its API key; 401 for a missing, unknown or revoked key. Declared on every
    resource router, so it runs before any upload is read."""
    key = presented_key(request)
    if key is None:
        raise missing_key(settings)
    admin = _admin_key(request)
    if admin and same_secret(key, admin):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "the admin key manages tenants and keys only: call this with a tenant's API key"
        )
    tenant = tenant_for_key(session, key)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers=CHALLENGE)
    request.state.tenant_id = tenant.id
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def check_uri_allowed(uri: str, tenant: Tenant, settings: Settings) -> str:
    """The normalised URI, the only form to store and use; 403 naming the allowed place for a URI this tenant may
    not register, 422 for a malformed one (api.auth.check_registration_uri)."""
    try:
        return check_registration_uri(uri, tenant, settings)
    except UriRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"uri: {exc}") from None
    except StorageError as exc:
        raise InvalidField(("body", "uri"), str(exc)) from None


def require_admin(request: Request, settings: SettingsDep, _b: DeclaredKey, _h: DeclaredHeader) -> None:
    key = presented_key(request)
    if key is None:
        raise missing_key(settings)
    admin = _admin_key(request)
    if not admin or not same_secret(key, admin):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs the admin key (PELTUNE_ADMIN_KEY)")


def _well_formed(resource_id: str) -> bool:
    # Ids are uuid4 hex; anything else cannot exist (and a NUL byte would be a database error on PostgreSQL).
    return ID_PATTERN.fullmatch(resource_id) is not None


# Another tenant's resource is "not found", word for word like a missing one: its existence is not leaked.


def get_job_or_404(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    job = crud.get_job(session, job_id=job_id, tenant_id=tenant.id) if _well_formed(job_id) else None
    if job is None:
        raise NotFound("job", job_id)
    return job


def get_checkpoint_or_404(checkpoint_id: str, session: SessionDep, tenant: TenantDep) -> Checkpoint:
    well_formed = _well_formed(checkpoint_id)
    checkpoint = crud.get_checkpoint(session, checkpoint_id=checkpoint_id, tenant_id=tenant.id) if well_formed else None
    if checkpoint is None:
        raise NotFound("checkpoint", checkpoint_id)
    return checkpoint


def get_dataset_or_404(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    well_formed = _well_formed(dataset_id)
    dataset = crud.get_dataset(session, dataset_id=dataset_id, tenant_id=tenant.id) if well_formed else None
    if dataset is None:
        raise NotFound("dataset", dataset_id)
    return dataset


JobDep = Annotated[Job, Depends(get_job_or_404)]
CheckpointDep = Annotated[Checkpoint, Depends(get_checkpoint_or_404)]
DatasetDep = Annotated[Dataset, Depends(get_dataset_or_404)]

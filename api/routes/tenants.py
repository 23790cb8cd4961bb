"""/v1/tenants and /v1/keys: the administrator creates tenants and their API keys (admin key only)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import new_key, normalise_s3_prefix
from api.db import crud
from api.deps import SessionDep, SettingsDep, require_admin
from api.errors import Conflict, InvalidField, NotFound

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)])


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")
    s3_prefix: str | None = Field(
        None, description="the only place its s3:// registrations may point at, e.g. s3://bucket/team-a/"
    )
    submissions_per_minute: int | None = Field(
        None, ge=1, le=100_000, description="default: PELTUNE_SUBMISSIONS_PER_MINUTE"
    )

    @field_validator("s3_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return normalise_s3_prefix(value) if value is not None else None


class TenantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    s3_prefix: str | None
    submissions_per_minute: int
    created_at: datetime


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=255)


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    created_at: datetime
    key: str = Field(description="the API key; shown only now (the server keeps only its hash)")


@router.post("/tenants", status_code=status.HTTP_201_CREATED)
def create_tenant(body: TenantCreate, session: SessionDep, settings: SettingsDep) -> TenantOut:
    if body.s3_prefix is not None and settings.storage_url.startswith("s3://"):
        store = normalise_s3_prefix(settings.storage_url)
        if store.startswith(body.s3_prefix) or body.s3_prefix.startswith(store):
            # Its registrations could then name other tenants' uploads by their object keys.
            raise InvalidField(
                ("body", "s3_prefix"), f"{body.s3_prefix} overlaps the service's own object store {store}"
            )
    if body.s3_prefix is not None:
        _refuse_overlapping_prefix(session, body.s3_prefix)
    try:
        tenant = crud.create_tenant(
            session,
            name=body.name,
            s3_prefix=body.s3_prefix,
            submissions_per_minute=body.submissions_per_minute or settings.submissions_per_minute,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a tenant named {body.name!r} already exists") from None
    return TenantOut.model_validate(tenant)


def _refuse_overlapping_prefix(session: Session, prefix: str) -> None:
    """409 naming the tenant whose s3_prefix contains, or lies inside, ``prefix``: either tenant could then register
    the other's objects. Both are normalised to end in "/", so s3://b/lab-a/ and s3://b/lab-ab/ do not overlap."""
    for other in crud.list_tenants(session):
        if other.s3_prefix is None:
            continue
        theirs = normalise_s3_prefix(other.s3_prefix)
        if theirs.startswith(prefix) or prefix.startswith(theirs):
            raise Conflict(f"s3_prefix {prefix} overlaps tenant {other.name!r}'s prefix {theirs}")


@router.get("/tenants")
def list_tenants(session: SessionDep) -> list[TenantOut]:
    return [TenantOut.model_validate(t) for t in crud.list_tenants(session)]


@router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED)
def create_key(tenant_id: str, session: SessionDep, body: KeyCreate | None = None) -> KeyOut:
    if crud.get_tenant(session, tenant_id=tenant_id) is None:
        raise NotFound("tenant", tenant_id)
    key_id = crud.new_id()
    key, digest = new_key(key_id)
    row = crud.create_api_key(
        session, tenant_id=tenant_id, key_id=key_id, secret_sha256=digest, name=body.name if body else ""
    )
    session.commit()
    return KeyOut(id=row.id, tenant_id=tenant_id, name=row.name, created_at=row.created_at, key=key)


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key(key_id: str, session: SessionDep) -> Response:
    """Revoke a key: every later request with it is 401."""
    if not crud.revoke_api_key(session, key_id=key_id):
        raise NotFound("active API key", key_id)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)

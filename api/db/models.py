"""The SQL schema: the source of truth for checkpoints, datasets, jobs and their metrics.

Ids are uuid4 hex strings (the REST ids). Enumerations are stored as strings guarded by CHECK constraints rather
than native PostgreSQL enums, so adding a value later is a one-line migration on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so Alembic can drop/alter them by name on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset; we put it back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC datetimes")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobKind(enum.StrEnum):
    baseline = "baseline"
    finetune = "finetune"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# The only legal moves of a job (api.db.crud._transition refuses any other). running -> queued is a retry: the
# attempt died in a way worth trying again (worker lost, a rank killed by a signal) and attempts are left.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), dict[str, int]: JSON()}


# The tenant migration 0005 created for rows that existed before tenants, and the embedded mode's own tenant.
DEFAULT_TENANT_ID = "0" * 32


class Tenant(Base):
    """An isolated customer: its checkpoints, datasets and jobs are invisible (404) to every other tenant."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # The only s3:// place its registrations may point at ("s3://bucket/prefix/"); NULL: none in production, any in
    # development (the embedded mode is one trusted user).
    s3_prefix: Mapped[str | None] = mapped_column(Text)
    # Job submissions: a token bucket of this capacity refilled at this rate per minute, kept in SQL so every API
    # replica draws from the same bucket (crud.take_submission_token).
    submissions_per_minute: Mapped[int] = mapped_column(Integer, default=60)
    submission_tokens: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's API key ``pt_<id>_<secret>``: only the sha256 of the secret is stored (api/auth.py says why)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    uri: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # How the file stores its model ("pel-tune", "torchscript", "state_dict", "safetensors"; pel.models.intake) and
    # the architecture its weights fit ({"name": "unet", ...} or {"name": "smp", ...}); None for TorchScript, which
    # carries its own, and for pel-tune rows registered before revision 0002 (the file holds it).
    format: Mapped[str] = mapped_column(String(32), default="pel-tune", server_default="pel-tune")
    architecture: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The job that produced it; NULL for uploaded/registered checkpoints. No FK: jobs also point at checkpoints,
    # and a cycle of foreign keys makes deletes and batch migrations needlessly awkward.
    source_job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    uri: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    splits: Mapped[dict[str, int]] = mapped_column(default=dict)  # {"train": 140, "val": 30, "test": 30}
    # The smallest image height and smallest width (over all images): a job's patch_size must fit in both.
    # NULL for datasets registered before these were recorded.
    min_height: Mapped[int | None] = mapped_column(Integer)
    min_width: Mapped[int | None] = mapped_column(Integer)
    # Declared mask classes (labels 0..num_classes-1, checked at registration); NULL: instance label masks.
    num_classes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        # Idempotency keys are the client's: two tenants may well pick the same one.
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_id_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[JobKind] = mapped_column(_str_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(_str_enum(JobStatus, "job_status"), default=JobStatus.queued)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    nprocs: Mapped[int] = mapped_column(Integer, default=1)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # TrainConfig fields except `mode`
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    output_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id"))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Refreshed by the supervising worker every poll; a stale one on a running job means the worker is gone.
    heartbeat_at: Mapped[datetime | None]
    # Attempts started so far (each claim adds one); retries stop at Settings.max_attempts.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When a run_job message was last sent for it: the reconciler re-sends one for a job queued long after this.
    enqueued_at: Mapped[datetime | None]
    # The step of the last snapshot kept in the object store (jobs/{id}/snapshot.pt): a retry resumes there.
    resume_step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The client's Idempotency-Key and the sha256 of the canonical request body it came with.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class JobEvent(Base):
    """One state transition of a job: the job's history, written in the same transaction as the move itself."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_status: Mapped[JobStatus | None] = mapped_column(_str_enum(JobStatus, "job_event_from"))
    to_status: Mapped[JobStatus] = mapped_column(_str_enum(JobStatus, "job_event_to"))
    reason: Mapped[str] = mapped_column(Text, default="")


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_job_id_step", "job_id", "step"),)

    # A surrogate key: a validation line may repeat a training step, so (job_id, step) is not unique.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the metrics.jsonl line without "step"

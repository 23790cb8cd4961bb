"""Job lifecycle: the "cancelled" state, attempts, resume step, idempotency keys and the job_events history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from api.db.models: a migration must keep describing the schema of its day.
OLD_STATUSES = ("queued", "running", "succeeded", "failed")
STATUSES = (*OLD_STATUSES, "cancelled")


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resume_step", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
        batch.create_unique_constraint(op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
        batch.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_job_status"), _one_of("status", STATUSES))

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.CheckConstraint(_one_of("from_status", STATUSES), name=op.f("ck_job_events_job_event_from")),
        sa.CheckConstraint(_one_of("to_status", STATUSES), name=op.f("ck_job_events_job_event_to")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])
    # Jobs queued before this revision: treat their creation as the moment their message was sent.
    op.execute("UPDATE jobs SET enqueued_at = created_at WHERE status = 'queued'")


def downgrade() -> None:
    op.drop_index("ix_job_events_job_id_id", table_name="job_events")
    op.drop_table("job_events")
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_job_status"), _one_of("status", OLD_STATUSES))
        batch.drop_constraint(op.f("uq_jobs_idempotency_key"), type_="unique")
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("resume_step")
        batch.drop_column("enqueued_at")
        batch.drop_column("attempt")

"""Tenants and API keys: every checkpoint, dataset and job belongs to a tenant.

Rows that existed before this revision go to the "default" tenant created here (the embedded mode's tenant too).
Idempotency keys become unique per tenant rather than globally.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from api.db.models: a migration must keep describing the schema of its day.
DEFAULT_TENANT_ID = "0" * 32
OWNED_TABLES = ("checkpoints", "datasets", "jobs")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("s3_prefix", sa.Text(), nullable=True),
        sa.Column("submissions_per_minute", sa.Integer(), nullable=False),
        sa.Column("submission_tokens", sa.Float(), nullable=False),
        sa.Column("tokens_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])
    op.bulk_insert(
        tenants,
        [
            {
                "id": DEFAULT_TENANT_ID,
                "name": "default",
                "s3_prefix": None,
                "submissions_per_minute": 60,
                "submission_tokens": 60.0,
                "tokens_at": None,
                "created_at": datetime.now(UTC),
            }
        ],
    )
    for table in OWNED_TABLES:
        # Added nullable, backfilled, then made NOT NULL: existing rows need a tenant before the constraint holds.
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(32), nullable=True))
        op.execute(f"UPDATE {table} SET tenant_id = '{DEFAULT_TENANT_ID}'")
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", existing_type=sa.String(32), nullable=False)
            batch.create_index(op.f(f"ix_{table}_tenant_id"), ["tenant_id"])
            batch.create_foreign_key(op.f(f"fk_{table}_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])
            if table == "jobs":
                batch.drop_constraint(op.f("uq_jobs_idempotency_key"), type_="unique")
                batch.create_unique_constraint(
                    op.f("uq_jobs_tenant_id_idempotency_key"), ["tenant_id", "idempotency_key"]
                )


def downgrade() -> None:
    for table in reversed(OWNED_TABLES):
        with op.batch_alter_table(table) as batch:
            if table == "jobs":
                batch.drop_constraint(op.f("uq_jobs_tenant_id_idempotency_key"), type_="unique")
                batch.create_unique_constraint(op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
            batch.drop_constraint(op.f(f"fk_{table}_tenant_id_tenants"), type_="foreignkey")
            batch.drop_index(op.f(f"ix_{table}_tenant_id"))
            batch.drop_column("tenant_id")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")

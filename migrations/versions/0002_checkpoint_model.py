"""Checkpoints record what model they hold: their file format and the architecture they fit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        # Rows registered before this revision are all PEL Tune's own U-Net checkpoints.
        batch.add_column(sa.Column("format", sa.String(32), nullable=False, server_default="pel-tune"))
        batch.add_column(sa.Column("architecture", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("architecture")
        batch.drop_column("format")

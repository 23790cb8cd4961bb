"""Datasets record the smallest image height and width (a job's patch must fit) and their declared classes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        # NULL for rows registered before this revision: their jobs are not size-checked at submission.
        batch.add_column(sa.Column("min_height", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("min_width", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("num_classes", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("num_classes")
        batch.drop_column("min_width")
        batch.drop_column("min_height")

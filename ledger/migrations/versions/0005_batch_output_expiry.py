"""Batch output expiry: when a batch's output and error files expire
(``output_expires_after`` counted from their creation) and when the batch runner's
cleanup removed them, indexed for the cleanup's query; a file's ``expires_at``
(OpenAI's file field).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_batches_output_expired_at_output_expires_at"


def upgrade() -> None:
    op.add_column("batches", sa.Column("output_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("batches", sa.Column("output_expired_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f(INDEX), "batches", ["output_expired_at", "output_expires_at"])
    op.add_column("files", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite has had ALTER TABLE ... DROP COLUMN since 3.35.
    op.drop_column("files", "expires_at")
    op.drop_index(op.f(INDEX), table_name="batches")
    op.drop_column("batches", "output_expired_at")
    op.drop_column("batches", "output_expires_at")

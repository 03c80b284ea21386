"""Files: the gateway's Files API (uploads, and batches' output and error files) keeps
each file's metadata here, its bytes on disk; a batch names the file it was made from
and keeps the output expiry asked for with it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PURPOSES = ("batch", "batch_output")
STATUSES = ("uploaded", "processed")


def _choice(table: str, column: str, values: Sequence[str]) -> tuple[sa.Column[str], sa.CheckConstraint]:
    listed = ", ".join(f"'{v}'" for v in values)
    return (
        sa.Column(column, sa.String(max(map(len, values))), nullable=False),
        sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{column}")),
    )


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        *_choice("files", "purpose", PURPOSES),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        *_choice("files", "status", STATUSES),
        sa.CheckConstraint("bytes >= 0", name=op.f("ck_files_bytes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index(op.f("ix_files_tenant_created_at"), "files", ["tenant", "created_at"])
    op.add_column("batches", sa.Column("input_file_id", sa.String(64), nullable=True))
    op.add_column(
        "batches",
        sa.Column(
            "output_expires_after",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=True,
        ),
    )


def downgrade() -> None:
    # SQLite has had ALTER TABLE ... DROP COLUMN since 3.35.
    op.drop_column("batches", "output_expires_after")
    op.drop_column("batches", "input_file_id")
    op.drop_table("files")

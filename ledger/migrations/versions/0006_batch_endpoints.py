"""Batches of ``/v1/responses`` and ``/v1/embeddings`` lines: the CHECK constraint on
``batches.endpoint`` takes the two new endpoints (the column's width already fits them).

PostgreSQL swaps the constraint in place; SQLite cannot alter one, so alembic's batch
mode rebuilds the table (copy, drop, rename), keeping its indexes and other constraints.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ck_batches_endpoint"
OLD = ("/v1/chat/completions", "/v1/completions")
NEW = (*OLD, "/v1/responses", "/v1/embeddings")


def upgrade() -> None:
    _swap(NEW)


def downgrade() -> None:
    # Fails (CHECK violation) while batches of the new endpoints exist.
    _swap(OLD)


def _swap(values: Sequence[str]) -> None:
    sql = "endpoint IN ({})".format(", ".join(f"'{v}'" for v in values))
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f(NAME), "batches", type_="check")
        op.create_check_constraint(op.f(NAME), "batches", sql)
        return
    with op.batch_alter_table("batches", recreate="always") as batch:
        batch.drop_constraint(op.f(NAME), type_="check")
        batch.create_check_constraint(op.f(NAME), sql)

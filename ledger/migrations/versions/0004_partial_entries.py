"""Ledger entries of kind ``partial``: the work done for a request cancelled, expired
or failed after the engine started it, billed like a charge (>= 0, priced by a card).

PostgreSQL swaps the three CHECK constraints in place. SQLite cannot alter a
constraint, so the table is rebuilt (new table, copy, drop, rename); its index and
append-only triggers are created again, as 0001 made them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "ledger_entries"
OLD = {
    "kind": "kind IN ('charge', 'refund', 'adjustment')",
    "amount_sign": "(kind = 'charge' AND amount >= 0) OR (kind = 'refund' AND amount <= 0)"
    " OR kind = 'adjustment'",
    "charge_priced": "kind <> 'charge' OR price_card_version_id IS NOT NULL",
}
NEW = {
    "kind": "kind IN ('charge', 'refund', 'adjustment', 'partial')",
    "amount_sign": "(kind IN ('charge', 'partial') AND amount >= 0)"
    " OR (kind = 'refund' AND amount <= 0) OR kind = 'adjustment'",
    "charge_priced": "kind NOT IN ('charge', 'partial') OR price_card_version_id IS NOT NULL",
}


def upgrade() -> None:
    _swap_checks(NEW)


def downgrade() -> None:
    # Fails (CHECK violation) while partial entries exist: they are money, not dropped.
    _swap_checks(OLD)


def _swap_checks(checks: dict[str, str]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name, sql in checks.items():
            op.drop_constraint(op.f(f"ck_{TABLE}_{name}"), TABLE, type_="check")
            op.create_check_constraint(op.f(f"ck_{TABLE}_{name}"), TABLE, sql)
        return
    _rebuild_sqlite(checks)


def _rebuild_sqlite(checks: dict[str, str]) -> None:
    rebuilt = f"{TABLE}_0004"
    op.create_table(
        rebuilt,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("price_card_version_id", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        *(sa.CheckConstraint(sql, name=op.f(f"ck_{TABLE}_{name}")) for name, sql in checks.items()),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0", name=op.f(f"ck_{TABLE}_tokens")
        ),
        sa.ForeignKeyConstraint(
            ["price_card_version_id"],
            ["price_card_versions.id"],
            name=op.f(f"fk_{TABLE}_price_card_version_id_price_card_versions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{TABLE}")),
        sa.UniqueConstraint("request_id", "kind", name=op.f(f"uq_{TABLE}_request_id_kind")),
    )
    columns = (
        "id, request_id, kind, tenant, model, amount, currency, price_card_version_id,"
        " prompt_tokens, completion_tokens, created_at"
    )
    op.execute(f"INSERT INTO {rebuilt} ({columns}) SELECT {columns} FROM {TABLE}")
    op.drop_table(TABLE)  # its index and triggers go with it
    op.rename_table(rebuilt, TABLE)
    op.create_index(op.f(f"ix_{TABLE}_tenant_created_at"), TABLE, ["tenant", "created_at"])
    for verb in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_{verb.lower()} BEFORE {verb}"
            f" ON {TABLE} BEGIN"
            f" SELECT RAISE(ABORT, '{TABLE} is append-only ({verb} refused)');"
            " END"
        )

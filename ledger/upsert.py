"""Dialect-appropriate ``INSERT ... ON CONFLICT`` for SQLite and PostgreSQL.

A replayed write inserts nothing, so two consumers replaying the same message at
once are safe: PostgreSQL makes the second inserter wait on the unique index until
the first commits, then skips; SQLite serializes writers outright.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import CursorResult, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session


def dialect_insert(session: Session, model: type[DeclarativeBase]) -> Any:
    """``INSERT INTO <model's table>`` with ``on_conflict_*`` for the session's database."""
    table: Table = model.__table__  # type: ignore[assignment]
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignore(
    session: Session,
    model: type[DeclarativeBase],
    values: Mapping[str, Any],
    conflict: Sequence[str],
) -> bool:
    """Insert one row unless one with the same ``conflict`` key exists.

    Returns:
        True if the row was inserted, False if it was already there.
    """
    stmt = (
        dialect_insert(session, model)
        .values(**values)
        .on_conflict_do_nothing(index_elements=list(conflict))
        # SQLAlchemy keeps an INSERT's rowcount only when asked (psycopg reports -1 otherwise).
        .execution_options(preserve_rowcount=True)
    )
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    return result.rowcount == 1

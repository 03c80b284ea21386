"""Dialect-appropriate ``INSERT ... ON CONFLICT`` for SQLite and PostgreSQL.

A replayed write inserts nothing, so two consumers replaying the same message at
once are safe: PostgreSQL makes the second inserter wait on the unique index until
the first commits, then skips; SQLite serializes writers outright.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import CursorResult, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session

from .bulk import insert_rows


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


def insert_ignore_many(
    session: Session,
    model: type[DeclarativeBase],
    rows: Sequence[Mapping[str, Any]],
    conflict: Sequence[str],
    returning: str,
) -> set[Any]:
    """Insert many rows, skipping those whose ``conflict`` key exists already.

    ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` statements sent straight to the
    driver (see :mod:`.bulk`), with every value converted by its column type's own bind
    processor, so stored values are exactly what the ORM would store. Give ``rows`` with
    the same keys, without repeated conflict keys, and in one global order (e.g. sorted
    by key) so that concurrent writers lock index entries in the same order and cannot
    deadlock on PostgreSQL.

    Parameters:
        returning: the column whose values identify the inserted rows.

    Returns:
        The ``returning`` values of the rows inserted by this call.
    """
    if not rows:
        return set()
    table: Table = model.__table__  # type: ignore[assignment]
    conn = session.connection()
    cols = list(rows[0])
    # Many rows share values (a batch's minute buckets, its write time): convert each once.
    converters = [_memoized(p) if p else None for p in
                  (table.c[c].type._cached_bind_processor(conn.dialect) for c in cols)]  # fmt: skip
    ready = [tuple([f(row[c]) if f else row[c] for c, f in zip(cols, converters)]) for row in rows]
    return insert_rows(conn, model, cols, ready, conflict=conflict, returning=returning)


def _memoized(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    cache: dict[Any, Any] = {}

    def get(value: Any) -> Any:
        try:
            return cache[value]
        except KeyError:
            out = cache[value] = convert(value)
            return out
        except TypeError:  # unhashable
            return convert(value)

    return get

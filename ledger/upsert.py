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


#: bound parameters per statement: SQLite allows 32,766
_PARAMS_PER_STATEMENT = 30_000
#: rows per statement on PostgreSQL (one array parameter per column)
_ROWS_PER_ARRAY = 10_000


def insert_ignore_many(
    session: Session,
    model: type[DeclarativeBase],
    rows: Sequence[Mapping[str, Any]],
    conflict: Sequence[str],
    returning: str,
) -> set[Any]:
    """Insert many rows, skipping those whose ``conflict`` key exists already.

    The hot path of the stream processors: ``INSERT ... ON CONFLICT DO NOTHING RETURNING``
    statements sent straight to the driver (multi-row ``VALUES`` on SQLite, ``unnest`` of
    one array per column on PostgreSQL), with every value converted by its column type's
    own bind processor, so stored values are exactly what the ORM would store; several
    times cheaper than an ORM or Core ``executemany``. Give
    ``rows`` with the same keys, without repeated conflict keys, and in one global order
    (e.g. sorted by key) so that concurrent writers lock index entries in the same
    order and cannot deadlock on PostgreSQL.

    Parameters:
        returning: the column whose values identify the inserted rows.

    Returns:
        The ``returning`` values of the rows inserted by this call.
    """
    if not rows:
        return set()
    table: Table = model.__table__  # type: ignore[assignment]
    conn = session.connection()
    dialect = conn.dialect
    cols = list(rows[0])
    # Many rows share values (a batch's minute buckets, its write time): convert each once.
    converters = [_memoized(p) if p else None for p in
                  (table.c[c].type._cached_bind_processor(dialect) for c in cols)]  # fmt: skip
    prep = dialect.identifier_preparer
    head = f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(c) for c in cols)}) "
    tail = (
        f" ON CONFLICT ({', '.join(prep.quote(c) for c in conflict)}) DO NOTHING"
        f" RETURNING {prep.quote(returning)}"
    )
    inserted: set[Any] = set()
    if dialect.name == "postgresql":
        # One array per column, unnested: a short statement psycopg parses once (its
        # client-side parsing of a statement with thousands of placeholders is slow).
        casts = [table.c[c].type.compile(dialect=dialect) for c in cols]
        sql = head + "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in casts) + ")" + tail
        # Arrays go in binary format (%b): psycopg's text format quotes element by element.
        for start in range(0, len(rows), _ROWS_PER_ARRAY):
            chunk = rows[start : start + _ROWS_PER_ARRAY]
            arrays = tuple(
                [f(row[c]) for row in chunk] if f else [row[c] for row in chunk]
                for c, f in zip(cols, converters)
            )
            inserted.update(r[0] for r in conn.exec_driver_sql(sql, arrays))
        return inserted
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    one_row = "(" + ",".join([mark] * len(cols)) + ")"
    per_statement = max(1, _PARAMS_PER_STATEMENT // len(cols))
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        params: list[Any] = []
        for row in chunk:
            params.extend([f(row[c]) if f else row[c] for c, f in zip(cols, converters)])
        sql = head + "VALUES " + ",".join([one_row] * len(chunk)) + tail
        inserted.update(r[0] for r in conn.exec_driver_sql(sql, tuple(params)))
    return inserted


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

"""Bulk writes of driver-ready rows: the hot path of the stream processors.

Rows are tuples in column order whose values are already what the driver receives
(see :class:`Encoder`), sent as few multi-row statements straight to the driver:
``INSERT ... VALUES (...), (...)`` on SQLite, ``INSERT ... SELECT * FROM unnest(...)``
of one binary array per column on PostgreSQL (psycopg parses a statement with thousands
of placeholders slowly, and quotes text-format arrays element by element). Several
times cheaper than an ORM or Core ``executemany``, or than converting value by value.

Give rows without repeated conflict keys, in one global order (e.g. sorted by key), so
that concurrent writers lock index entries in the same order and cannot deadlock on
PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from itertools import chain
from typing import Any

from sqlalchemy import Connection, Dialect, Table
from sqlalchemy.orm import DeclarativeBase

from tokenmill.errors import LedgerError

from .models import LedgerEntry
from .money import SCALE
from .types import utc

#: bound parameters per statement: SQLite allows 32,766
_PARAMS_PER_STATEMENT = 30_000
#: rows per statement on SQLite (at most: also within the bound-parameter limit)
_SQLITE_CHUNK = 2048
#: rows per statement on PostgreSQL (one array parameter per column)
_ROWS_PER_ARRAY = 10_000
_INT64 = 2**63
#: |amount| < 10**10 (ExactDecimal's precision 20, scale 10), in units of 10**-SCALE
_MAX_UNITS = 10 ** (10 + SCALE)
#: SQLAlchemy's SQLite DATETIME storage format, and its part up to the second
_SQLITE_TIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
_SQLITE_SECOND = "%04d-%02d-%02d %02d:%02d:%02d"
#: below 2**33 s (the year 2242) a float timestamp's ulp is under 2 µs, so int() of an
#: aware datetime's timestamp() is its whole second (it cannot round up to the next)
_EXACT_SECONDS = 2**33
#: whole seconds whose text is kept (a batch's events finish within a few seconds)
_SECONDS_CACHED = 4096


class Encoder:
    """Python values → the values the column types' bind processors would hand the
    driver, so that bulk-written rows are stored exactly as the ORM stores them.

    On PostgreSQL the processors themselves are used. On SQLite, where the processors
    (``UtcDateTime`` → naive text, ``ExactDecimal`` → int64 of 1e-10 units) cost a few
    µs a value, the same conversions are done directly (``tests/ledger`` checks that
    they agree with the processors).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"
        cols = LedgerEntry.__table__.c
        self._time = bind_processor(cols.created_at.type, dialect)
        self._money = bind_processor(cols.amount.type, dialect)
        #: whole second → (SQLite text up to the second, minute bucket)
        self._seconds: dict[int, tuple[str, str]] = {}

    def time(self, at: datetime) -> Any:
        """An aware datetime for a ``UtcDateTime`` column.

        Raises:
            LedgerError: a naive datetime.
        """
        if at.tzinfo is not UTC:
            at = utc(at)
        if self.sqlite:
            # Naive UTC text, in the DATETIME processor's own format (measured: half the
            # cost of isoformat, which formats the UTC offset only to cut it off).
            return _SQLITE_TIME % (at.year, at.month, at.day, at.hour, at.minute, at.second,
                                   at.microsecond)  # fmt: skip
        return self._time(at)

    def time_and_minute(self, at: datetime) -> tuple[Any, Any]:
        """``time(at)`` and its :meth:`minute`; on SQLite the text up to the second is
        kept per second (formatting it was most of the cost)."""
        if self.sqlite and at.tzinfo is UTC:
            stamp = at.timestamp()
            if 0 <= stamp < _EXACT_SECONDS:
                second = int(stamp)
                parts = self._seconds.get(second)
                if parts is None:
                    if len(self._seconds) >= _SECONDS_CACHED:
                        self._seconds.clear()
                    head = _SQLITE_SECOND % (at.year, at.month, at.day, at.hour, at.minute,
                                             at.second)  # fmt: skip
                    parts = self._seconds[second] = (head, head[:17] + "00.000000")
                return f"{parts[0]}.{at.microsecond:06d}", parts[1]
        text = self.time(at)
        return text, self.minute(text, at)

    def minute(self, encoded_time: Any, at: datetime) -> Any:
        """The minute bucket of ``at`` (``encoded_time`` is :meth:`time` of it)."""
        if self.sqlite:
            return encoded_time[:17] + "00.000000"
        return self._time(utc(at).replace(second=0, microsecond=0))

    def money_units(self, units: int) -> Any:
        """:meth:`money` of ``units`` × 10⁻¹⁰ (a charge priced in whole units, see
        ``ledger.streams.rates``): on SQLite, the units are the stored value, once
        checked against the same range, without making the Decimal.

        Raises:
            LedgerError: out of range.
        """
        if not self.sqlite or not (-_INT64 <= units < _INT64 and abs(units) < _MAX_UNITS):
            return self.money(Decimal(units).scaleb(-SCALE))  # as money() checks, and says
        return units

    def finish_stamp(self, timestamp: float) -> tuple[Any, Any]:
        """:meth:`time_and_minute` of ``datetime.fromtimestamp(timestamp, UTC)``; on
        SQLite, once that second's text is cached, without making the datetime: the
        microseconds rounded as ``fromtimestamp`` rounds them (the fraction times 10⁶,
        half to even, a carry into the next second; property-tested equal).

        Raises:
            OverflowError, ValueError, OSError: not a time (as ``fromtimestamp``).
        """
        if self.sqlite and 0 <= timestamp < _EXACT_SECONDS:
            fraction, whole = math.modf(timestamp)
            us = round(fraction * 1e6)
            second = int(whole)
            if us >= 1_000_000:
                second += 1
                us -= 1_000_000
            parts = self._seconds.get(second)
            if parts is not None:
                return f"{parts[0]}.{us:06d}", parts[1]
        return self.time_and_minute(datetime.fromtimestamp(timestamp, UTC))

    def money(self, amount: Decimal) -> Any:
        """An amount for an ``ExactDecimal`` column.

        Raises:
            LedgerError: not exact to 10 places, not finite, or out of range.
        """
        if not self.sqlite:
            try:
                return self._money(amount)
            except ValueError as exc:
                raise LedgerError(str(exc)) from exc
        if not isinstance(amount, Decimal) or not amount.is_finite():
            raise LedgerError(f"exact finite decimal expected, got {amount!r}")
        units = amount.scaleb(SCALE)
        n = int(units)
        if n != units:
            raise LedgerError(f"{amount} has more than {SCALE} decimal places")
        if not -_INT64 <= n < _INT64 or abs(amount) >= 10**10:
            raise LedgerError(f"{amount} does not fit the ledger's amounts")
        return n


def bind_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any]:
    """A column type's bind processor for ``dialect`` (the ledger's types all have one)."""
    process = type_._cached_bind_processor(dialect)
    assert process is not None
    return process  # type: ignore[no-any-return]


def _table(model: type[DeclarativeBase]) -> Table:
    return model.__table__  # type: ignore[return-value]


def insert_rows(
    conn: Connection,
    model: type[DeclarativeBase],
    cols: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    conflict: Sequence[str],
    returning: str | None = None,
) -> set[Any]:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` of driver-ready ``rows``.

    Returns:
        The ``returning`` column's values of the rows this call inserted (empty if
        ``returning`` is None: then nothing is returned, which is cheaper).
    """
    prep = conn.dialect.identifier_preparer
    tail = f" ON CONFLICT ({', '.join(prep.quote(c) for c in conflict)}) DO NOTHING"
    if returning is not None:
        tail += f" RETURNING {prep.quote(returning)}"
    return _execute(conn, _table(model), cols, rows, tail, returning is not None)


def insert_new(
    conn: Connection,
    model: type[DeclarativeBase],
    cols: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    key: str,
) -> set[Any]:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` of driver-ready ``rows`` whose first
    column is ``key``, a unique single-column key.

    Returns:
        The keys of the rows this call inserted.

    Raises:
        LedgerError: SQLite inserted other rows than it should have (never expected).
    """
    if conn.dialect.name != "sqlite":
        return insert_rows(conn, model, cols, rows, conflict=(key,), returning=key)
    # On SQLite, ``RETURNING`` hands each row over in a step of its own, and the driver
    # releases and re-takes the GIL at each step: with the loop's thread busy, that is a
    # wait of up to the switch interval per row. Instead a plain insert, whose row count
    # says whether every row was new (the usual case: done). Otherwise the new rows are
    # those past the table's last rowid before the insert (SQLite gives a new row the
    # largest rowid + 1). Exact: a ledger transaction on SQLite holds the write lock from
    # its BEGIN IMMEDIATE, so nothing else can insert in between; the count checks it.
    table = _table(model)
    prep = conn.dialect.identifier_preparer
    name, column = prep.format_table(table), prep.quote(key)
    insert_head = f"INSERT INTO {name} ({', '.join(prep.quote(c) for c in cols)}) VALUES "
    tail = f" ON CONFLICT ({column}) DO NOTHING"
    one_row = "(" + ",".join("?" * len(cols)) + ")"
    new: set[Any] = set()
    start = 0
    for size in _chunk_sizes(len(rows), max(1, _PARAMS_PER_STATEMENT // len(cols))):
        chunk = rows[start : start + size]
        start += size
        last = conn.exec_driver_sql(f"SELECT max(rowid) FROM {name}").scalar()
        result = conn.exec_driver_sql(
            insert_head + ",".join([one_row] * size) + tail, tuple(chain.from_iterable(chunk))
        )
        keys = {row[0] for row in chunk}
        if result.rowcount == size == len(keys):
            new |= keys
            continue
        found = conn.exec_driver_sql(
            f"SELECT {column} FROM {name} WHERE rowid > ?", (-1 if last is None else last,)
        )
        fresh = {r[0] for r in found}
        if len(fresh) != result.rowcount or not fresh <= keys:
            raise LedgerError(
                f"{table.name}: inserted {result.rowcount} rows, found {len(fresh)} new"
            )
        new |= fresh
    return new


def upsert_add(
    conn: Connection,
    model: type[DeclarativeBase],
    keys: Sequence[str],
    counters: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
) -> None:
    """Insert driver-ready rows of ``keys`` then ``counters``; where the key exists,
    add the counters to it instead (``ON CONFLICT DO UPDATE SET c = c + excluded.c``)."""
    table = _table(model)
    prep = conn.dialect.identifier_preparer
    name = prep.format_table(table)
    sets = ", ".join(f"{prep.quote(c)} = {name}.{prep.quote(c)} + excluded.{prep.quote(c)}"
                     for c in counters)  # fmt: skip
    tail = f" ON CONFLICT ({', '.join(prep.quote(k) for k in keys)}) DO UPDATE SET {sets}"
    _execute(conn, table, [*keys, *counters], rows, tail, False)


def _execute(
    conn: Connection,
    table: Table,
    cols: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    tail: str,
    returning: bool,
) -> set[Any]:
    out: set[Any] = set()
    if not rows:
        return out
    dialect = conn.dialect
    prep = dialect.identifier_preparer
    head = f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(c) for c in cols)}) "
    if dialect.name == "postgresql":
        casts = [table.c[c].type.compile(dialect=dialect) for c in cols]
        sql = head + "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in casts) + ")" + tail
        for start in range(0, len(rows), _ROWS_PER_ARRAY):
            arrays = tuple(list(col) for col in zip(*rows[start : start + _ROWS_PER_ARRAY]))
            result = conn.exec_driver_sql(sql, arrays)
            if returning:
                out.update(r[0] for r in result)
        return out
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    one_row = "(" + ",".join([mark] * len(cols)) + ")"
    start = 0
    for size in _chunk_sizes(len(rows), max(1, _PARAMS_PER_STATEMENT // len(cols))):
        chunk = rows[start : start + size]
        start += size
        sql = head + "VALUES " + ",".join([one_row] * size) + tail
        result = conn.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))
        if returning:
            out.update(r[0] for r in result)
    return out


def _chunk_sizes(n: int, most: int) -> list[int]:
    """Rows per statement for ``n`` rows on SQLite: full chunks of :data:`_SQLITE_CHUNK`
    rows, then the rest in powers of two. Preparing a statement of thousands of rows
    costs more than running it (measured: ~17 µs per event of three rows); with a few
    statement shapes, the driver's statement cache prepares each shape once."""
    full = min(_SQLITE_CHUNK, most)
    sizes = [full] * (n // full)
    rest = n % full
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= bit:
            sizes.append(bit)
            rest -= bit
        bit >>= 1
    return sizes

"""Column types that keep the ledger exact on both SQLite and PostgreSQL.

- :class:`UtcDateTime`: timezone-aware UTC in and out. A naive datetime is refused
  (it would be read in whatever zone the writer happened to run in). SQLite, which
  has no time zones, stores naive UTC text that sorts in time order.
- :class:`ExactDecimal`: ``NUMERIC(precision, scale)`` on PostgreSQL; on SQLite, whose
  NUMERIC affinity silently turns decimals into binary floats, an ``INTEGER`` count of
  ``10**-scale`` units, so stored values and ``SUM()`` stay exact (SQLite raises on
  integer overflow rather than rounding). A value with more than ``scale`` decimal
  places is refused, never rounded here: rounding is :mod:`.money`'s job.
- :class:`StateType`: :class:`~tokenmill.wire.RequestState` as its ``SMALLINT`` value.

These types are part of the schema contract: the migrations spell out the same DDL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Numeric, SmallInteger
from sqlalchemy.types import TypeDecorator, TypeEngine

from tokenmill.errors import LedgerError
from tokenmill.wire import RequestState


def utc(ts: float | datetime) -> datetime:
    """An aware UTC datetime from epoch seconds or an aware datetime.

    Raises:
        LedgerError: ``ts`` is a naive datetime.
    """
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise LedgerError(f"naive datetime {ts.isoformat()}: ledger times must be aware")
        return ts.astimezone(UTC)
    return datetime.fromtimestamp(ts, UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE``; always returns aware UTC datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class ExactDecimal(TypeDecorator[Decimal]):
    """An exact decimal with ``scale`` places (see the module docstring)."""

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int = 20, scale: int = 10):
        super().__init__()
        self.precision = precision
        self.scale = scale
        self._quantum = Decimal(1).scaleb(-scale)
        self._limit = Decimal(10) ** (precision - scale)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float) or not isinstance(value, (Decimal, int)):
            # ValueError, like every refusal here: SQLAlchemy wraps it for the ledger to translate.
            raise ValueError(f"exact decimal expected, got {type(value).__name__} {value!r}")  # noqa: TRY004
        value = Decimal(value)
        if not value.is_finite() or abs(value) >= self._limit:
            raise ValueError(f"{value} does not fit NUMERIC({self.precision},{self.scale})")
        if value != value.quantize(self._quantum):
            raise ValueError(f"{value} has more than {self.scale} decimal places")
        if dialect.name == "sqlite":
            units = int(value.scaleb(self.scale))
            if not -(2**63) <= units < 2**63:
                raise ValueError(f"{value} is too large for SQLite (int64 of 1e-{self.scale})")
            return units
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-self.scale).quantize(self._quantum)
        return Decimal(value).quantize(self._quantum)


class StateType(TypeDecorator[RequestState]):
    """:class:`RequestState` stored as its integer value."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value: RequestState | int | None, dialect: Dialect) -> int | None:
        return None if value is None else int(RequestState(value))

    def process_result_value(self, value: int | None, dialect: Dialect) -> RequestState | None:
        return None if value is None else RequestState(value)

"""Bulk writes (the stream processors' hot path): driver-ready values equal the column
types' own conversions, and the inserts report exactly the rows they inserted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import EntryKind, LedgerEntry, transaction
from tokenmill.ledger.bulk import Encoder, _chunk_sizes, insert_new, insert_rows
from tokenmill.ledger.models import PriceCardVersion, UsageRecord

from tokenmill.errors import LedgerError

DIALECTS = [sqlite.dialect(), postgresql.dialect()]
TIMES = hs.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1),
    timezones=hs.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)
AMOUNTS = hs.decimals(min_value=Decimal(0), max_value=Decimal("99999.9999999999"), places=10)


def _processor(dialect: Dialect, column: str) -> object:
    return LedgerEntry.__table__.c[column].type._cached_bind_processor(dialect)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@given(at=TIMES, amount=AMOUNTS)
def test_encoder_agrees_with_the_column_types(dialect: Dialect, at: datetime,
                                              amount: Decimal) -> None:  # fmt: skip
    enc, time_of, money_of = Encoder(dialect), _processor(dialect, "created_at"), _processor(
        dialect, "amount"
    )
    assert enc.time(at) == time_of(at)  # type: ignore[operator]
    minute = at.astimezone(UTC).replace(second=0, microsecond=0)
    assert enc.minute(enc.time(at), at.astimezone(UTC)) == time_of(minute)  # type: ignore[operator]
    assert enc.money(amount) == money_of(amount)  # type: ignore[operator]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_encoder_refuses_money_it_cannot_store_exactly(dialect: Dialect) -> None:
    enc = Encoder(dialect)
    for bad in (Decimal("0.00000000001"), Decimal("1e10"), Decimal("NaN"), Decimal("Infinity")):
        with pytest.raises(LedgerError):
            enc.money(bad)


def test_chunk_sizes_cover_the_rows_in_few_shapes() -> None:
    for n in (0, 1, 7, 2047, 2048, 5000, 12345):
        sizes = _chunk_sizes(n, 3000)
        assert sum(sizes) == n and all(s & (s - 1) == 0 for s in sizes)  # powers of two
    assert _chunk_sizes(10, 3) == [3, 3, 3, 1]


def _usage_row(enc: Encoder, rid: str, at: datetime) -> tuple[object, ...]:
    t = enc.time(at)
    return (rid, "alpha", "sim", "standard", enc.minute(t, at), 10, 20, enc.time(at))


def test_insert_new_reports_exactly_the_new_rows(engine: Engine,
                                                 sessions: sessionmaker[Session]) -> None:  # fmt: skip
    enc = Encoder(engine.dialect)
    at = datetime(2026, 11, 3, 12, 0, 30, 123456, tzinfo=UTC)
    cols = ("request_id", "tenant", "model", "priority", "minute", "prompt_tokens",
            "completion_tokens", "recorded_at")  # fmt: skip
    first = [_usage_row(enc, f"r{i:05d}", at) for i in range(0, 3000, 2)]
    mixed = [_usage_row(enc, f"r{i:05d}", at) for i in range(3000)]
    with transaction(sessions) as s:
        assert insert_new(s.connection(), UsageRecord, cols, first, "request_id") == {
            r[0] for r in first
        }
    with transaction(sessions) as s:
        got = insert_new(s.connection(), UsageRecord, cols, mixed, "request_id")
    assert got == {f"r{i:05d}" for i in range(1, 3000, 2)}
    with transaction(sessions) as s:
        assert insert_new(s.connection(), UsageRecord, cols, mixed, "request_id") == set()
        stored = s.execute(select(UsageRecord).where(UsageRecord.request_id == "r00001")).scalar_one()
    assert (stored.minute, stored.recorded_at) == (at.replace(second=0, microsecond=0), at)


def test_bulk_rows_read_back_as_the_orm_wrote_them(engine: Engine,
                                                   sessions: sessionmaker[Session]) -> None:  # fmt: skip
    enc = Encoder(engine.dialect)
    at = datetime(2026, 11, 3, 12, 0, 30, 5, tzinfo=UTC)
    with transaction(sessions) as s:
        card = PriceCardVersion(model="sim", effective_from=at - timedelta(days=1), currency="USD",
                                input_per_million=Decimal("0.1"), output_per_million=Decimal("0.4"),
                                batch_discount=Decimal("0.5"), created_at=at)  # fmt: skip
        s.add(card)
        s.flush()
        s.add(LedgerEntry(request_id="orm", kind=EntryKind.charge, tenant="alpha", model="sim",
                          amount=Decimal("0.0001234567"), currency="USD",
                          price_card_version_id=card.id, prompt_tokens=1, completion_tokens=2,
                          created_at=at))  # fmt: skip
        card_id = card.id
    cols = ("request_id", "kind", "tenant", "model", "amount", "currency",
            "price_card_version_id", "prompt_tokens", "completion_tokens", "created_at")  # fmt: skip
    row = ("bulk", "charge", "alpha", "sim", enc.money(Decimal("0.0001234567")), "USD", card_id,
           1, 2, enc.time(at))  # fmt: skip
    with transaction(sessions) as s:
        insert_rows(s.connection(), LedgerEntry, cols, [row], conflict=("request_id", "kind"))
    with engine.connect() as conn:  # raw stored values, as the driver returns them
        raw = conn.exec_driver_sql(
            "SELECT request_id, amount, created_at FROM ledger_entries ORDER BY request_id"
        ).all()
    assert raw[0][1:] == raw[1][1:] and [r[0] for r in raw] == ["bulk", "orm"]


@given(at=hs.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31),
                       timezones=hs.just(UTC)),  # fmt: skip
       nudge=hs.sampled_from([0, 999_999, 500_000, 1]))
def test_encoder_time_and_minute_agree_with_time_and_minute(at: datetime, nudge: int) -> None:
    at = at.replace(microsecond=nudge) if nudge else at
    for dialect in DIALECTS:
        enc = Encoder(dialect)
        text = enc.time(at)
        assert enc.time_and_minute(at) == (text, enc.minute(text, at))
        assert enc.time_and_minute(at) == (text, enc.minute(text, at))  # cached


@given(units=hs.one_of(hs.integers(0, 10**20), hs.integers(2**63 - 5, 2**63 + 5)))
def test_encoder_money_units_agree_with_money(units: int) -> None:
    amount = Decimal(units).scaleb(-10)
    for dialect in DIALECTS:
        enc = Encoder(dialect)
        try:
            expected = enc.money(amount)
        except LedgerError:
            with pytest.raises(LedgerError):
                enc.money_units(units)
            continue
        assert enc.money_units(units) == expected


#: finishes as floats: anywhere, and a hair either side of whole seconds and of half
#: microseconds (where rounding to the microsecond could go either way)
FINISHES = hs.one_of(
    hs.floats(min_value=-1e10, max_value=2.0**34, allow_nan=False, allow_infinity=False),
    hs.builds(lambda s, f: s + f, hs.integers(0, 2**33), hs.sampled_from(
        [0.0, 1e-7, 4.999e-7, 5e-7, 5.001e-7, 0.5, 0.9999994, 0.9999995, 0.9999996, 0.99999999])),
)  # fmt: skip


@settings(max_examples=1000)
@given(ts=FINISHES)
def test_encoder_finish_stamp_agrees_with_fromtimestamp(ts: float) -> None:
    for dialect in DIALECTS:
        enc = Encoder(dialect)
        try:
            at = datetime.fromtimestamp(ts, UTC)
        except (OverflowError, ValueError, OSError):
            with pytest.raises((OverflowError, ValueError, OSError)):
                enc.finish_stamp(ts)
            continue
        expected = enc.time_and_minute(at)  # fills the per-second cache: the fast path
        assert enc.finish_stamp(ts) == expected
        assert Encoder(dialect).finish_stamp(ts) == expected  # and the uncached path


@pytest.mark.parametrize("ts", [float("inf"), float("-inf"), float("nan")])
def test_encoder_finish_stamp_refuses_what_is_not_a_time(ts: float) -> None:
    for dialect in DIALECTS:
        with pytest.raises((OverflowError, ValueError)):
            Encoder(dialect).finish_stamp(ts)

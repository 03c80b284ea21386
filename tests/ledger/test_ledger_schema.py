"""Migrations, engines, types and error translation, on SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import (
    Base,
    EntryKind,
    LedgerEntry,
    PriceCardVersion,
    RequestRow,
    UsageRecord,
    downgrade,
    make_engine,
    migrate,
    normalize_url,
    schema_diff,
    session_factory,
    transaction,
)

from tokenmill.errors import LedgerError
from tokenmill.wire import Priority, RequestState

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_migrations_apply_match_models_and_round_trip(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        migrate(engine)
        assert schema_diff(engine) == []
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
        migrate(engine)  # at head already: a no-op, safe at every start
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        migrate(engine)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_partial_entries_migration_keeps_entries_and_append_only(empty_url: str) -> None:
    """0004 rebuilds ledger_entries on SQLite: rows, ids and triggers survive; partial
    entries are accepted after it, and a downgrade refuses to drop them."""
    engine = make_engine(empty_url)
    try:
        migrate(engine, "0003")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO price_card_versions (id, model, effective_from, currency,"
                " input_per_million, output_per_million, batch_discount, created_at)"
                " VALUES (7, 'm', :at, 'USD', 1, 1, 0, :at)"), {"at": T0})  # fmt: skip
            conn.execute(text(
                "INSERT INTO ledger_entries (id, request_id, kind, tenant, model, amount,"
                " currency, price_card_version_id, prompt_tokens, completion_tokens, created_at)"
                " VALUES (41, 'r1', 'charge', 'a', 'm', 15, 'USD', 7, 3, 4, :at)"), {"at": T0})  # fmt: skip
        migrate(engine)
        assert schema_diff(engine) == []
        sessions = session_factory(engine)
        with transaction(sessions) as s:
            [old] = s.scalars(select(LedgerEntry)).all()
            assert (old.id, old.request_id, old.kind, old.price_card_version_id) == (
                41, "r1", EntryKind.charge, 7)  # fmt: skip
            assert (old.prompt_tokens, old.completion_tokens, old.created_at) == (3, 4, T0)
            s.add(LedgerEntry(request_id="r2", kind=EntryKind.partial, tenant="a", model="m",
                              amount=Decimal(1), currency="USD", price_card_version_id=7,
                              created_at=T0))  # fmt: skip
        with pytest.raises(LedgerError, match="append-only"), transaction(sessions) as s:
            s.execute(text("DELETE FROM ledger_entries"))
        with pytest.raises(LedgerError, match="(?i)check"):
            downgrade(engine, "0003")
    finally:
        engine.dispose()


def test_concurrent_migrations_are_safe(empty_url: str) -> None:
    """Every service migrates at start; several may start at once."""
    engines = [make_engine(empty_url) for _ in range(3)]
    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(migrate, engines))
        assert schema_diff(engines[0]) == []
    finally:
        for engine in engines:
            engine.dispose()


def test_schema_diff_notices_drift(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_requests_state"))
    diff = schema_diff(engine)
    assert any(d[0] == "add_index" and d[1].name == "ix_requests_state" for d in diff)


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'ledger.db'}")  # parent created
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_in_memory_sqlite_is_one_database() -> None:
    engine = make_engine("sqlite://")
    try:
        migrate(engine)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_normalize_url_picks_psycopg3(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_urls_are_ledger_errors(url: str) -> None:
    with pytest.raises(LedgerError):
        make_engine(url)


def test_database_refusals_become_ledger_errors(sessions: sessionmaker[Session]) -> None:
    def usage(**kw: object) -> UsageRecord:
        return UsageRecord(**{"request_id": "r", "tenant": "a", "model": "m",
                              "priority": Priority.standard, "minute": T0, "prompt_tokens": 1,
                              "completion_tokens": 0, **kw})  # fmt: skip

    with pytest.raises(LedgerError, match="transaction: IntegrityError"), transaction(sessions) as s:
        s.add(usage(prompt_tokens=-1))
    with pytest.raises(LedgerError, match="naive datetime"), transaction(sessions) as s:
        s.add(usage(minute=datetime(2026, 1, 1)))


def _price_version(s: Session) -> int:
    version = PriceCardVersion(
        model="m", effective_from=T0, currency="USD",
        input_per_million=Decimal("0.1"), output_per_million=Decimal("0.4"),
        batch_discount=Decimal("0.5"),
    )  # fmt: skip
    s.add(version)
    s.flush()
    return version.id


def _entry(rid: str, amount: Decimal, version: int | None, *, kind: EntryKind = EntryKind.charge,
           at: datetime = T0) -> LedgerEntry:  # fmt: skip
    return LedgerEntry(request_id=rid, kind=kind, tenant="a", model="m", amount=amount,
                       currency="USD", price_card_version_id=version, created_at=at)  # fmt: skip


def test_ledger_entries_are_append_only(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        s.add(_entry("r1", Decimal("1.5"), _price_version(s)))
    for sql in ("UPDATE ledger_entries SET amount = 0", "DELETE FROM ledger_entries"):
        with pytest.raises(LedgerError, match="append-only") as info, transaction(sessions) as s:
            s.execute(text(sql))
        assert sql.split()[0] in str(info.value)  # names the refused statement
    with transaction(sessions) as s:
        assert s.scalars(select(LedgerEntry.amount)).all() == [Decimal("1.5")]


@pytest.mark.parametrize(
    ("kind", "amount", "priced"),
    [
        (EntryKind.charge, Decimal(-1), True),
        (EntryKind.partial, Decimal("-0.0000000001"), True),
        (EntryKind.refund, Decimal(1), True),
        (EntryKind.charge, Decimal(1), False),
        (EntryKind.partial, Decimal(1), False),
    ],
)
def test_entry_signs_and_pricing_are_checked(
    sessions: sessionmaker[Session], kind: EntryKind, amount: Decimal, priced: bool
) -> None:
    """Charges and partial work are >= 0 and name their price card; refunds are <= 0."""
    with transaction(sessions) as s:
        vid = _price_version(s)
        s.add(_entry("ok", Decimal(0), vid, kind=kind))
    with pytest.raises(LedgerError, match="IntegrityError"), transaction(sessions) as s:
        s.add(_entry("r1", amount, vid if priced else None, kind=kind))


def test_money_and_time_round_trip_exactly(sessions: sessionmaker[Session]) -> None:
    big = Decimal("912345678.0123456789")  # 19 significant digits: a float would lose them
    at = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    with transaction(sessions) as s:
        vid = _price_version(s)
        s.add(_entry("r1", big, vid, at=at))
        s.flush()
        s.add(_entry("r1", Decimal("-0.0000000001"), None, kind=EntryKind.adjustment, at=at))
    with transaction(sessions) as s:
        rows = s.scalars(select(LedgerEntry).order_by(LedgerEntry.id)).all()
        assert [r.amount for r in rows] == [big, Decimal("-0.0000000001")]
        assert rows[0].created_at == at
        assert rows[0].created_at.tzinfo == UTC
        s.add(RequestRow(id="x", tenant="a", model="m", priority=Priority.batch,
                         state=RequestState.QUEUED, submitted_at=at))  # fmt: skip
    with transaction(sessions) as s:
        row = s.get(RequestRow, "x")
        assert row is not None
        assert row.state is RequestState.QUEUED and row.priority is Priority.batch


def test_out_of_range_money_is_a_ledger_error(
    backend: str, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as s:
        vid = _price_version(s)
    # Beyond SQLite's int64 of 1e-10 units; beyond NUMERIC(20,10) on PostgreSQL.
    too_big = Decimal(922337204) if backend == "sqlite" else Decimal("1E10")
    with pytest.raises(LedgerError), transaction(sessions) as s:
        s.add(_entry("r1", too_big, vid))
    with transaction(sessions) as s:
        s.add(_entry("r1", too_big - 1, vid))
    with transaction(sessions) as s:
        assert s.scalars(select(LedgerEntry.amount)).all() == [too_big - 1]


def test_state_check_constraint(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(LedgerError), transaction(sessions) as s:
        s.execute(
            text(
                "INSERT INTO requests (id, tenant, model, priority, state, submitted_at,"
                " attempts) VALUES ('x', 'a', 'm', 'batch', 9, :at, 0)"
            ),
            {"at": T0.replace(tzinfo=None)},
        )

"""Price card versions, charges, spend and invoices: exact to the last decimal."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import PriceCard
from tokenmill.config.models import BudgetPeriod
from tokenmill.ledger import (
    EntryKind,
    LedgerEntry,
    Period,
    exact,
    invoice,
    price_card_version_for,
    record_charge,
    run_transaction,
    sync_price_cards,
    tenant_spend,
    to_minor_unit,
    transaction,
)

from tokenmill.errors import LedgerError, NotFound
from tokenmill.pricing import cost
from tokenmill.wire import Priority

JAN = datetime(2026, 1, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)
CARDS = [
    PriceCard(model="sim", effective_from=JAN, input_per_million=Decimal("0.10"),
              output_per_million=Decimal("0.40"), batch_discount=Decimal("0.5")),
    PriceCard(model="sim", effective_from=MAR, input_per_million=Decimal("0.12"),
              output_per_million=Decimal("0.48"), batch_discount=Decimal("0.5")),
    PriceCard(model="smollm2", effective_from=JAN, input_per_million=Decimal("0.20"),
              output_per_million=Decimal("0.80")),
]  # fmt: skip


@pytest.fixture
def versions(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Synced price card versions: ``{"sim@jan": id, "sim@mar": id, "smollm2": id}``."""
    with transaction(sessions) as s:
        assert sync_price_cards(s, CARDS) == 3
        return {
            "sim@jan": price_card_version_for(s, "sim", JAN).id,
            "sim@mar": price_card_version_for(s, "sim", MAR).id,
            "smollm2": price_card_version_for(s, "smollm2", JAN).id,
        }


def test_sync_is_idempotent_and_refuses_edits(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    with transaction(sessions) as s:
        assert sync_price_cards(s, CARDS) == 0
    edited = CARDS[0].model_copy(update={"output_per_million": Decimal("0.41")})
    with pytest.raises(LedgerError, match="new effective_from"), transaction(sessions) as s:
        sync_price_cards(s, [edited])


def test_version_in_force_at_a_time(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    second = timedelta(seconds=1)
    with transaction(sessions) as s:
        assert price_card_version_for(s, "sim", MAR - second).id == versions["sim@jan"]
        assert price_card_version_for(s, "sim", MAR).id == versions["sim@mar"]
        assert price_card_version_for(s, "sim", MAR + timedelta(days=400)).id == versions["sim@mar"]
        v = price_card_version_for(s, "sim", MAR)
        assert (v.input_per_million, v.output_per_million) == (Decimal("0.12"), Decimal("0.48"))
        assert v.effective_from == MAR and v.currency == "USD"
        with pytest.raises(NotFound):
            price_card_version_for(s, "sim", JAN - second)
        with pytest.raises(NotFound):
            price_card_version_for(s, "unknown", MAR)


def test_priced_costs_are_stored_exactly() -> None:
    card = CARDS[0]
    assert exact(cost(card, 1000, 500, Priority.standard)) == Decimal("0.0003")
    assert exact(cost(card, 1000, 500, Priority.batch)) == Decimal("0.00015")
    with pytest.raises(LedgerError):
        exact(Decimal("1e-11"))


def test_minor_unit_rounding() -> None:
    assert to_minor_unit(Decimal("0.125")) == Decimal("0.12")
    assert to_minor_unit(Decimal("0.135")) == Decimal("0.14")
    assert to_minor_unit(Decimal("12.5"), "JPY") == Decimal(12)


def test_charge_replays_are_no_ops(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    amount = Decimal("0.0003")
    for expected in (True, False, False):
        with transaction(sessions) as s:
            assert record_charge(
                s, "req_1", "alpha", "sim", amount, versions["sim@mar"],
                prompt_tokens=1000, completion_tokens=500, at=MAR,
            ) is expected  # fmt: skip
    with transaction(sessions) as s:
        # A refund is another kind, so it is its own entry (and its own replay key).
        assert record_charge(s, "req_1", "alpha", "sim", -amount, versions["sim@mar"],
                             kind=EntryKind.refund, at=MAR)  # fmt: skip
        assert not record_charge(s, "req_1", "alpha", "sim", -amount, versions["sim@mar"],
                                 kind=EntryKind.refund, at=MAR)  # fmt: skip
        entries = s.scalars(select(LedgerEntry).order_by(LedgerEntry.id)).all()
        assert [(e.kind, e.amount, e.currency) for e in entries] == [
            (EntryKind.charge, amount, "USD"),
            (EntryKind.refund, -amount, "USD"),
        ]
        assert tenant_spend(s, "alpha", MAR, MAR + timedelta(days=1)) == 0


@pytest.mark.parametrize(
    ("amount", "kind", "version", "match"),
    [
        (0.1, EntryKind.charge, True, "Decimal"),
        (Decimal("0.00000000001"), EntryKind.charge, True, "decimal places"),
        (Decimal(-1), EntryKind.charge, True, "wrong sign"),
        (Decimal(1), EntryKind.refund, True, "wrong sign"),
        (Decimal(1), EntryKind.charge, False, "price card"),
        (Decimal("NaN"), EntryKind.adjustment, True, "range"),
    ],
)
def test_bad_amounts_are_refused(
    sessions: sessionmaker[Session],
    versions: dict[str, int],
    amount: Decimal,
    kind: EntryKind,
    version: bool,
    match: str,
) -> None:
    vid = versions["sim@mar"] if version else None
    with pytest.raises(LedgerError, match=match), transaction(sessions) as s:
        record_charge(s, "req_1", "alpha", "sim", amount, vid, kind=kind)


def test_unknown_price_card_version(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(NotFound), transaction(sessions) as s:
        record_charge(s, "req_1", "alpha", "sim", Decimal(1), 12345)


def test_concurrent_charge_replays_insert_once(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    results: list[bool] = []

    def replay() -> None:
        barrier.wait()
        results.append(
            run_transaction(
                sessions,
                lambda s: record_charge(
                    s, "req_1", "alpha", "sim", Decimal("0.0003"), versions["sim@mar"], at=MAR
                ),
            )
        )

    threads = [threading.Thread(target=replay) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * (n_threads - 1) + [True]
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(LedgerEntry)) == 1
        assert tenant_spend(s, "alpha", MAR, MAR + timedelta(days=1)) == Decimal("0.0003")


# Amounts anywhere from 1e-10 to a million, at full ledger precision.
AMOUNTS = st.decimals(
    min_value=Decimal(0), max_value=Decimal(1000000), places=10,
    allow_nan=False, allow_infinity=False,
)  # fmt: skip
ENTRIES = st.lists(
    st.tuples(st.sampled_from(["sim", "smollm2"]), AMOUNTS, st.sampled_from(list(EntryKind))),
    max_size=12,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=ENTRIES)
def test_invoice_total_is_the_exact_sum_of_entries(
    sessions: sessionmaker[Session],
    versions: dict[str, int],
    entries: list[tuple[str, Decimal, EntryKind]],
) -> None:
    tenant = f"t_{uuid.uuid4().hex[:12]}"  # one tenant per example: no cleanup needed
    period = Period.month(2026, 3)
    expected: dict[str, Decimal] = {}
    with transaction(sessions) as s:
        for i, (model, amount, kind) in enumerate(entries):
            signed = -amount if kind is EntryKind.refund else amount
            vid = versions["sim@mar" if model == "sim" else "smollm2"]
            at = MAR + timedelta(hours=i)
            assert record_charge(s, f"{tenant}_{i}", tenant, model, signed, vid, kind=kind, at=at,
                                 prompt_tokens=i, completion_tokens=2 * i)  # fmt: skip
            expected[model] = expected.get(model, Decimal(0)) + signed
        # Just outside the period on both sides: never counted.
        for j, at in enumerate((MAR - timedelta(microseconds=1), period.end)):
            record_charge(s, f"{tenant}_out{j}", tenant, "sim", Decimal(7), versions["sim@mar"],
                          at=at)  # fmt: skip
    with transaction(sessions) as s:
        inv = invoice(s, tenant, period)
        spend = tenant_spend(s, tenant, period.start, period.end)
    exact_total = sum(expected.values(), Decimal(0))
    assert inv.total == exact_total == spend
    assert {line.model: line.amount for line in inv.lines} == expected
    assert inv.total_rounded == to_minor_unit(exact_total)
    assert sum(line.amount_rounded for line in inv.lines) + inv.rounding_adjustment == (
        inv.total_rounded
    )
    for line in inv.lines:
        assert line.amount_rounded == to_minor_unit(line.amount)
        charged = [(i, m) for i, (m, _, k) in enumerate(entries)
                   if m == line.model and k is EntryKind.charge]  # fmt: skip
        assert line.requests == len(charged)
        assert line.prompt_tokens == sum(i for i, _ in charged)
        assert line.completion_tokens == sum(2 * i for i, _ in charged)


def test_rounding_adjustment_is_shown(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    with transaction(sessions) as s:
        record_charge(s, "a", "alpha", "sim", Decimal("0.004"), versions["sim@mar"], at=MAR)
        record_charge(s, "b", "alpha", "smollm2", Decimal("0.004"), versions["smollm2"], at=MAR)
        inv = invoice(s, "alpha", Period.month(2026, 3))
    assert [line.amount_rounded for line in inv.lines] == [Decimal("0.00")] * 2
    assert (inv.total, inv.total_rounded) == (Decimal("0.008"), Decimal("0.01"))
    assert inv.rounding_adjustment == Decimal("0.01")


def test_empty_invoice_and_mixed_currencies(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    with transaction(sessions) as s:
        inv = invoice(s, "alpha", Period.month(2026, 3))
        assert (inv.lines, inv.total, inv.total_rounded, inv.currency) == ((), 0, 0, "USD")
        record_charge(s, "a", "alpha", "sim", Decimal(1), versions["sim@mar"], at=MAR)
        record_charge(s, "a", "alpha", "sim", Decimal(1), None, kind=EntryKind.adjustment,
                      currency="EUR", at=MAR)  # fmt: skip
    with pytest.raises(LedgerError, match="currencies"), transaction(sessions) as s:
        invoice(s, "alpha", Period.month(2026, 3))


def test_periods() -> None:
    dec = Period.month(2026, 12)
    assert (dec.start, dec.end) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert Period.month(2028, 2).end == datetime(2028, 3, 1, tzinfo=UTC)
    at = datetime(2026, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2)))  # April in UTC
    assert Period.containing(at, BudgetPeriod.month) == Period.month(2026, 4)
    assert Period.containing(at, BudgetPeriod.day) == Period.day(date(2026, 4, 1))
    with pytest.raises(ValueError):
        Period(MAR, MAR)

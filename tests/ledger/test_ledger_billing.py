"""Price card versions, charges and partial work written by the ledger's one write path
(LedgerSink), spend and invoices: exact to the last decimal."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_events import CARDS, JAN, MAR, MILLION, event, expected_cost
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import Settings
from tokenmill.ledger import (
    EntryKind,
    LedgerEntry,
    Period,
    SlaRecord,
    UsageRecord,
    exact,
    invoice,
    price_card_version_for,
    spend_by_tenant,
    sync_price_cards,
    to_minor_unit,
    transaction,
)
from tokenmill.ledger.streams import LedgerSink

from tokenmill.errors import LedgerError, NotFound
from tokenmill.pricing import cost
from tokenmill.wire import EventKind, Priority

SIM_JAN, SIM_MAR, SMOLLM2, MINILM = CARDS


@pytest.fixture
def versions(sink: LedgerSink, sessions: sessionmaker[Session]) -> dict[str, int]:
    """Stored price card versions (the sink synced them): ``{"sim@jan": id, ...}``."""
    with transaction(sessions) as s:
        return {
            "sim@jan": price_card_version_for(s, "sim", JAN).id,
            "sim@mar": price_card_version_for(s, "sim", MAR).id,
            "smollm2": price_card_version_for(s, "smollm2", JAN).id,
        }


def _entries(sessions: sessionmaker[Session]) -> list[tuple[str, EntryKind, Decimal, int | None]]:
    with transaction(sessions) as s:
        rows = s.scalars(select(LedgerEntry).order_by(LedgerEntry.request_id, LedgerEntry.kind))
        return [(e.request_id, e.kind, e.amount, e.price_card_version_id) for e in rows]


def _count(sessions: sessionmaker[Session], table: type) -> int:
    with transaction(sessions) as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_sync_is_idempotent_and_refuses_edits(
    sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    with transaction(sessions) as s:
        assert sync_price_cards(s, CARDS) == 0
    edited = SIM_JAN.model_copy(update={"output_per_million": Decimal("0.41")})
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
    assert exact(cost(SIM_JAN, 1000, 500, Priority.standard)) == Decimal("0.0003")
    assert exact(cost(SIM_JAN, 1000, 500, Priority.batch)) == Decimal("0.00015")
    with pytest.raises(LedgerError):
        exact(Decimal("1e-11"))


def test_an_embedding_cards_costs_are_its_input_tokens_only() -> None:
    # an embeddings request generates nothing; its card has no output price at all
    assert MINILM.output_per_million == 0
    assert exact(cost(MINILM, 1_000_000, 0, Priority.standard)) == Decimal("0.02")
    assert exact(cost(MINILM, 1234, 0, Priority.batch)) == Decimal(1234) * Decimal("0.02") / MILLION


def test_minor_unit_rounding() -> None:
    assert to_minor_unit(Decimal("0.125")) == Decimal("0.12")
    assert to_minor_unit(Decimal("0.135")) == Decimal("0.14")
    assert to_minor_unit(Decimal("12.5"), "JPY") == Decimal(12)


def test_charges_use_the_version_in_force_at_finish_and_replays_are_no_ops(
    sink: LedgerSink, sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    us = timedelta(microseconds=1)
    batch = [
        event("before", MAR - us, prompt_tokens=1000, completion_tokens=500),
        event("at", MAR, prompt_tokens=1000, completion_tokens=500),
        event("batch", MAR, prompt_tokens=1000, completion_tokens=500, priority=Priority.batch),
    ]
    for expected_new in (3, 0, 0):
        outcome = sink.write(batch)
        assert (len(outcome.new), outcome.duplicates, outcome.rejected) == (
            expected_new, 3 - expected_new, [])  # fmt: skip
    assert _entries(sessions) == [
        ("at", EntryKind.charge, Decimal("0.00036"), versions["sim@mar"]),
        ("batch", EntryKind.charge, Decimal("0.00018"), versions["sim@mar"]),
        ("before", EntryKind.charge, Decimal("0.0003"), versions["sim@jan"]),
    ]
    with transaction(sessions) as s:
        spend = spend_by_tenant(s, JAN, MAR + timedelta(days=1))
    assert spend == {"alpha": Decimal("0.00084")}


def test_concurrent_replays_charge_once(
    settings: Settings, sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    """Several consumers (each its own sink) write the same batch at once, in
    different orders: every request is charged once."""
    n_threads, n_events = 8, 30
    batch = [event(f"req_{i:03d}", MAR + timedelta(seconds=i), prompt_tokens=i,
                   completion_tokens=2 * i) for i in range(1, n_events + 1)]  # fmt: skip
    barrier = threading.Barrier(n_threads)
    new: list[int] = []
    errors: list[BaseException] = []

    def consumer(k: int) -> None:
        sink = LedgerSink(sessions, settings)
        sink.prepare()
        try:
            barrier.wait()
            new.append(len(sink.write(batch[::-1] if k % 2 else batch).new))
        except BaseException as exc:  # noqa: BLE001  (surfaced below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(new) == n_events
    entries = _entries(sessions)
    assert len(entries) == n_events
    assert sum(e[2] for e in entries) == sum(expected_cost(ev, SIM_MAR) for ev in batch)


def test_partial_work_is_billed_once_as_its_own_kind(
    sink: LedgerSink, sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    at = MAR + timedelta(hours=1)
    outcome = sink.write([
        event("cancelled", at, kind=EventKind.cancelled, prompt_tokens=300, completion_tokens=7),
        event("failed", at, kind=EventKind.failed, prompt_tokens=40, completion_tokens=0),
        # refused or cancelled before the engine had it: nothing to bill
        event("refused", at, kind=EventKind.cancelled, prompt_tokens=0, completion_tokens=0),
        event("done", at, prompt_tokens=300, completion_tokens=7),
    ])  # fmt: skip
    assert (len(outcome.new), len(outcome.new_partial), outcome.skipped) == (1, 2, 1)
    price = Decimal("0.0000393600")  # (300 * 0.12 + 7 * 0.48) / 1e6, sim's March card
    assert _entries(sessions) == [
        ("cancelled", EntryKind.partial, price, versions["sim@mar"]),
        ("done", EntryKind.charge, price, versions["sim@mar"]),
        ("failed", EntryKind.partial, Decimal("0.0000048"), versions["sim@mar"]),
    ]
    assert _count(sessions, UsageRecord) == 3
    with transaction(sessions) as s:  # a request that did not finish has no SLA figures
        assert s.scalars(select(SlaRecord.request_id)).all() == ["done"]

    # A partial event after the finished one (or a finished one after a partial: a
    # race, a redelivery, a repair) bills nothing more, whichever batch it comes in.
    late = sink.write([
        event("done", at, kind=EventKind.cancelled, prompt_tokens=300, completion_tokens=3),
        event("cancelled", at, prompt_tokens=300, completion_tokens=9),
        event("both", at, kind=EventKind.failed, prompt_tokens=10, completion_tokens=1),
        event("both", at, prompt_tokens=10, completion_tokens=5),
    ])  # fmt: skip
    assert [(r.event.request_id, r.new) for r in late.recorded] == [
        ("cancelled", False), ("both", False)]  # fmt: skip
    assert [(r.event.request_id, r.new) for r in late.partial] == [
        ("done", False), ("both", True)]  # fmt: skip
    entries = _entries(sessions)
    assert [(rid, kind) for rid, kind, _, _ in entries] == [
        ("both", EntryKind.partial), ("cancelled", EntryKind.partial), ("done", EntryKind.charge),
        ("failed", EntryKind.partial),
    ]  # fmt: skip
    assert _count(sessions, UsageRecord) == 4
    with transaction(sessions) as s:
        usage = s.get(UsageRecord, "cancelled")
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (300, 7)
        inv = invoice(s, "alpha", Period.month(2026, 3))
    assert [(ln.model, ln.kind, ln.requests, ln.prompt_tokens, ln.completion_tokens, ln.amount)
            for ln in inv.lines] == [
        ("sim", EntryKind.charge, 1, 300, 7, price),
        ("sim", EntryKind.partial, 3, 350, 8, price + Decimal("0.0000048") + Decimal("0.00000168")),
    ]  # fmt: skip
    assert inv.total == sum(e[2] for e in entries)


def test_partial_work_without_a_finish_time_is_placed_at_the_event_time(
    sink: LedgerSink, sessions: sessionmaker[Session], versions: dict[str, int]
) -> None:
    ev = event("r", MAR - timedelta(seconds=1), kind=EventKind.failed, prompt_tokens=1000)
    outcome = sink.write([ev.model_copy(update={"finished_at": None})])
    assert [r.new for r in outcome.partial] == [True]
    assert _entries(sessions) == [("r", EntryKind.partial, Decimal("0.0001080"), versions["sim@jan"])]


# Token counts up to ten million; every kind of terminal event.
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["sim", "smollm2"]),
        st.sampled_from([EventKind.finished, EventKind.cancelled, EventKind.failed]),
        st.sampled_from(list(Priority)),
        st.integers(0, 10_000_000),
        st.integers(0, 10_000_000),
    ),
    max_size=12,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=EVENTS)
def test_invoice_total_is_the_exact_sum_of_entries(
    sink: LedgerSink,
    sessions: sessionmaker[Session],
    events: list[tuple[str, EventKind, Priority, int, int]],
) -> None:
    tenant = f"t_{uuid.uuid4().hex[:12]}"  # one tenant per example: no cleanup needed
    period = Period.month(2026, 3)
    batch, expected = [], {}
    for i, (model, kind, priority, pt, ct) in enumerate(events):
        ev = event(f"{tenant}_{i}", MAR + timedelta(hours=i), kind=kind, tenant=tenant,
                   model=model, priority=priority, prompt_tokens=pt, completion_tokens=ct)  # fmt: skip
        batch.append(ev)
        if kind is EventKind.finished or pt or ct:
            line = (model, EntryKind.charge if kind is EventKind.finished else EntryKind.partial)
            card = SIM_MAR if model == "sim" else SMOLLM2
            n, p, c, amount = expected.get(line, (0, 0, 0, Decimal(0)))
            expected[line] = (n + 1, p + pt, c + ct, amount + expected_cost(ev, card))
    # Just outside the period on both sides: never counted.
    batch += [event(f"{tenant}_out{j}", at, tenant=tenant, prompt_tokens=10**6)
              for j, at in enumerate((MAR - timedelta(microseconds=1), period.end))]  # fmt: skip
    assert sink.write(batch).rejected == []
    with transaction(sessions) as s:
        inv = invoice(s, tenant, period)
        spend = spend_by_tenant(s, period.start, period.end, [tenant])
    exact_total = sum((amount for *_, amount in expected.values()), Decimal(0))
    assert inv.total == exact_total == spend.get(tenant, Decimal(0))
    assert {(ln.model, ln.kind): (ln.requests, ln.prompt_tokens, ln.completion_tokens, ln.amount)
            for ln in inv.lines} == expected  # fmt: skip
    assert inv.total_rounded == to_minor_unit(exact_total)
    assert sum(line.amount_rounded for line in inv.lines) + inv.rounding_adjustment == (
        inv.total_rounded
    )
    for line in inv.lines:
        assert line.amount_rounded == to_minor_unit(line.amount)


def test_rounding_adjustment_is_shown(sink: LedgerSink, sessions: sessionmaker[Session]) -> None:
    # 0.004 each: 40,000 prompt tokens of sim at 0.10 (January), 20,000 of smollm2 at 0.20.
    at = JAN + timedelta(days=1)
    sink.write([event("a", at, prompt_tokens=40_000, completion_tokens=0),
                event("b", at, model="smollm2", prompt_tokens=20_000, completion_tokens=0)])  # fmt: skip
    with transaction(sessions) as s:
        inv = invoice(s, "alpha", Period.month(2026, 1))
    assert [line.amount for line in inv.lines] == [Decimal("0.004")] * 2
    assert [line.amount_rounded for line in inv.lines] == [Decimal("0.00")] * 2
    assert (inv.total, inv.total_rounded) == (Decimal("0.008"), Decimal("0.01"))
    assert inv.rounding_adjustment == Decimal("0.01")


def test_empty_invoice_and_mixed_currencies(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as s:
        inv = invoice(s, "alpha", Period.month(2026, 3))
        assert (inv.lines, inv.total, inv.total_rounded, inv.currency) == ((), 0, 0, "USD")
    sink.write([event("a", MAR)])
    with transaction(sessions) as s:
        # An adjustment in another currency (no writer makes one yet: a row is enough
        # to check that invoices refuse to add currencies up).
        s.add(LedgerEntry(request_id="a", kind=EntryKind.adjustment, tenant="alpha", model="sim",
                          amount=Decimal(1), currency="EUR", created_at=MAR))  # fmt: skip
    with pytest.raises(LedgerError, match="currencies"), transaction(sessions) as s:
        invoice(s, "alpha", Period.month(2026, 3))

"""Usage records and the per-minute roll-up, written by the ledger's one write path
(LedgerSink): replays never double-count."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from ledger_events import event
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import Settings
from tokenmill.ledger import UsageRecord, UsageTotals, transaction, usage_minutes, usage_totals
from tokenmill.ledger.streams import LedgerSink

from tokenmill.wire import EventKind, TokenEvent

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _event(i: int, *, tenant: str = "alpha", model: str = "sim") -> TokenEvent:
    return event(
        f"req_{tenant}_{model}_{i}", T0 + timedelta(seconds=20 * i),  # three per minute
        tenant=tenant, model=model, prompt_tokens=10 + i, completion_tokens=2 * i,
    )  # fmt: skip


def _totals(sessions: sessionmaker[Session]) -> dict[str, UsageTotals]:
    with transaction(sessions) as s:
        return usage_totals(s, "alpha", T0 - timedelta(days=1))


def test_replays_are_no_ops_and_minutes_add_up(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    events = [_event(i) for i in range(6)]
    assert len(sink.write(events).new) == 6
    before = _totals(sessions)
    for _ in range(2):
        assert sink.write(events).duplicates == 6
    assert (
        _totals(sessions)
        == before
        == {"sim": UsageTotals(requests=6, input_tokens=75, output_tokens=30)}
    )
    with transaction(sessions) as s:
        rows = usage_minutes(s, "alpha", T0)
        assert [(r.minute, r.requests, r.input_tokens, r.output_tokens) for r in rows] == [
            (T0, 3, 33, 6),
            (T0 + timedelta(minutes=1), 3, 42, 24),
        ]


def test_partial_work_is_usage_too(sink: LedgerSink, sessions: sessionmaker[Session]) -> None:
    sink.write([event("c", T0 + timedelta(seconds=5), kind=EventKind.cancelled,
                      prompt_tokens=50, completion_tokens=4),
                event("f", T0 + timedelta(seconds=6), prompt_tokens=1, completion_tokens=1)])  # fmt: skip
    sink.write([event("c", T0 + timedelta(seconds=7), prompt_tokens=50, completion_tokens=90)])
    assert _totals(sessions) == {"sim": UsageTotals(2, 51, 5)}


def test_queries_filter_by_tenant_time_and_model(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    sink.write([_event(i) for i in range(6)] + [_event(i, tenant="beta", model="smollm2")
               for i in range(6)] + [_event(0, model="smollm2")])  # fmt: skip
    with transaction(sessions) as s:
        later = T0 + timedelta(minutes=1)
        assert usage_totals(s, "alpha", later) == {"sim": UsageTotals(3, 42, 24)}
        assert usage_totals(s, "alpha", T0, later) == {
            "sim": UsageTotals(3, 33, 6),
            "smollm2": UsageTotals(1, 10, 0),
        }
        assert set(usage_totals(s, "beta", T0)) == {"smollm2"}
        assert [r.model for r in usage_minutes(s, "alpha", T0, later, model="smollm2")] == [
            "smollm2"
        ]
        assert usage_totals(s, "gamma", T0) == {}


def test_one_batch_equals_one_by_one(
    sink: LedgerSink, sessions: sessionmaker[Session], settings: Settings
) -> None:
    events = [_event(i) for i in range(6)]
    outcome = sink.write(events + events[:2])  # repeats inside one batch too
    assert (len(outcome.new), outcome.duplicates) == (6, 2)
    batched = _totals(sessions)
    with transaction(sessions) as s:
        by_minute = [(r.minute, r.requests, r.input_tokens) for r in usage_minutes(s, "alpha", T0)]
    one = [_event(i, tenant="beta") for i in range(6)]
    for ev in one + one[:2]:
        sink.write([ev])
    with transaction(sessions) as s:
        assert usage_totals(s, "beta", T0) == batched == {"sim": UsageTotals(6, 75, 30)}
        assert [(r.minute, r.requests, r.input_tokens)
                for r in usage_minutes(s, "beta", T0)] == by_minute  # fmt: skip


@pytest.mark.parametrize("mixed_order", [False, True], ids=["same-order", "mixed-order"])
def test_concurrent_replays_count_once(
    sessions: sessionmaker[Session], settings: Settings, mixed_order: bool
) -> None:
    """Several consumers replay overlapping events at once, e.g. after a rebalance:
    each sink writes in request-id order, so PostgreSQL cannot deadlock them."""
    n_threads, n_events = 6, 40
    barrier = threading.Barrier(n_threads)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def consumer(k: int) -> None:
        sink = LedgerSink(sessions, settings)
        sink.prepare()
        events = [_event(i) for i in range(n_events)]
        if mixed_order and k % 2:
            events.reverse()
        try:
            barrier.wait()
            inserted.append(len(sink.write(events[k % 3 :]).new))  # overlapping sets
        except BaseException as exc:  # noqa: BLE001  (surfaced below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(inserted) == n_events
    assert _totals(sessions) == {
        "sim": UsageTotals(
            requests=n_events,
            input_tokens=sum(10 + i for i in range(n_events)),
            output_tokens=sum(2 * i for i in range(n_events)),
        )
    }
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(UsageRecord)) == n_events

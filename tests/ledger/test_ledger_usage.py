"""Usage records and the per-minute roll-up: replays never double-count."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import (
    UsageItem,
    UsageRecord,
    UsageTotals,
    minute_of,
    record_usage,
    record_usage_many,
    run_transaction,
    transaction,
    usage_minutes,
    usage_totals,
)

from tokenmill.wire import Priority

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _usage(s: Session, i: int, *, tenant: str = "alpha", model: str = "sim") -> bool:
    return record_usage(
        s, request_id=f"req_{tenant}_{model}_{i}", tenant=tenant, model=model,
        priority=Priority.standard, prompt_tokens=10 + i, completion_tokens=2 * i,
        at=T0 + timedelta(seconds=20 * i),  # three requests per minute
    )  # fmt: skip


def test_minute_buckets() -> None:
    assert minute_of(T0 + timedelta(seconds=59, microseconds=999)) == T0
    assert minute_of((T0 + timedelta(minutes=1)).timestamp()) == T0 + timedelta(minutes=1)


def test_replays_are_no_ops(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        assert [_usage(s, i) for i in range(6)] == [True] * 6
    before = _totals(sessions)
    for _ in range(2):
        with transaction(sessions) as s:
            assert [_usage(s, i) for i in range(6)] == [False] * 6
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


def test_queries_filter_by_tenant_time_and_model(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        for i in range(6):
            _usage(s, i)
            _usage(s, i, tenant="beta", model="smollm2")
        _usage(s, 0, tenant="alpha", model="smollm2")
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


def _totals(sessions: sessionmaker[Session]) -> dict[str, UsageTotals]:
    with transaction(sessions) as s:
        return usage_totals(s, "alpha", T0 - timedelta(days=1))


def _item(i: int) -> UsageItem:
    return UsageItem(
        f"req_alpha_sim_{i}", "alpha", "sim", Priority.standard, 10 + i, 2 * i,
        T0 + timedelta(seconds=20 * i),
    )  # fmt: skip


def test_many_at_once_equals_one_by_one(sessions: sessionmaker[Session]) -> None:
    items = [_item(i) for i in range(6)]
    with transaction(sessions) as s:
        assert record_usage_many(s, items + items[:2]) == 6  # repeats inside one call too
        assert record_usage_many(s, items) == 0
    assert _totals(sessions) == {"sim": UsageTotals(6, 75, 30)}


@pytest.mark.parametrize("api", ["one-by-one", "many"])
@pytest.mark.parametrize("mixed_order", [False, True], ids=["same-order", "mixed-order"])
def test_concurrent_replays_count_once(
    sessions: sessionmaker[Session], api: str, mixed_order: bool
) -> None:
    """Several consumers replay the same events at once, e.g. after a rebalance.
    One-by-one writes in mixed orders can deadlock on PostgreSQL (run_transaction
    retries them); record_usage_many locks in one order and cannot."""
    n_threads, n_events = 6, 40
    barrier = threading.Barrier(n_threads)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def consumer(k: int) -> None:
        order = list(range(n_events))
        if mixed_order and k % 2:
            order.reverse()

        def work(s: Session) -> int:
            if api == "many":
                return record_usage_many(s, [_item(i) for i in order])
            return sum(_usage(s, i) for i in order)

        try:
            barrier.wait()
            inserted.append(run_transaction(sessions, work, attempts=1 if api == "many" else 20))
        except BaseException as exc:  # noqa: BLE001  (surfaced below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(inserted) == n_events
    totals = _totals(sessions)
    assert totals == {
        "sim": UsageTotals(
            requests=n_events,
            input_tokens=sum(10 + i for i in range(n_events)),
            output_tokens=sum(2 * i for i in range(n_events)),
        )
    }
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(UsageRecord)) == n_events

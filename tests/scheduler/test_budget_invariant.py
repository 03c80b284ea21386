"""Property: with exact prompt counts, a budget is never overshot, however requests
interleave, whatever they end as (finished, or cancelled mid-generation and billed the
work done), and however often spending is re-read from a ledger that lags behind."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_helpers import pool, req, scheduler
from tokenmill.scheduler import BudgetExceeded, Priority, TenantPolicy
from tokenmill.scheduler.spending import Unbilled

# One request: (prompt tokens, max_tokens, fraction of max_tokens generated, priority).
REQUEST = st.tuples(
    st.integers(1, 400),
    st.integers(1, 300),
    st.floats(0, 1),
    st.sampled_from([Priority.STANDARD, Priority.BATCH]),
)
# Steps: dispatch into n slots, settle the oldest k in flight, re-read the "ledger".
STEP = st.one_of(
    st.tuples(st.just("dispatch"), st.integers(1, 8)),
    st.tuples(st.just("settle"), st.integers(1, 8)),
    st.tuples(st.just("ledger"), st.integers(0, 8)),
)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.decimals(Decimal("0.01"), Decimal(3), places=3),
    requests=st.lists(REQUEST, min_size=1, max_size=60),
    steps=st.lists(STEP, min_size=1, max_size=60),
)
def test_budget_is_never_overshot(limit: Decimal, requests: list, steps: list) -> None:
    s = scheduler(TenantPolicy("a", budget=limit, budget_calendar_month=True))
    now = 1_800_000_000.0
    actual: dict[str, tuple[int, int]] = {}
    queued = 0
    for i, (prompt, max_tokens, done, prio) in enumerate(requests):
        rid = f"r{i}"
        try:
            s.enqueue(req("a", rid=rid, inp=prompt, out=max_tokens, priority=prio), now)
        except BudgetExceeded:
            continue
        queued += 1
        actual[rid] = (prompt, int(max_tokens * done))  # what the engine will bill
    in_flight: list[str] = []
    refused = 0
    billed: list[Decimal] = []  # settled costs, in the order a ledger would write them
    for kind, n in steps:
        now += 1.0
        if kind == "dispatch":
            result = s.dispatch(pool(n), now)
            in_flight += [d.request.request_id for d in result.dispatched]
            refused += len(result.rejected)
            assert all(r.reason.value == "budget_exceeded" for r in result.rejected)
        elif kind == "settle":
            for rid in in_flight[:n]:
                done_ = s.complete(rid, *actual[rid], now)
                assert (
                    done_ is not None and done_.cost is not None and done_.cost <= done_.reservation
                )
                billed.append(done_.cost)
            del in_flight[:n]
        else:  # the ledger holds all but the last n settled costs; the rest are unbilled
            cut = max(0, len(billed) - n)
            unbilled = Unbilled()
            for j, cost in enumerate(billed[cut:]):
                unbilled.add(f"u{j}", "a", cost)
            s.set_spending(unbilled.spent({"a": sum(billed[:cut], Decimal(0))}, ["a"]), now)
        view = s.budget("a", now)
        assert view is not None
        assert view.spent + view.reserved <= limit
        assert view.spent == sum(billed, Decimal(0))
    for rid in in_flight:
        done_ = s.complete(rid, *actual[rid], now)
        assert done_ is not None and done_.cost is not None
        billed.append(done_.cost)
    assert sum(billed, Decimal(0)) <= limit
    # every request was settled once, refused with the budget error, or is still queued
    assert len(billed) + refused + s.backlog() == queued

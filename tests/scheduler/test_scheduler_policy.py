"""Behaviour of the scheduling policy, one rule at a time."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scheduler_helpers import ids, pool, price, req, scheduler
from tokenmill.ledger.billing import Period
from tokenmill.scheduler import (
    BudgetExceeded,
    DuplicateRequest,
    InvalidPolicy,
    InvalidRequest,
    Pool,
    Priority,
    QueuedRequest,
    RejectReason,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    SchedulerSnapshot,
    TenantPolicy,
    UnknownModel,
    UnknownTenant,
)
from tokenmill.scheduler.budget import month_index

I, S, B = Priority.INTERACTIVE, Priority.STANDARD, Priority.BATCH


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_weight_is_refused(weight: float) -> None:
    with pytest.raises(InvalidPolicy):
        TenantPolicy("a", weight=weight)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(InvalidPolicy, match="Decimal"):
        TenantPolicy("a", budget=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidPolicy):
        TenantPolicy("a", requests_per_min=0)
    with pytest.raises(InvalidPolicy):
        TenantPolicy("")
    with pytest.raises(InvalidPolicy):
        SchedulerConfig(batch_share=0.0)
    with pytest.raises(InvalidPolicy):
        SchedulerConfig(w_out=-1.0)
    with pytest.raises(InvalidPolicy):
        Pool("p", frozenset({"m"}), -1)
    with pytest.raises(InvalidPolicy, match="cost function"):
        Scheduler(tenants=[TenantPolicy("a", budget=Decimal(1))])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"inp": -1},
        {"out": -5},
        {"out": 5, "est": 6},
        {"est": -1},
        {"at": float("nan")},
        {"deadline": float("inf")},
        {"rid": ""},
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        req(**kwargs)  # type: ignore[arg-type]


def test_priority_given_as_text_is_read_and_unknown_text_refused() -> None:
    assert QueuedRequest("x", "a", "m", "batch", 1, 1, 0.0).priority is B  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        QueuedRequest("x", "a", "m", "urgent", 1, 1, 0.0)  # type: ignore[arg-type]


def test_errors_share_one_base() -> None:
    for error in (UnknownTenant, UnknownModel, InvalidRequest, DuplicateRequest, BudgetExceeded):
        assert issubclass(error, SchedulerError)


def test_refused_enqueues_leave_the_queues_as_they_were() -> None:
    s = scheduler(TenantPolicy("a"), TenantPolicy("b"))
    twin = scheduler(TenantPolicy("a"), TenantPolicy("b"))
    for t in (s, twin):
        t.enqueue(req("a", rid="a1"), 0.0)
        t.enqueue(req("b", rid="b1"), 0.0)
    with pytest.raises(UnknownTenant):
        s.enqueue(req("zz"), 0.0)
    with pytest.raises(UnknownModel):
        s.enqueue(req("a", model="nope"), 0.0)
    with pytest.raises(DuplicateRequest):
        s.enqueue(req("b", rid="a1"), 0.0)
    with pytest.raises(InvalidRequest):
        s.enqueue(("a1", "a"), 0.0)  # type: ignore[arg-type]
    assert s.backlog() == twin.backlog() == 2
    assert ids(s.dispatch(pool(1), 1.0)) == ids(twin.dispatch(pool(1), 1.0)) == ["a1"]
    with pytest.raises(DuplicateRequest):  # in flight counts too
        s.enqueue(req("a", rid="a1"), 1.0)
    assert ids(s.dispatch(pool(5), 2.0)) == ["b1"]


def test_failing_cost_function_changes_nothing() -> None:
    s = Scheduler(cost=lambda *a: 1.0, tenants=[TenantPolicy("a", budget=Decimal(5))], models=["m"])  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidPolicy, match="Decimal"):
        s.enqueue(req("a"), 0.0)
    assert s.backlog() == 0


# -- fair share -------------------------------------------------------------------------------


def test_weights_split_dispatches_in_proportion() -> None:
    s = scheduler(TenantPolicy("a", weight=1), TenantPolicy("b", weight=3))
    for i in range(100):
        s.enqueue(req("a", est=10), 0.0)
        s.enqueue(req("b", est=10), 0.0)
    got = Counter(d.request.tenant for d in s.dispatch(pool(40), 0.0).dispatched)
    assert got == {"a": 10, "b": 30}


def test_charges_use_input_and_output_weights() -> None:
    s = scheduler(TenantPolicy("a", weight=2), config=SchedulerConfig(w_in=1, w_out=3, w_req=5))
    s.enqueue(req("a", inp=10, out=100, est=20), 0.0)
    (d,) = s.dispatch(pool(1), 0.0).dispatched
    assert d.charge == (5 + 10 + 3 * 20) / 2
    assert s.counter("a", S) == d.charge
    s.complete(d.request.request_id, 10, 50, 1.0)  # corrected to the actual output
    assert s.counter("a", S) == (5 + 10 + 3 * 50) / 2


def test_idle_time_is_not_banked() -> None:
    s = scheduler(TenantPolicy("a"), TenantPolicy("b"))
    for _ in range(50):
        s.enqueue(req("a"), 0.0)
    for _ in range(30):
        s.complete(s.dispatch(pool(1), 0.0).dispatched[0].request.request_id, 10, 10, 0.0)
    for _ in range(20):
        s.enqueue(req("b"), 1.0)
    # b was idle while a got 30 requests; it is lifted to a's counter, so they alternate.
    order = [d.request.tenant for d in s.dispatch(pool(10), 1.0).dispatched]
    assert order.count("b") == 5, order
    assert s.counter("b", S) >= 30 * (1 + 10 + 2 * 10)


def test_a_lower_actual_cost_moves_a_tenant_forward_at_once() -> None:
    s = scheduler(TenantPolicy("a"), TenantPolicy("b"), TenantPolicy("c"))
    for n in range(10):
        s.enqueue(req("a", rid=f"a{n}", out=100, est=100), 0.0)  # charge 211
        s.enqueue(req("b", rid=f"b{n}", out=100, est=100), 0.0)  # charge 211
        s.enqueue(req("c", rid=f"c{n}", out=100, est=50), 0.0)  # charge 111
    assert ids(s.dispatch(pool(7), 0.0)) == ["a0", "b0", "c0", "c1", "a1", "b1", "c2"]
    s.complete("b0", 10, 0, 1.0)
    s.complete("b1", 10, 0, 1.0)  # b's requests cost 11 each, not 211: b drops to 22
    assert s.counter("b", S) == 22.0
    assert ids(s.dispatch(pool(2), 1.0)) == ["b2", "b3"]  # ahead of c (333) and a (422)


def test_returning_tenant_wins_ties_over_the_one_just_served() -> None:
    s = scheduler(TenantPolicy("a"), TenantPolicy("z"))
    for _ in range(20):
        s.enqueue(req("a"), 0.0)
    s.dispatch(pool(5), 0.0)
    s.enqueue(req("z", rid="back"), 1.0)  # lifted to a's counter: a tie
    assert ids(s.dispatch(pool(1), 1.0)) == ["back"]


def test_time_spent_held_by_a_rate_limit_is_not_banked() -> None:
    s = scheduler(TenantPolicy("a", requests_per_min=1), TenantPolicy("b"))
    for _ in range(100):
        s.enqueue(req("a"), 0.0)
        s.enqueue(req("b"), 0.0)
    for step in range(30):
        s.dispatch(pool(1), float(step))  # a gets one request, then waits a minute
    s.update_tenant(TenantPolicy("a"))  # limit lifted
    got = Counter(d.request.tenant for d in s.dispatch(pool(10), 30.0).dispatched)
    assert got == {"a": 5, "b": 5}


def test_fifo_within_a_tenant_and_edf_when_deadlines_are_set() -> None:
    s = scheduler(TenantPolicy("a"))
    s.enqueue(req("a", rid="1"), 0.0)
    s.enqueue(req("a", rid="2"), 0.0)
    s.enqueue(req("a", rid="3", deadline=50.0), 0.0)
    s.enqueue(req("a", rid="4", deadline=20.0), 0.0)
    s.enqueue(req("a", rid="5"), 0.0)
    assert ids(s.dispatch(pool(5), 1.0)) == ["4", "3", "1", "2", "5"]


def test_a_request_goes_only_to_pools_serving_its_model() -> None:
    s = scheduler(TenantPolicy("a"), models=("m", "n"))
    s.enqueue(req("a", rid="for-n", model="n"), 0.0)
    s.enqueue(req("a", rid="for-m", model="m"), 0.0)
    assert ids(s.dispatch(pool(5, ("m", "other")), 0.0)) == ["for-m"]
    assert ids(s.dispatch(pool(5, ("x",)), 0.0)) == []
    assert ids(s.dispatch(pool(5, ("m", "n")), 0.0)) == ["for-n"]


def test_token_budget_stops_at_the_first_request_that_does_not_fit() -> None:
    s = scheduler(TenantPolicy("a"))
    for rid, inp in (("1", 100), ("2", 500), ("3", 10)):
        s.enqueue(req("a", rid=rid, inp=inp, est=0), 0.0)
    assert ids(s.dispatch(pool(10, tokens=300), 0.0)) == ["1"]  # "3" must not overtake "2"
    assert ids(s.dispatch(pool(10, tokens=600), 0.0)) == ["2", "3"]


# -- priority classes -----------------------------------------------------------------------


def test_saturated_classes_get_their_configured_shares() -> None:
    config = SchedulerConfig(interactive_share=5, standard_share=3, batch_share=2, aging_rate=0.0)
    s = scheduler(TenantPolicy("a"), config=config)
    for prio in (I, S, B):
        for _ in range(400):
            s.enqueue(req("a", priority=prio, est=10), 0.0)
    got = Counter(d.request.priority for d in s.dispatch(pool(500), 0.0).dispatched)
    assert got == {I: 250, S: 150, B: 100}


def test_interactive_work_arriving_goes_ahead_of_a_batch_backlog() -> None:
    s = scheduler(TenantPolicy("a"), TenantPolicy("b"))
    for _ in range(100):
        s.enqueue(req("a", priority=B), 0.0)
    s.dispatch(pool(20), 0.0)
    s.enqueue(req("b", rid="hurry", priority=I), 1.0)
    assert ids(s.dispatch(pool(1), 1.0)) == ["hurry"]


def test_a_class_returning_from_idle_does_not_bank_its_share() -> None:
    config = SchedulerConfig(standard_share=0.3, batch_share=0.1, aging_rate=0.0)
    s = scheduler(TenantPolicy("a"), config=config)
    for _ in range(200):
        s.enqueue(req("a", priority=B), 0.0)
    s.dispatch(pool(50), 0.0)  # batch alone: its counter runs ahead
    for _ in range(100):
        s.enqueue(req("a", priority=S), 1.0)
    got = Counter(d.request.priority for d in s.dispatch(pool(40), 1.0).dispatched)
    assert got == {S: 30, B: 10}  # shares from here on, not standard alone until caught up


def test_aging_lets_a_waiting_batch_request_overtake_sooner() -> None:
    def step_of_second_batch_dispatch(aging_rate: float) -> int:
        config = SchedulerConfig(
            interactive_share=1.0, batch_share=0.01, aging_rate=aging_rate, max_aging_credit=1e9
        )
        s = scheduler(TenantPolicy("a"), config=config)
        s.enqueue(req("a", rid="first", priority=B, at=0.0), 0.0)
        s.enqueue(req("a", rid="second", priority=B, at=0.0), 0.0)
        for step in range(1, 1000):
            now = float(step)
            s.enqueue(req("a", priority=I, at=now), now)  # constant interactive load
            if ids(s.dispatch(pool(1), now)) == ["second"]:
                return step
        raise AssertionError("batch starved")

    # A batch dispatch costs 100x an interactive one in class counter (share 0.01 vs 1), so
    # without aging "second" waits ~100 interactive dispatches; aging credits its wait.
    without, with_aging = step_of_second_batch_dispatch(0.0), step_of_second_batch_dispatch(200.0)
    assert 90 <= without <= 110
    assert with_aging < without / 3


# -- budgets ------------------------------------------------------------------------------


def test_budget_too_small_for_the_request_is_refused_at_enqueue() -> None:
    s = scheduler(TenantPolicy("a", budget=Decimal("0.05")))
    with pytest.raises(BudgetExceeded) as info:
        s.enqueue(req("a", inp=10, out=30), 0.0)  # reserves 0.010 + 0.060
    assert info.value.needed == Decimal("0.070")
    assert s.backlog() == 0


def test_budget_holds_while_reservations_are_in_flight_then_rejects_when_spent() -> None:
    # Each request reserves 0.01 + 0.02 = 0.03; the budget fits three.
    s = scheduler(TenantPolicy("a", budget=Decimal("0.09")), TenantPolicy("b"))
    for n in range(5):
        s.enqueue(req("a", rid=f"a{n}"), 0.0)
    s.enqueue(req("b", rid="b0"), 0.0)
    first = s.dispatch(pool(10), 0.0)
    assert sorted(ids(first)) == ["a0", "a1", "a2", "b0"]  # a3, a4 held, not lost
    assert first.rejected == []
    assert all(
        d.reservation == Decimal("0.030") for d in first.dispatched if d.request.tenant == "a"
    )
    view = s.budget("a", 0.0)
    assert view is not None and view.reserved == Decimal("0.090")
    # a0 turns out cheap: 10 input and 0 output tokens cost 0.010, not 0.030.
    done = s.complete("a0", 10, 0, 1.0)
    assert done is not None and done.cost == Decimal("0.010")
    # spent 0.010 + reserved 0.060 + 0.030 > 0.09: a3 still waits.
    assert s.dispatch(pool(10), 1.0) == ([], [])
    s.complete("a1", 10, 0, 1.0)
    assert ids(s.dispatch(pool(10), 1.0)) == ["a3"]  # 0.020 + 0.030 + 0.030 fits
    s.complete("a2", 10, 10, 2.0)
    s.complete("a3", 10, 10, 2.0)
    view = s.budget("a", 2.0)
    assert view is not None and (view.spent, view.reserved) == (Decimal("0.080"), 0)
    third = s.dispatch(pool(10), 2.0)  # 0.080 + 0.030 can never fit: rejected
    assert third.dispatched == []
    assert [(r.request.request_id, r.reason) for r in third.rejected] == [
        ("a4", RejectReason.BUDGET_EXCEEDED)
    ]
    assert s.backlog() == 0


def test_budget_period_rolls_over() -> None:
    s = scheduler(TenantPolicy("a", budget=Decimal("0.03"), budget_period_s=60.0))
    s.enqueue(req("a", rid="1"), 0.0)
    s.complete(ids(s.dispatch(pool(1), 0.0))[0], 10, 10, 1.0)
    with pytest.raises(BudgetExceeded):
        s.enqueue(req("a", rid="2"), 30.0)
    s.enqueue(req("a", rid="2"), 60.0)  # a new period
    assert ids(s.dispatch(pool(1), 61.0)) == ["2"]


def _utc(*ymd_hms: int) -> float:
    return datetime(*ymd_hms, tzinfo=UTC).timestamp()


def test_monthly_budget_follows_the_calendar_month_of_invoices() -> None:
    # 2026-03-08 00:00 UTC is where a 30-day window aligned to the epoch would restart.
    window_edge = _utc(2026, 3, 8)
    assert window_edge % (30 * 86_400) == 0
    s = scheduler(TenantPolicy("a", budget=Decimal("0.03"), budget_calendar_month=True))
    s.enqueue(req("a", rid="1"), window_edge - 1)
    s.complete(ids(s.dispatch(pool(1), window_edge - 1))[0], 10, 10, window_edge - 1)
    with pytest.raises(BudgetExceeded):  # still March: spent
        s.enqueue(req("a", rid="2"), window_edge + 1)
    with pytest.raises(BudgetExceeded):
        s.enqueue(req("a", rid="2"), _utc(2026, 3, 31, 23, 59, 59))
    s.enqueue(req("a", rid="2"), _utc(2026, 4, 1))  # April: a new period
    assert ids(s.dispatch(pool(1), _utc(2026, 4, 1, 0, 0, 1))) == ["2"]


@given(st.floats(min_value=0, max_value=_utc(2200, 1, 1), allow_nan=False))
def test_month_index_is_the_invoice_month(now: float) -> None:
    at = datetime.fromtimestamp(now, UTC)
    period = Period.month(at.year, at.month)  # the ledger's invoice period
    assert period.start.timestamp() <= now < period.end.timestamp()
    assert month_index(now) == month_index(period.start.timestamp())
    assert month_index(period.end.timestamp()) == month_index(now) + 1


def test_budget_period_and_calendar_month_exclude_each_other() -> None:
    with pytest.raises(InvalidPolicy, match="exclude each other"):
        TenantPolicy("a", budget=Decimal(1), budget_period_s=60.0, budget_calendar_month=True)


# -- rate limits --------------------------------------------------------------------------


def test_requests_per_minute_are_enforced_without_blocking_others() -> None:
    s = scheduler(TenantPolicy("a", requests_per_min=2), TenantPolicy("b"))
    for _ in range(10):
        s.enqueue(req("a"), 0.0)
        s.enqueue(req("b"), 0.0)
    got = Counter(d.request.tenant for d in s.dispatch(pool(8), 0.0).dispatched)
    assert got == {"a": 2, "b": 6}
    assert Counter(d.request.tenant for d in s.dispatch(pool(8), 15.0).dispatched)["a"] == 0
    assert Counter(d.request.tenant for d in s.dispatch(pool(8), 30.0).dispatched)["a"] == 1


def test_tokens_per_minute_are_enforced_and_corrected_at_completion() -> None:
    s = scheduler(TenantPolicy("a", tokens_per_min=100))
    for n in range(3):
        s.enqueue(req("a", rid=str(n), inp=20, out=100, est=20), 0.0)
    assert ids(s.dispatch(pool(5), 0.0)) == ["0", "1"]  # 40 tokens each
    s.complete("0", 20, 0, 0.0)  # used 20, not 40: 20 come back
    assert ids(s.dispatch(pool(5), 0.0)) == ["2"]


# -- cancel, expire, requeue, complete ----------------------------------------------------


def test_cancel_removes_a_queued_request_once() -> None:
    s = scheduler(TenantPolicy("a"))
    for rid in "123":
        s.enqueue(req("a", rid=rid), 0.0)
    cancelled = s.cancel("2", 0.0)
    assert cancelled is not None and cancelled.request_id == "2"
    assert s.cancel("2", 0.0) is None
    assert s.cancel("nope", 0.0) is None
    assert ids(s.dispatch(pool(5), 0.0)) == ["1", "3"]
    assert s.cancel("1", 0.0) is None  # in flight: not the policy's to cancel


def test_expire_returns_requests_past_their_deadline() -> None:
    s = scheduler(TenantPolicy("a"))
    s.enqueue(req("a", rid="soon", deadline=5.0), 0.0)
    s.enqueue(req("a", rid="later", deadline=50.0), 0.0)
    s.enqueue(req("a", rid="never"), 0.0)
    assert s.expire(4.0) == []
    gone = s.expire(5.0)
    assert [(r.request.request_id, r.reason) for r in gone] == [
        ("soon", RejectReason.DEADLINE_EXPIRED)
    ]
    result = s.dispatch(pool(5), 60.0)  # dispatch never sends expired work either
    assert ids(result) == ["never"]
    assert [r.request.request_id for r in result.rejected] == ["later"]


def test_requeue_puts_a_request_back_at_the_head_and_refunds_it() -> None:
    s = scheduler(TenantPolicy("a", budget=Decimal(10)))
    for rid in "1234":
        s.enqueue(req("a", rid=rid), 0.0)
    assert ids(s.dispatch(pool(2), 0.0)) == ["1", "2"]
    counter = s.counter("a", S)
    assert s.requeue("2", 1.0) is not None
    assert s.requeue("2", 1.0) is None
    assert s.counter("a", S) < counter
    view = s.budget("a", 1.0)
    assert view is not None and view.reserved == Decimal("0.030")
    assert ids(s.dispatch(pool(5), 1.0)) == ["2", "3", "4"]


def test_complete_is_idempotent_and_checks_counts() -> None:
    s = scheduler(TenantPolicy("a"))
    s.enqueue(req("a", rid="1"), 0.0)
    s.dispatch(pool(1), 0.0)
    with pytest.raises(InvalidRequest):
        s.complete("1", -1, 3, 1.0)
    assert s.in_flight() == 1
    assert s.complete("1", 10, 3, 1.0) is not None
    assert s.complete("1", 10, 3, 1.0) is None
    assert s.in_flight() == 0


# -- restart ------------------------------------------------------------------------------


def test_snapshot_round_trips_through_json_and_settles_in_flight_work() -> None:
    policies = [TenantPolicy("a", budget=Decimal(1), requests_per_min=100), TenantPolicy("b")]
    s = scheduler(*policies)
    for n in range(6):
        s.enqueue(req("a", rid=f"a{n}"), 0.0)
        s.enqueue(req("b", rid=f"b{n}", priority=B), 0.0)
    s.dispatch(pool(5), 1.0)
    snap = SchedulerSnapshot.from_dict(json.loads(json.dumps(s.snapshot().to_dict())))
    fresh = scheduler(*policies)
    assert fresh.restore(snap, s.queued_requests(), 2.0) == []
    assert fresh.in_flight() == s.in_flight() and fresh.backlog() == s.backlog()
    for t in ("a", "b"):
        for p in (S, B):
            assert fresh.counter(t, p) == s.counter(t, p)
    assert fresh.budget("a", 2.0) == s.budget("a", 2.0)
    assert ids(fresh.dispatch(pool(4), 3.0)) == ids(s.dispatch(pool(4), 3.0))
    done = fresh.complete("a0", 10, 10, 4.0)
    assert done is not None and done.cost == price("a", "m", 10, 10, S)


def test_spending_is_set_from_the_ledger_not_restored_from_the_snapshot() -> None:
    policy = TenantPolicy("a", budget=Decimal("0.06"), budget_calendar_month=True)
    s = scheduler(policy)
    march = _utc(2026, 3, 20)
    s.enqueue(req("a", rid="1"), march)
    s.enqueue(req("a", rid="2"), march)
    first, second = ids(s.dispatch(pool(2), march))
    s.complete(first, 10, 10, march)
    spent = price("a", "m", 10, 10, S)
    fresh = scheduler(policy)
    fresh.restore(s.snapshot(), [], march + 3600)
    view = fresh.budget("a", march + 3600)
    # The snapshot brings the reservation in flight, not the spending: the ledger does.
    assert view is not None and (view.spent, view.reserved) == (0, price("a", "m", 10, 10, S))
    fresh.set_spending({"a": spent, "nobody": Decimal(5)}, march + 3600)
    view = fresh.budget("a", march + 3600)
    assert view is not None and view.spent == spent
    # Forgetting a request released its reservation and spent nothing; its completion
    # then finds nothing to settle.
    assert fresh.forget(second) is not None and fresh.forget(second) is None
    assert fresh.complete(second, 10, 10, march + 3600) is None
    view = fresh.budget("a", march + 3600)
    assert view is not None and (view.spent, view.reserved) == (spent, 0)
    assert fresh.in_flight() == 0
    view = fresh.budget("a", _utc(2026, 4, 2))  # a new month starts from zero
    assert view is not None and view.spent == 0


def test_restore_keeps_counters_exactly_and_decides_the_same() -> None:
    policies = [TenantPolicy("a"), TenantPolicy("b")]
    s = scheduler(*policies)
    for n in range(5):
        s.enqueue(req("a", rid=f"a{n}"), 0.0)
    for n in range(5):
        s.enqueue(req("b", rid=f"b{n}"), 0.0)
    assert ids(s.dispatch(pool(3), 0.0)) == ["a0", "b0", "a1"]  # a ahead of b by one
    fresh = scheduler(*policies)
    fresh.restore(s.snapshot(), s.queued_requests(), 1.0)  # a's requests come back first
    assert [fresh.counter(t, S) for t in "ab"] == [s.counter(t, S) for t in "ab"]
    assert ids(fresh.dispatch(pool(7), 1.0)) == ids(s.dispatch(pool(7), 1.0))


def test_restore_reports_requests_it_cannot_admit() -> None:
    s = scheduler(TenantPolicy("a"))
    fresh = scheduler(TenantPolicy("a"))
    bad = [req("ghost", rid="x"), req("a", rid="y"), req("a", rid="y")]
    rejected = fresh.restore(s.snapshot(), bad, 0.0)
    assert [(r.request.request_id, r.reason) for r in rejected] == [
        ("x", RejectReason.INVALID),
        ("y", RejectReason.INVALID),
    ]
    assert fresh.backlog() == 1
    with pytest.raises(InvalidPolicy):
        fresh.restore(s.snapshot(), [], 0.0)


def test_public_names_are_exported() -> None:
    import tokenmill.scheduler as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    public = {"Scheduler", "SchedulerConfig", "TenantPolicy", "QueuedRequest", "Pool", "Priority"}
    assert public <= set(package.__all__)

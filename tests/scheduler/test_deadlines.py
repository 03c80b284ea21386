"""The deadline planner: capacity measured only while saturated, EDF and fair-share
forecasts, urgency before risk."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.scheduler.deadlines import DeadlinePlanner


def measured(planner: DeadlinePlanner, pool: str, units_per_s: float, batch_share: float) -> None:
    for _ in range(10):
        planner.finished(pool, units_per_s * batch_share, batch=True)
        planner.finished(pool, units_per_s * (1 - batch_share), batch=False)
        planner.tick(1.0, [pool])


def test_no_forecast_before_throughput_is_measured() -> None:
    p = DeadlinePlanner()
    p.queued("b1", "a", "pool", 100.0, 10)
    (f,) = p.forecasts(0.0, lambda t: 1.0)
    assert (f.eta_best, f.eta_fair, f.urgent, f.at_risk) == (None, None, False, False)


def test_unsaturated_intervals_do_not_measure_capacity() -> None:
    p = DeadlinePlanner()
    p.finished("pool", 5.0, batch=True)
    p.tick(1.0, [])  # a trickle on an idle pool says nothing of its capacity
    assert p.batch_rate("pool") is None
    measured(p, "pool", 100.0, 1.0)
    assert p.batch_rate("pool") == 100.0


def test_batch_rate_is_the_batch_fraction_with_a_floor() -> None:
    p = DeadlinePlanner(min_batch_fraction=0.1)
    measured(p, "pool", 100.0, 0.5)
    assert abs(p.batch_rate("pool") - 50.0) < 1e-9  # type: ignore[operator]
    q = DeadlinePlanner(min_batch_fraction=0.1)
    measured(q, "pool", 100.0, 0.0)
    assert abs(q.batch_rate("pool") - 10.0) < 1e-9  # type: ignore[operator]


def test_a_short_window_behind_a_long_batch_is_urgent_not_at_risk() -> None:
    p = DeadlinePlanner(min_margin_s=0.0)
    measured(p, "pool", 100.0, 1.0)
    for _ in range(100):
        p.queued("long", "a", "pool", 1000.0, 10)  # 1,000 units due at t=1000
    for _ in range(20):
        p.queued("short", "b", "pool", 4.2, 10)  # 200 units due at t=4.2
    f = {x.batch_id: x for x in p.forecasts(0.0, lambda t: 1.0)}
    assert f["short"].eta_best == 2.0  # EDF: it goes first, 200 / 100
    assert f["short"].eta_fair == 4.0  # half the pool: 200 / 50
    assert f["short"].urgent and not f["short"].at_risk  # 4 > 4.2 - 0.1 * 4.2
    assert f["long"].eta_best == 12.0 and not f["long"].urgent
    for _ in range(19):  # its forecast recovers as it goes ahead; it stays urgent
        p.left_queue("short", 10)
    f = {x.batch_id: x for x in p.forecasts(0.0, lambda t: 1.0)}
    assert f["short"].eta_fair == 0.2 and f["short"].urgent
    p.left_queue("short", 10)
    p.queued("short", "b", "pool", 100.0, 10)  # done, then an unrelated batch of that id
    assert not [x for x in p.forecasts(0.0, lambda t: 1.0) if x.batch_id == "short"][0].urgent


def test_a_batch_no_order_can_finish_is_at_risk() -> None:
    p = DeadlinePlanner()
    measured(p, "pool", 10.0, 1.0)
    for _ in range(50):
        p.queued("big", "a", "pool", 20.0, 10)  # 500 units at 10/s: 50 s > 20 s
    (f,) = p.forecasts(0.0, lambda t: 1.0)
    assert f.at_risk and f.urgent and f.eta_best == 50.0
    for _ in range(40):
        p.left_queue("big", 10)
    (f,) = p.forecasts(0.0, lambda t: 1.0)
    assert f.queued == 10 and not f.at_risk  # 100 units: 10 s
    for _ in range(10):
        p.left_queue("big", 10)
    assert p.forecasts(0.0, lambda t: 1.0) == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 50), st.floats(1, 500)),
        min_size=1,
        max_size=8,
    )
)
def test_edf_forecasts_follow_deadlines_and_end_with_all_the_work(batches: list) -> None:  # type: ignore[type-arg]
    p = DeadlinePlanner()
    measured(p, "pool", 100.0, 1.0)
    for i, (tenant, lines, deadline) in enumerate(batches):
        for _ in range(lines):
            p.queued(f"b{i}", tenant, "pool", deadline, 10)
    got = sorted(
        p.forecasts(0.0, lambda t: {"a": 1.0, "b": 2.0, "c": 4.0}[t]),
        key=lambda f: (f.deadline, f.batch_id),
    )
    etas = [f.eta_best for f in got if not f.at_risk]
    assert etas == sorted(etas)  # type: ignore[type-var]
    feasible = sum(f.queued for f in got if not f.at_risk)
    if got and not got[-1].at_risk:  # the last feasible one finishes with all feasible work
        assert abs(etas[-1] - feasible * 10 / 100.0) < 1e-6  # type: ignore[operator]
    for f in got:  # alone in its tenant's share, a batch finishes no earlier than under EDF alone
        assert f.eta_fair is not None and f.eta_fair >= f.queued * 10 / 100.0 - 1e-9
        assert f.at_risk == (f.eta_best > f.deadline)  # type: ignore[operator]


def test_a_batch_at_risk_does_not_make_the_ones_due_after_it_late() -> None:
    p = DeadlinePlanner()
    measured(p, "pool", 100.0, 1.0)
    for _ in range(100):
        p.queued("doomed", "a", "pool", 2.0, 10)  # 1,000 units due at t=2: at risk
    for _ in range(20):
        p.queued("fine", "b", "pool", 5.0, 10)  # 200 units due at t=5
    f = {x.batch_id: x for x in p.forecasts(0.0, lambda t: 1.0)}
    assert f["doomed"].at_risk
    assert not f["fine"].at_risk and f["fine"].eta_best == 2.0

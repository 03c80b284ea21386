"""The pure fair-share figures (tokenmill.ledger.fairness) on hand-computed cases, and
Jain's index and the shares as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenmill.ledger.fairness import Charge, Served, fairness, jain_index, largest_gap
from tokenmill.scheduler.types import SchedulerConfig

CHARGE = Charge(w_in=1.0, w_out=2.0)


def served(tenant: str, *, submitted: float, queue: float | None = 0.0, e2e: float = 1.0,
           inp: int = 10, out: int = 5, prio: str = "standard", met: bool = True,
           ttft: float | None = None) -> Served:  # fmt: skip
    return Served(tenant, prio, "sim", submitted + e2e, e2e, queue, ttft, None, inp, out, met)


def test_the_charge_is_the_schedulers() -> None:
    config = SchedulerConfig()
    assert Charge(config.w_in, config.w_out).w_req == config.w_req
    assert CHARGE.of(10, 5) == 1 + 10 + 2 * 5


def test_jain_of_equal_shares_is_one_and_of_one_winner_is_one_over_n() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([3.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([]) == 1.0


def test_shares_follow_weights_and_a_starved_tenant_lowers_jain() -> None:
    # a (weight 2) and b (weight 1) each got 21 weighted tokens; c (weight 1) none of note
    rows = [served("a", submitted=0), served("b", submitted=0),
            served("c", submitted=0, inp=0, out=0)]  # fmt: skip
    fig = fairness(rows, {"a": 2.0, "b": 1.0, "c": 1.0}, CHARGE, window_s=10.0)
    by = {t.tenant: t for t in fig.tenants}
    assert by["a"].service == by["b"].service == 21.0 and by["c"].service == 1.0
    assert by["a"].received_share == pytest.approx(21 / 43)
    assert by["a"].entitled_share == pytest.approx(0.5)
    assert by["b"].entitled_share == pytest.approx(0.25)
    xs = [21 / 43 / 0.5, 21 / 43 / 0.25, 1 / 43 / 0.25]
    assert fig.jain["standard"] == pytest.approx(sum(xs) ** 2 / (3 * sum(x * x for x in xs)))
    # exactly the entitled shares: Jain 1
    fair = fairness([served("a", submitted=0, inp=31), served("b", submitted=0)],
                    {"a": 2.0, "b": 1.0}, CHARGE, window_s=10.0)  # fmt: skip
    assert fair.jain["standard"] == pytest.approx(1.0)


def test_classes_are_separate_and_unknown_tenants_left_out() -> None:
    rows = [served("a", submitted=0, prio="batch"), served("b", submitted=0),
            served("ghost", submitted=0)]  # fmt: skip
    fig = fairness(rows, {"a": 1.0, "b": 1.0}, CHARGE, window_s=10.0)
    assert [(t.tenant, t.priority, t.entitled_share) for t in fig.tenants] == [
        ("a", "batch", 1.0), ("b", "standard", 1.0)]  # fmt: skip
    assert fig.jain == {"batch": 1.0, "standard": 1.0}


def test_gap_is_the_longest_wait_without_a_dispatch() -> None:
    # waiting [0, 5) and [2, 3): the dispatch at 3 cuts [0, 5) into 3 and 2
    assert largest_gap([(0, 5), (2, 3)]) == 3
    # two busy periods: [0, 1) then [10, 14): no credit for the idle time between
    assert largest_gap([(0, 1), (10, 14)]) == 4
    # back to back, touching: one period [0, 4), dispatches at 2 and 4
    assert largest_gap([(0, 2), (2, 4)]) == 2
    assert largest_gap([(1, 1)]) == 0 and largest_gap([]) == 0
    assert largest_gap([(5, 4)]) == 0  # a dispatch before the submission (clock step)


def test_queue_wait_attainment_goodput_and_nearest_dispatch() -> None:
    rows = [served("a", submitted=0, queue=q, met=q < 3) for q in (1.0, 2.0, 3.0, 4.0)]
    rows.append(served("a", submitted=0, queue=None, ttft=6.0, e2e=7.0, met=False))
    [t] = fairness(rows, {"a": 1.0}, CHARGE, window_s=2.0).tenants
    assert (t.requests, t.met, t.attainment, t.goodput_rps) == (5, 2, 0.4, 1.0)
    assert t.queue_p50_s == pytest.approx(2.5)
    assert t.queue_p99_s == pytest.approx(3 + 0.97)
    assert t.largest_gap_s == 2.0  # dispatch at 4 → first token at 6 (no dispatch time)
    assert t.e2e_p99_s == pytest.approx(1 + 6 * 0.96)


weights = st.floats(0.1, 10.0)
tokens = st.integers(0, 10_000)


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from(["interactive", "batch"]),
                          tokens, tokens), min_size=1, max_size=30),
       st.dictionaries(st.sampled_from("abcdef"), weights, min_size=6))  # fmt: skip
def test_jain_is_between_one_over_n_and_one_and_shares_sum_to_one(
    reqs: list[tuple[str, str, int, int]], w: dict[str, float]
) -> None:
    rows = [served(t, submitted=0, prio=p, inp=i, out=o) for t, p, i, o in reqs]
    fig = fairness(rows, w, CHARGE, window_s=1.0)
    for prio, jain in fig.jain.items():
        figs = [t for t in fig.tenants if t.priority == prio]
        assert 1 / len(figs) - 1e-9 <= jain <= 1 + 1e-9
        assert sum(t.received_share for t in figs) == pytest.approx(1.0)
        assert sum(t.entitled_share for t in figs) == pytest.approx(1.0)


def brute_gap(waits: list[tuple[float, float]]) -> float:
    """The definition read literally: the longest [a, b) covered by waiting intervals,
    with no dispatch inside, a a submission or dispatch, b a dispatch."""
    spans = [(s, max(s, d)) for s, d in waits]
    dispatches = [d for _, d in spans]
    best = 0.0
    for a in [s for s, _ in spans] + dispatches:
        for b in dispatches:
            if b <= a or any(a < d < b for d in dispatches):
                continue
            covered = a  # walk [a, b) through the intervals that start by then
            for s, d in sorted(spans):
                if s <= covered < d:
                    covered = d
            if covered >= b:
                best = max(best, b - a)
    return best


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=12))
def test_the_gap_matches_its_definition(waits: list[tuple[int, int]]) -> None:
    assert largest_gap(waits) == brute_gap(waits)

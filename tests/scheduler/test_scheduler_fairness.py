"""Property tests of the fairness and starvation bounds stated in docs/scheduler.md.

Random workloads run against one pool serving every model, with in-flight work capped at
the pool's slots. Service is measured by the test itself from the dispatches and
completions (charge at dispatch from the estimate, corrected at completion), never read
from the scheduler's counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.scheduler import (
    PRIORITIES,
    Pool,
    Priority,
    QueuedRequest,
    Scheduler,
    SchedulerConfig,
    TenantPolicy,
)

MODELS = ("m1", "m2")
WEIGHTS = (0.5, 1.0, 2.0, 3.0)


@dataclass
class Spec:
    """One request of a workload: who, which class, and its sizes."""

    tenant: int
    priority: Priority
    model: str
    inp: int
    max_out: int
    est: int
    actual: int


@dataclass
class Run:
    """What a workload did, seen from outside the scheduler."""

    config: SchedulerConfig
    weights: list[float]
    slots: int
    specs: dict[str, Spec] = field(default_factory=dict)
    #: Per operation: (event, payload); events are "dispatch", "enqueue", "complete".
    events: list[tuple[str, str]] = field(default_factory=list)

    def charge(self, spec: Spec, output_tokens: int) -> float:
        c = self.config
        tokens = c.w_req + c.w_in * spec.inp + c.w_out * output_tokens
        return tokens / self.weights[spec.tenant]


request_spec = st.tuples(
    st.integers(0, 300),  # input tokens
    st.integers(0, 300),  # max output tokens
    st.floats(0, 1),  # estimate, as a fraction of max output
    st.floats(0, 1),  # actual output, as a fraction of max output
    st.sampled_from(MODELS),
)


@st.composite
def workloads(draw: st.DrawFn, *, exact: bool, classes: bool, urgency: bool = False) -> tuple:  # type: ignore[type-arg]
    n = draw(st.integers(2, 5))
    weights = draw(st.lists(st.sampled_from(WEIGHTS), min_size=n, max_size=n))
    slots = draw(st.integers(1, 6))
    prios = st.sampled_from(PRIORITIES) if classes else st.just(Priority.STANDARD)
    arrive = st.tuples(
        st.just("arrive"), st.integers(0, n - 1), prios, st.integers(1, 8), request_spec
    )
    ops = st.one_of(
        arrive,
        st.tuples(st.just("dispatch")),
        st.tuples(st.just("complete"), st.integers(0, 100)),
        st.tuples(st.just("tick"), st.floats(0, 20)),
        *(
            [st.tuples(st.just("urgent"), st.integers(0, n - 1), prios, st.booleans())]
            if urgency
            else []
        ),
    )
    initial = draw(st.lists(arrive, min_size=3 if classes else 1, max_size=8))
    if classes:  # saturate every class from the start
        initial += [("arrive", 0, p, 20, (100, 100, 0.5, 0.5, "m1")) for p in PRIORITIES]
    return weights, slots, initial, draw(st.lists(ops, min_size=10, max_size=150)), exact


def simulate(workload: tuple, config: SchedulerConfig) -> Run:  # type: ignore[type-arg]
    weights, slots, initial, ops, exact = workload
    sched = Scheduler(
        config,
        tenants=[TenantPolicy(f"t{i}", weight=w) for i, w in enumerate(weights)],
        models=MODELS,
    )
    run = Run(config, weights, slots)
    ids = count()
    now = 0.0
    in_flight: list[str] = []
    for op in [*initial, ("dispatch",), *ops]:
        if op[0] == "arrive":
            _, tenant, prio, burst, (inp, max_out, est_f, act_f, model) = op
            est = int(max_out * est_f)
            actual = est if exact else int(max_out * act_f)
            for _ in range(burst):
                rid = f"r{next(ids)}"
                run.specs[rid] = Spec(tenant, prio, model, inp, max_out, est, actual)
                sched.enqueue(
                    QueuedRequest(rid, f"t{tenant}", model, prio, inp, max_out, now, est), now
                )
                run.events.append(("enqueue", rid))
        elif op[0] == "dispatch":
            free = slots - len(in_flight)
            result = sched.dispatch(Pool("p", frozenset(MODELS), free), now)
            assert not result.rejected
            for d in result.dispatched:
                rid = d.request.request_id
                in_flight.append(rid)
                run.events.append(("dispatch", rid))
        elif op[0] == "complete" and in_flight:
            rid = in_flight.pop(op[1] % len(in_flight))
            spec = run.specs[rid]
            assert sched.complete(rid, spec.inp, spec.actual, now) is not None
            run.events.append(("complete", rid))
        elif op[0] == "tick":
            now += op[1]
        elif op[0] == "urgent":
            sched.set_urgent(f"t{op[1]}", op[2], op[3])
    return run


def check_service_gap(run: Run, bound: float) -> float:
    """Max over pairs of tenants of one class, and over intervals in which both stay
    backlogged, of the change in their weighted service difference; asserts <= bound."""
    queued: dict[tuple[int, Priority], int] = {}
    service: dict[tuple[int, Priority], float] = {}
    spans: dict[tuple[tuple[int, Priority], tuple[int, Priority]], tuple[float, float]] = {}
    worst = 0.0
    for event, rid in run.events:
        spec = run.specs[rid]
        key = (spec.tenant, spec.priority)
        if event == "enqueue":
            queued[key] = queued.get(key, 0) + 1
        elif event == "dispatch":
            queued[key] -= 1
            service[key] = service.get(key, 0.0) + run.charge(spec, spec.est)
        else:
            service[key] += run.charge(spec, spec.actual) - run.charge(spec, spec.est)
        backlogged = sorted(k for k, n in queued.items() if n > 0)
        for pair in list(spans):
            if pair[0] not in backlogged or pair[1] not in backlogged:
                del spans[pair]
        for i, f in enumerate(backlogged):
            for g in backlogged[i + 1 :]:
                if f[1] is not g[1]:
                    continue
                diff = service.get(f, 0.0) - service.get(g, 0.0)
                lo, hi = spans.get((f, g), (diff, diff))
                lo, hi = min(lo, diff), max(hi, diff)
                spans[(f, g)] = (lo, hi)
                worst = max(worst, hi - lo)
                assert hi - lo <= bound + 1e-6, (f, g, hi - lo, bound)
    return worst


def charge_extremes(run: Run) -> tuple[float, float]:
    """U (largest charge at dispatch) and A (largest final charge) over the workload."""
    u = max(run.charge(s, s.est) for s in run.specs.values())
    a = max(run.charge(s, s.actual) for s in run.specs.values())
    return u, a


CONFIG = SchedulerConfig(w_in=1.0, w_out=2.0, w_req=1.0)


@settings(max_examples=150, deadline=None)
@given(workloads(exact=True, classes=True))
def test_service_gap_within_2u_when_estimates_are_exact(workload: tuple) -> None:  # type: ignore[type-arg]
    run = simulate(workload, CONFIG)
    u, _ = charge_extremes(run)
    check_service_gap(run, 2 * u)


@settings(max_examples=150, deadline=None)
@given(workloads(exact=False, classes=True))
def test_service_gap_bounded_with_estimate_errors(workload: tuple) -> None:  # type: ignore[type-arg]
    run = simulate(workload, CONFIG)
    u, a = charge_extremes(run)
    check_service_gap(run, 2 * (u + run.slots * (u + a)))


@settings(max_examples=150, deadline=None)
@given(workloads(exact=True, classes=True, urgency=True), st.sampled_from([0.0, 300.0, 5000.0]))
def test_urgent_tenants_lead_by_at_most_the_urgency_lead(workload: tuple, lead: float) -> None:  # type: ignore[type-arg]
    """Deadline urgency widens the bound between two tenants by the configured lead."""
    config = SchedulerConfig(w_in=1.0, w_out=2.0, w_req=1.0, urgency_lead=lead)
    run = simulate(workload, config)
    u, _ = charge_extremes(run)
    check_service_gap(run, 2 * u + lead)


def test_an_urgent_tenant_goes_first_until_it_leads_by_the_urgency_lead() -> None:
    charge = 1.0 + 10 + 2 * 10  # w_req + w_in * 10 + w_out * 10, weight 1
    sched = Scheduler(
        SchedulerConfig(urgency_lead=5 * charge),
        tenants=[TenantPolicy("a"), TenantPolicy("b")],
        models=["m1"],
    )
    for i in range(20):
        for t in "ab":
            sched.enqueue(QueuedRequest(f"{t}{i}", t, "m1", Priority.BATCH, 10, 10, 0.0, 10), 0.0)
    sched.set_urgent("b", Priority.BATCH, True)
    assert sched.urgent(Priority.BATCH) == {"b"}
    order = [
        d.request.tenant for d in sched.dispatch(Pool("p", frozenset({"m1"}), 14), 0.0).dispatched
    ]
    # b runs ahead until it leads a by 5 charges (6 dispatches), then they alternate
    assert order[:6] == ["b"] * 6, order
    assert order[6:] == ["a", "b"] * 4, order
    sched.set_urgent("b", Priority.BATCH, False)
    assert not sched.urgent(Priority.BATCH)


@given(st.integers(0, 12), st.integers(0, 12), st.integers(0, 12))
def test_classes_below_interactive_never_take_the_headroom(free: int, shared: int, n: int) -> None:
    sched = Scheduler(tenants=[TenantPolicy("a")], models=["m1"])
    for i in range(n):
        for p in PRIORITIES:
            sched.enqueue(QueuedRequest(f"{p.value}{i}", "a", "m1", p, 1, 1, 0.0), 0.0)
    got = sched.dispatch(Pool("p", frozenset({"m1"}), free, shared_slots=shared), 0.0).dispatched
    others = [d for d in got if d.request.priority is not Priority.INTERACTIVE]
    interactive = len(got) - len(others)
    assert len(got) <= free
    assert len(others) <= shared
    # the headroom goes to interactive work when there is some
    assert interactive >= min(n, free - min(free, shared))
    assert len(got) == min(free, n + min(shared, 2 * n))


def test_service_gap_check_catches_an_unfair_order() -> None:
    """The checker itself must fail on a scheduler that ignores the counters."""
    run = Run(CONFIG, [1.0, 1.0], 1)
    spec = Spec(0, Priority.STANDARD, "m1", 10, 10, 10, 10)
    run.specs = {f"a{i}": spec for i in range(50)} | {
        f"b{i}": Spec(1, Priority.STANDARD, "m1", 10, 10, 10, 10) for i in range(50)
    }
    run.events = [("enqueue", rid) for rid in run.specs] + [
        ("dispatch", f"a{i}") for i in range(30)
    ]
    try:
        check_service_gap(run, 2 * 31.0)
    except AssertionError:
        return
    raise AssertionError("an order serving only one tenant passed the fairness check")


# -- starvation --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    workloads(exact=True, classes=True),
    st.floats(0.05, 1.0),
    st.floats(0.05, 1.0),
    st.floats(0.05, 1.0),
    st.sampled_from([0.0, 10.0, 1000.0]),
    st.sampled_from([0.0, 500.0, 20_000.0]),
)
def test_every_request_is_dispatched_within_the_starvation_bound(
    workload: tuple,
    si: float,
    ss: float,
    sb: float,
    rate: float,
    cap: float,  # type: ignore[type-arg]
) -> None:
    config = SchedulerConfig(
        interactive_share=si,
        standard_share=ss,
        batch_share=sb,
        aging_rate=rate,
        max_aging_credit=cap,
    )
    run = simulate(workload, config)
    shares = {p: config.share(p) for p in PRIORITIES}
    tokens = {rid: run.charge(s, s.est) * run.weights[s.tenant] for rid, s in run.specs.items()}
    by_class = {p: [rid for rid, s in run.specs.items() if s.priority is p] for p in PRIORITIES}
    # Class level: G_c = sum over c' != c of floor((U_c + 4K) / L_c') + 1.
    big = {p: max((tokens[r] for r in by_class[p]), default=0.0) / shares[p] for p in PRIORITIES}
    small = {
        p: min((tokens[r] for r in by_class[p]), default=math.inf) / shares[p] for p in PRIORITIES
    }
    gap_class = {
        c: sum(
            math.floor((big[c] + 4 * cap) / small[o]) + 1
            for o in PRIORITIES
            if o is not c and by_class[o]
        )
        for c in PRIORITIES
    }
    # Tenant level: T_(f,c) = sum over other tenants g of class c of floor(U_c / l_g) + 1.
    charge = {rid: run.charge(s, s.est) for rid, s in run.specs.items()}
    u_class = {p: max((charge[r] for r in by_class[p]), default=0.0) for p in PRIORITIES}
    low: dict[tuple[int, Priority], float] = {}
    for rid, s in run.specs.items():
        low[(s.tenant, s.priority)] = min(low.get((s.tenant, s.priority), math.inf), charge[rid])
    gap_tenant = {
        (f, c): sum(
            math.floor(u_class[c] / lg) + 1 for (g, c2), lg in low.items() if c2 is c and g != f
        )
        for (f, c) in low
    }

    queued: dict[object, int] = {}
    since_class: dict[Priority, int | None] = {p: 0 for p in PRIORITIES}  # None: not checked
    since_tenant: dict[tuple[int, Priority], int] = {}
    # rid -> (dispatches so far, own requests ahead, whether its class's gaps are bounded)
    waiting: dict[str, tuple[int, int, bool]] = {}
    dispatches = 0
    for event, rid in run.events:
        s = run.specs[rid]
        key = (s.tenant, s.priority)
        if event == "enqueue":
            if not queued.get(key):
                since_tenant[key] = 0
            ahead = queued.get(key, 0)
            queued[key] = ahead + 1
            if not queued.get(s.priority) and dispatches:
                since_class[s.priority] = None  # a later stretch: its first gap is not bounded
            queued[s.priority] = queued.get(s.priority, 0) + 1
            waiting[rid] = (dispatches, ahead, since_class[s.priority] is not None)
        elif event == "dispatch":
            dispatches += 1
            for c in PRIORITIES:
                if c is s.priority:
                    since_class[c] = 0
                elif queued.get(c) and since_class[c] is not None:
                    since_class[c] += 1  # type: ignore[operator]
                    assert since_class[c] <= gap_class[c], ("class starved", c)
            for k, since in since_tenant.items():
                if k[1] is s.priority and k != key and queued.get(k):
                    since_tenant[k] = since + 1
                    assert since + 1 <= gap_tenant[k], ("tenant starved", k)
            since_tenant[key] = 0
            queued[key] -= 1
            queued[s.priority] -= 1
            if not queued[s.priority]:
                since_class[s.priority] = 0
            start, ahead, bounded = waiting.pop(rid)
            if bounded:
                bound = (ahead + 1) * (gap_tenant[key] + 1) * (gap_class[s.priority] + 1)
                assert dispatches - start <= bound, ("request waited too long", rid)

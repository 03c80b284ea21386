"""Stateful property test: random operations against an independent model of the queues.

After every step: no request lost or duplicated, dispatch FIFO/EDF within a tenant, budgets
never overshot, dispatch work-conserving, and refused input changes nothing. A ``restart``
step rebuilds a scheduler from a JSON snapshot plus the queued requests; from then on it is
driven in lockstep with the original and must decide exactly the same.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from scheduler_helpers import price
from tokenmill.scheduler import (
    PRIORITIES,
    BudgetExceeded,
    DispatchResult,
    DuplicateRequest,
    Pool,
    QueuedRequest,
    RejectReason,
    Scheduler,
    SchedulerConfig,
    SchedulerSnapshot,
    TenantPolicy,
    UnknownModel,
    UnknownTenant,
)

LIMIT = Decimal("0.5")
PERIOD = 100.0
TENANTS = {
    "a": TenantPolicy("a", weight=1.0),
    "b": TenantPolicy("b", weight=2.5),
    "c": TenantPolicy("c", budget=LIMIT, budget_period_s=PERIOD),  # budget-limited
    "d": TenantPolicy("d", weight=0.5, requests_per_min=30, tokens_per_min=3000),  # rate-limited
}
MODELS = ("m1", "m2")
POOLS = {"all": frozenset(MODELS), "m1": frozenset({"m1"}), "m2": frozenset({"m2"})}
CONFIG = SchedulerConfig(aging_rate=50.0, max_aging_credit=5_000.0)


def fresh() -> Scheduler:
    return Scheduler(CONFIG, cost=price, tenants=TENANTS.values(), models=MODELS)


def summary(result: DispatchResult) -> tuple[object, ...]:
    return (
        [(d.request.request_id, d.reservation, d.charge) for d in result.dispatched],
        [(r.request.request_id, r.reason) for r in result.rejected],
    )


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = fresh()
        self.clones: list[Scheduler] = []
        self.now = 0.0
        self.n = 0
        self.reqs: dict[str, QueuedRequest] = {}
        self.status: dict[str, str] = {}
        self.index: dict[str, int] = {}  # enqueue order, for FIFO; requeued go first
        self.heads = 0
        self.reserved: dict[str, Decimal | None] = {}
        self.spent: dict[int, Decimal] = {}  # tenant c's settled cost per budget period

    @property
    def all(self) -> list[Scheduler]:
        return [self.s, *self.clones]

    def ids(self, state: str) -> list[str]:
        return sorted(rid for rid, s in self.status.items() if s == state)

    def key(self, rid: str) -> tuple[float, int]:
        deadline = self.reqs[rid].deadline
        return (math.inf if deadline is None else deadline, self.index[rid])

    def spent_now(self) -> Decimal:
        return self.spent.get(math.floor(self.now / PERIOD), Decimal(0))

    def reserved_c(self) -> Decimal:
        return sum(
            (
                self.reserved[rid] or Decimal(0)
                for rid in self.ids("inflight")
                if self.reqs[rid].tenant == "c"
            ),
            Decimal(0),
        )

    # -- rules ---------------------------------------------------------------------------

    @rule(dt=st.floats(0, 30))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        model=st.sampled_from(MODELS),
        priority=st.sampled_from(PRIORITIES),
        inp=st.integers(0, 200),
        out=st.integers(0, 200),
        est=st.none() | st.floats(0, 1),
        deadline=st.none() | st.floats(0, 60),
    )
    def enqueue(self, tenant, model, priority, inp, out, est, deadline) -> None:  # type: ignore[no-untyped-def]
        rid = f"r{self.n}"
        self.n += 1
        r = QueuedRequest(
            rid,
            tenant,
            model,
            priority,
            inp,
            out,
            self.now,
            None if est is None else int(out * est),
            None if deadline is None else self.now + deadline,
        )
        outcomes: list[tuple[Decimal, Decimal] | None] = []
        for s in self.all:
            try:
                s.enqueue(r, self.now)
                outcomes.append(None)
            except BudgetExceeded as exc:
                outcomes.append((exc.needed, exc.available))
        assert all(o == outcomes[0] for o in outcomes)
        reservation = price(tenant, model, inp, out, priority)
        if outcomes[0] is None:
            if tenant == "c":
                assert reservation <= LIMIT - self.spent_now()
            self.reqs[rid], self.status[rid], self.index[rid] = r, "queued", self.n
        else:
            assert tenant == "c" and reservation > LIMIT - self.spent_now()

    @rule(kind=st.sampled_from(["tenant", "model", "duplicate"]))
    def enqueue_bad(self, kind: str) -> None:
        live = self.ids("queued") + self.ids("inflight")
        if kind == "duplicate" and live:
            bad, error = self.reqs[live[0]], DuplicateRequest
        elif kind == "model":
            bad, error = QueuedRequest("x", "a", "zz", PRIORITIES[0], 1, 1, self.now), UnknownModel
        else:
            bad, error = (
                QueuedRequest("x", "zz", "m1", PRIORITIES[0], 1, 1, self.now),
                UnknownTenant,
            )
        for s in self.all:
            with pytest.raises(error):
                s.enqueue(bad, self.now)

    @rule(
        name=st.sampled_from(sorted(POOLS)),
        slots=st.integers(0, 6),
        tokens=st.none() | st.integers(0, 800),
    )
    def dispatch(self, name: str, slots: int, tokens: int | None) -> None:
        pool = Pool(name, POOLS[name], slots, tokens)
        results = [s.dispatch(pool, self.now) for s in self.all]
        assert all(summary(r) == summary(results[0]) for r in results)
        result = results[0]
        assert len(result.dispatched) <= slots
        if tokens is not None:
            used = sum(
                d.request.input_tokens
                + (
                    d.request.estimated_output_tokens
                    if d.request.estimated_output_tokens is not None
                    else min(CONFIG.default_output_estimate, d.request.max_output_tokens)
                )
                for d in result.dispatched
            )
            assert used <= tokens
        for rej in result.rejected:
            rid = rej.request.request_id
            assert self.status[rid] == "queued"
            if rej.reason is RejectReason.DEADLINE_EXPIRED:
                deadline = self.reqs[rid].deadline
                assert deadline is not None and deadline <= self.now
                self.status[rid] = "expired"
            else:
                assert rej.reason is RejectReason.BUDGET_EXCEEDED
                r = self.reqs[rid]
                need = price(r.tenant, r.model, r.input_tokens, r.max_output_tokens, r.priority)
                assert r.tenant == "c" and self.spent_now() + need > LIMIT
                self.status[rid] = "rejected"
        sent: dict[tuple[str, str], list[str]] = {}
        for d in result.dispatched:
            r = d.request
            assert self.status[r.request_id] == "queued", "dispatched twice or never queued"
            assert r.model in pool.models
            self.status[r.request_id] = "inflight"
            self.reserved[r.request_id] = d.reservation
            if r.tenant == "c":
                assert d.reservation == price(
                    r.tenant, r.model, r.input_tokens, r.max_output_tokens, r.priority
                )
            else:
                assert d.reservation is None
            sent.setdefault((r.tenant, r.priority.value), []).append(r.request_id)
        # FIFO (EDF for deadlines) within a tenant and class, over the pool's models.
        for (tenant, prio), rids in sent.items():
            keys = [self.key(rid) for rid in rids]
            assert keys == sorted(keys)
            waiting = [
                self.key(rid)
                for rid in self.ids("queued")
                if self.reqs[rid].tenant == tenant
                and self.reqs[rid].priority.value == prio
                and self.reqs[rid].model in pool.models
            ]
            assert not waiting or max(keys) < min(waiting)
        # Work-conserving: free slots left over only if all that waits is held.
        if tokens is None and len(result.dispatched) < slots:
            heads: dict[tuple[str, str], str] = {}
            for rid in self.ids("queued"):
                r = self.reqs[rid]
                if r.model in pool.models:
                    assert r.tenant in ("c", "d"), f"{rid} left waiting beside free slots"
                    k = (r.tenant, r.priority.value)
                    if k not in heads or self.key(rid) < self.key(heads[k]):
                        heads[k] = rid
            for (tenant, _), rid in heads.items():
                if tenant == "c":
                    r = self.reqs[rid]
                    need = price(r.tenant, r.model, r.input_tokens, r.max_output_tokens, r.priority)
                    assert self.spent_now() + self.reserved_c() + need > LIMIT

    @precondition(lambda self: any(s == "inflight" for s in self.status.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.ids("inflight")))
        r = self.reqs[rid]
        out = data.draw(st.integers(0, r.max_output_tokens))
        results = [s.complete(rid, r.input_tokens, out, self.now) for s in self.all]
        assert all(x == results[0] for x in results)
        done = results[0]
        assert done is not None and done.request == r
        if r.tenant == "c":
            cost = price(r.tenant, r.model, r.input_tokens, out, r.priority)
            assert done.cost == cost and done.reservation == self.reserved[rid]
            period = math.floor(self.now / PERIOD)
            self.spent[period] = self.spent.get(period, Decimal(0)) + cost
        else:
            assert done.cost is None
        self.status[rid] = "done"

    @precondition(lambda self: any(s not in ("queued", "inflight") for s in self.status.values()))
    @rule(data=st.data())
    def complete_again(self, data: st.DataObject) -> None:
        finished = [r for r, s in self.status.items() if s not in ("queued", "inflight")]
        rid = data.draw(st.sampled_from(sorted(finished)))
        assert all(s.complete(rid, 1, 1, self.now) is None for s in self.all)

    @precondition(lambda self: any(s == "inflight" for s in self.status.values()))
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.ids("inflight")))
        assert all(s.requeue(rid, self.now) == self.reqs[rid] for s in self.all)
        self.status[rid] = "queued"
        self.heads -= 1
        self.index[rid] = self.heads

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.status)))
        results = [s.cancel(rid, self.now) for s in self.all]
        if self.status[rid] == "queued":
            assert all(x == self.reqs[rid] for x in results)
            self.status[rid] = "cancelled"
        else:
            assert all(x is None for x in results)

    @rule()
    def expire(self) -> None:
        results = [[(r.request.request_id, r.reason) for r in s.expire(self.now)] for s in self.all]
        assert all(x == results[0] for x in results)
        for rid, reason in results[0]:
            assert reason is RejectReason.DEADLINE_EXPIRED and self.status[rid] == "queued"
            self.status[rid] = "expired"
        for rid in self.ids("queued"):
            deadline = self.reqs[rid].deadline
            assert deadline is None or deadline > self.now

    @rule(tenant=st.sampled_from(["a", "b"]), weight=st.sampled_from([0.5, 1.0, 3.0]))
    def reweigh(self, tenant: str, weight: float) -> None:
        for s in self.all:
            s.update_tenant(TenantPolicy(tenant, weight=weight))

    @precondition(lambda self: len(self.clones) < 2)
    @rule()
    def restart(self) -> None:
        data = json.loads(json.dumps(self.s.snapshot().to_dict()))
        clone = Scheduler(CONFIG, cost=price, tenants=self.s.tenants.values(), models=MODELS)
        assert (
            clone.restore(SchedulerSnapshot.from_dict(data), self.s.queued_requests(), self.now)
            == []
        )
        clone.set_spending({"c": self.spent_now()}, self.now)  # the service reads the ledger
        self.clones.append(clone)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        queued, inflight = self.ids("queued"), self.ids("inflight")
        for s in self.all:
            assert s.backlog() == len(queued)
            assert s.in_flight() == len(inflight)
            for t in TENANTS:
                assert s.backlog(t) == sum(1 for rid in queued if self.reqs[rid].tenant == t)
        assert [r.request_id for r in self.s.queued_requests()] == sorted(
            queued, key=lambda rid: self.index[rid]
        )

    @invariant()
    def budget_never_overshot(self) -> None:
        assert self.spent_now() + self.reserved_c() <= LIMIT
        for s in self.all:
            view = s.budget("c", self.now)
            assert view is not None
            assert (view.spent, view.reserved) == (self.spent_now(), self.reserved_c())


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

"""Taking a :class:`SchedulerSnapshot` of a scheduler and restoring one into it.

Kept apart from the policy's hot paths; these functions are the policy's friends and
read its private state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING

from .budget import ZERO
from .errors import InvalidPolicy
from .snapshot import InFlightRecord, RateLevels, SchedulerSnapshot
from .tenant_queue import DONE, IN_FLIGHT, QUEUED, RequestEntry
from .types import RANK, QueuedRequest, Rejection, RejectReason

if TYPE_CHECKING:
    from .policy import Scheduler


def take_snapshot(s: Scheduler) -> SchedulerSnapshot:
    counters = {}
    limits: dict[str, RateLevels] = {}
    for name, t in s._tenants.items():
        per_class = {
            tc.cq.priority.value: (tc.counter, tc.last_served)
            for tc in t.classes
            if tc.counter or tc.last_served
        }
        if per_class:
            counters[name] = per_class
        if t.limiter is not None:
            r, k = t.limiter.requests, t.limiter.tokens
            limits[name] = (
                r.level if r else None,
                r.stamp if r else None,
                k.level if k else None,
                k.stamp if k else None,
            )
    return SchedulerSnapshot(
        tenant_counters=counters,
        class_counters={cq.priority.value: cq.counter for cq in s._classes},
        tenant_floors={cq.priority.value: cq.last_left for cq in s._classes},
        class_waiting_since={cq.priority.value: cq.waiting_since for cq in s._classes},
        class_floor=s._class_last_left,
        dispatches=s._dispatches,
        rate_limits=limits,
        in_flight=tuple(InFlightRecord.of(e) for e in s._entries.values() if e.state == IN_FLIGHT),
    )


def restore(
    s: Scheduler, snapshot: SchedulerSnapshot, undispatched: Iterable[QueuedRequest], now: float
) -> list[Rejection]:
    if s._entries:
        raise InvalidPolicy("restore needs a scheduler with no queued or in-flight requests")
    for name, tenant in s._tenants.items():
        per_class = snapshot.tenant_counters.get(name, {})
        for tc in tenant.classes:
            tc.counter, tc.last_served = per_class.get(tc.cq.priority.value, (0.0, 0))
        if tenant.budget is not None:
            # Spending comes from the ledger (set_spending); reservations from in flight.
            tenant.budget.roll(now)
            tenant.budget.reserved = ZERO
        if tenant.limiter is not None and name in snapshot.rate_limits:
            rl, rs, kl, ks = snapshot.rate_limits[name]
            r, k = tenant.limiter.requests, tenant.limiter.tokens
            if r is not None and rl is not None:
                r.level, r.stamp = min(rl, r.capacity), rs
            if k is not None and kl is not None:
                k.level, k.stamp = min(kl, k.capacity), ks
    s._class_last_left = snapshot.class_floor
    s._dispatches = snapshot.dispatches
    for record in snapshot.in_flight:
        _restore_in_flight(s, record)
    rejected: list[Rejection] = []
    for req in undispatched:
        problem = _admission_problem(s, req)
        if problem is not None:
            rejected.append(Rejection(req, RejectReason.INVALID, problem))
            continue
        if req.request_id in s._entries:
            continue  # in flight per the snapshot
        tenant = s._tenants[req.tenant]
        reservation = None
        if tenant.budget is not None:
            reservation = s._price(req, req.max_output_tokens)
        s._admit(tenant, req, reservation, now)  # lifts here are undone below
    # The snapshot's counters already include every lift: put them back, then re-key.
    for cq in s._classes:
        value = cq.priority.value
        cq.counter = snapshot.class_counters.get(value, 0.0)
        cq.last_left = snapshot.tenant_floors.get(value, 0.0)
        cq.waiting_since = snapshot.class_waiting_since.get(value, now)
    for name, tenant in s._tenants.items():
        per_class = snapshot.tenant_counters.get(name, {})
        for tc in tenant.classes:
            tc.counter, tc.last_served = per_class.get(tc.cq.priority.value, (0.0, 0))
            for mq in tc.live_queues():
                tc.cq.push(mq)
    return rejected


def _admission_problem(s: Scheduler, req: object) -> str | None:
    if type(req) is not QueuedRequest:
        return f"not a QueuedRequest: {type(req).__name__}"
    if req.tenant not in s._tenants:
        return f"unknown tenant {req.tenant!r}"
    if req.model not in s._models:
        return f"unknown model {req.model!r}"
    entry = s._entries.get(req.request_id)
    if entry is not None and entry.state == QUEUED:
        return f"duplicate request id {req.request_id!r}"
    return None


def _restore_in_flight(s: Scheduler, record: InFlightRecord) -> None:
    req = record.request
    tenant = s._tenants.get(req.tenant)
    if tenant is None or req.request_id in s._entries:
        return  # its tenant is gone: its completion will find nothing to settle
    s._seq += 1
    mq = tenant.classes[RANK[req.priority]].queue(req.model)
    entry = RequestEntry(req, s._seq, record.estimate, record.reservation, mq)
    entry.state = IN_FLIGHT
    entry.tokens = record.tokens
    entry.weight = record.weight
    s._entries[req.request_id] = entry
    if record.reservation is not None and tenant.budget is not None:
        tenant.budget.reserve(record.reservation)
    tenant.in_flight += 1
    s._in_flight += 1


def set_spending(s: Scheduler, spent: Mapping[str, Decimal], now: float) -> None:
    for name, amount in spent.items():
        tenant = s._tenants.get(name)
        if tenant is None or tenant.budget is None:
            continue
        tenant.budget.roll(now)
        tenant.budget.spent = amount


def forget(s: Scheduler, request_id: str) -> QueuedRequest | None:
    entry = s._entries.get(request_id)
    if entry is None or entry.state != IN_FLIGHT:
        return None
    tenant = entry.mq.tc.tenant
    if entry.reservation is not None and tenant.budget is not None:
        tenant.budget.release(entry.reservation)
    entry.state = DONE
    del s._entries[request_id]
    tenant.in_flight -= 1
    s._in_flight -= 1
    return entry.request

"""The fair-share scheduling policy: a pure, synchronous data structure.

No I/O, no clock, no threads, no randomness: time is always the ``now`` argument, so the
scheduler service can drive it from its loop and tests can replay any workload exactly.

Two levels (``docs/scheduler.md`` derives the bounds):

* **Classes** (interactive, standard, batch) share the capacity by configurable shares: the
  class with the least ``counter - aging_credit`` goes next, ties to the higher class.
* **Tenants** within a class share it by weight, as in the Virtual Token Counter: the
  backlogged tenant with the least counter goes next; a tenant returning from idle is lifted
  to the least counter of the backlogged ones, so idle time is not banked.

The hot paths (enqueue, dispatch, complete) are written flat on purpose: attribute look-ups
and calls dominate CPython's cost, and the policy must make 100,000 decisions a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from heapq import heapify, heappop, heappush, heapreplace

from . import restart
from .budget import BudgetCheck
from .class_queue import ClassQueue
from .errors import (
    BudgetExceeded,
    DuplicateRequest,
    InvalidPolicy,
    InvalidRequest,
    UnknownModel,
    UnknownTenant,
)
from .snapshot import InFlightRecord, SchedulerSnapshot
from .tenant_queue import (
    DONE,
    IN_FLIGHT,
    QUEUED,
    ModelQueue,
    RequestEntry,
    TenantClass,
    TenantState,
)
from .types import (
    PRIORITIES,
    RANK,
    BudgetView,
    Completion,
    CostFn,
    Dispatch,
    DispatchResult,
    Pool,
    Priority,
    QueuedRequest,
    Rejection,
    RejectReason,
    SchedulerConfig,
    TenantPolicy,
)

_INF = float("inf")
_RANK_OF = {p.value: r for p, r in RANK.items()}  # keyed by str: Enum.__hash__ is slow
# NamedTuple construction through its Python-level __new__ costs a call; tuple.__new__
# builds the same object directly.
_tuple_new = tuple.__new__


class Scheduler:
    """Per-tenant queues with weighted token fair share, priority classes, budgets and limits.

    Parameters:
        config: tuning; defaults to :class:`SchedulerConfig()`.
        cost: prices a request for budgets; required once any tenant has a budget.
        tenants: tenant policies to add now.
        models: model names to declare now.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        cost: CostFn | None = None,
        tenants: Iterable[TenantPolicy] = (),
        models: Iterable[str] = (),
    ) -> None:
        self.config = config = config if config is not None else SchedulerConfig()
        self._w_in, self._w_out, self._w_req = config.w_in, config.w_out, config.w_req
        self._aging_rate, self._aging_cap = config.aging_rate, config.max_aging_credit
        self._urgency_lead = config.urgency_lead
        self._default_estimate = config.default_output_estimate
        self._cost = cost
        self._classes = [ClassQueue(p, RANK[p], config.share(p)) for p in PRIORITIES]
        self._tenants: dict[str, TenantState] = {}
        self._models: set[str] = set()
        self._entries: dict[str, RequestEntry] = {}  # queued and in flight, by request id
        self._deadlines: list[tuple[float, int, RequestEntry]] = []
        self._seq = 0  # arrival order
        self._head_seq = 0  # counts down: requeued requests go ahead of all others
        self._queued = 0
        self._in_flight = 0
        self._call = 0  # dispatch calls, to mark tenants held in the current one
        self._dispatches = 0
        self._class_last_left = 0.0
        for policy in tenants:
            self.add_tenant(policy)
        for model in models:
            self.add_model(model)

    # -- tenants and models --------------------------------------------------------------

    def add_tenant(self, policy: TenantPolicy) -> None:
        """Add a tenant.

        Raises:
            InvalidPolicy: the tenant exists already, or it has a budget and the scheduler
                has no cost function.
        """
        if policy.name in self._tenants:
            raise InvalidPolicy(f"tenant {policy.name!r} exists already; use update_tenant")
        self._check_budget_pricing(policy)
        self._tenants[policy.name] = TenantState(policy, self._classes)

    def update_tenant(self, policy: TenantPolicy) -> None:
        """Replace a tenant's policy; counters, spending and queues are kept.

        A new weight applies to future charges. A lower budget stops new dispatches that
        would exceed it but cannot recall requests already in flight; requests dispatched
        before the tenant had a budget are not charged to it.

        Raises:
            UnknownTenant: the tenant was never added.
            InvalidPolicy: it gets a budget and the scheduler has no cost function.
        """
        tenant = self._tenant(policy.name)
        self._check_budget_pricing(policy)
        if policy.budget is not None:
            # Price queued requests first, so a failing cost function leaves no trace.
            unpriced = [e for e in tenant.queued_entries() if e.reservation is None]
            prices = [self._price(e.request, e.request.max_output_tokens) for e in unpriced]
            for e, price in zip(unpriced, prices, strict=True):
                e.reservation = price
        tenant.adopt(policy)

    def add_model(self, model: str) -> None:
        """Declare a model that pools may serve; requests for other models are refused.

        Raises:
            InvalidPolicy: the name is empty or not a string.
        """
        if not isinstance(model, str) or not model:
            raise InvalidPolicy(f"model must be a non-empty string, got {model!r}")
        self._models.add(model)

    def _check_budget_pricing(self, policy: TenantPolicy) -> None:
        if policy.budget is not None and self._cost is None:
            raise InvalidPolicy(f"tenant {policy.name!r} has a budget but no cost function")

    def _tenant(self, name: str) -> TenantState:
        tenant = self._tenants.get(name)
        if tenant is None:
            raise UnknownTenant(name)
        return tenant

    def _price(self, req: QueuedRequest, output_tokens: int, input_tokens: int = -1) -> Decimal:
        assert self._cost is not None
        if input_tokens < 0:
            input_tokens = req.input_tokens
        cost = self._cost(req.tenant, req.model, input_tokens, output_tokens, req.priority)
        if not isinstance(cost, Decimal) or not cost.is_finite() or cost < 0:
            raise InvalidPolicy(f"cost function returned {cost!r}; need a Decimal >= 0")
        return cost

    # -- enqueue ---------------------------------------------------------------------------

    def enqueue(self, req: QueuedRequest, now: float) -> None:
        """Queue a request.

        Parameters:
            req: the request; its tenant and model must be known.
            now: current time (budget period, class aging).

        Raises:
            UnknownTenant, UnknownModel: the tenant or model is not known.
            DuplicateRequest: a request with this id is queued or in flight.
            BudgetExceeded: its reservation exceeds what the budget period has left.
            InvalidRequest: ``req`` is not a :class:`QueuedRequest`.
        """
        if type(req) is not QueuedRequest:
            raise InvalidRequest(f"expected a QueuedRequest, got {type(req).__name__}")
        tenant = self._tenants.get(req.tenant)
        if tenant is None:
            raise UnknownTenant(req.tenant)
        if req.model not in self._models:
            raise UnknownModel(req.model)
        if req.request_id in self._entries:
            raise DuplicateRequest(req.request_id)
        reservation = None
        budget = tenant.budget
        if budget is not None:
            reservation = self._price(req, req.max_output_tokens)
            available = budget.available(now)
            if reservation > available:
                raise BudgetExceeded(req.tenant, reservation, available)
        tc = tenant.classes[_RANK_OF[req.priority._value_]]
        mq = tc.mq
        if mq is None or mq.model != req.model:
            mq = tc.find(req.model)
        if mq is None or not mq.live or req.deadline is not None:
            self._admit(tenant, req, reservation, now)
            return
        # Fast path: the queue is live, so there is nothing to lift, activate or time.
        estimate = req.estimated_output_tokens
        if estimate is None:
            estimate = min(self._default_estimate, req.max_output_tokens)
        self._seq = seq = self._seq + 1
        entry = RequestEntry(req, seq, estimate, reservation, mq)
        self._entries[req.request_id] = entry
        entry.next = None  # mq.append(), inlined
        last = mq.last
        if last is None:
            mq.first = entry
        else:
            last.next = entry
        mq.last = entry
        mq.live += 1
        tc.queued += 1
        tc.cq.queued += 1
        self._queued += 1

    def _admit(
        self, tenant: TenantState, req: QueuedRequest, reservation: Decimal | None, now: float
    ) -> RequestEntry:
        estimate = req.estimated_output_tokens
        if estimate is None:
            estimate = min(self._default_estimate, req.max_output_tokens)
        self._seq += 1
        tc = tenant.classes[_RANK_OF[req.priority._value_]]
        mq = tc.queue(req.model)
        entry = RequestEntry(req, self._seq, estimate, reservation, mq)
        self._entries[req.request_id] = entry
        self._insert(entry, mq, tc, now, False)
        return entry

    def _insert(
        self, entry: RequestEntry, mq: ModelQueue, tc: TenantClass, now: float, requeue: bool
    ) -> None:
        """Place a (re-)queued entry and account for it: lifts, heaps, counts, deadline."""
        cq = tc.cq
        if not cq.queued:
            self._lift_class(cq, now)
            cq.waiting_since = now
        if not tc.queued:
            self._lift_tenant(tc)
        deadline = entry.request.deadline
        if requeue:
            mq.reinsert(entry)
        else:
            mq.push(entry)
        if mq.live == 1:
            cq.activate(mq)
        tc.queued += 1
        cq.queued += 1
        self._queued += 1
        if deadline is not None and not getattr(entry, "timed", False):
            self._push_deadline(entry, deadline)

    def _lift_tenant(self, tc: TenantClass) -> None:
        """A tenant returning to the backlog starts no lower than the backlogged ones."""
        floor = tc.cq.tenant_floor()
        if floor is None:
            floor = tc.cq.last_left
        tc.counter = max(tc.counter, floor)

    def _lift_class(self, cq: ClassQueue, now: float) -> None:
        """A class returning to the backlog starts no lower than the best backlogged key."""
        floor = _INF
        for other in self._classes:
            if other.queued:
                key = other.counter - other.credit(now, self._aging_rate, self._aging_cap)
                floor = min(floor, key)
        if floor == _INF:
            floor = self._class_last_left
        cq.counter = max(cq.counter, floor)

    def _push_deadline(self, entry: RequestEntry, deadline: float) -> None:
        heap = self._deadlines
        if len(heap) > 2 * self._queued + 64:  # mostly stale: rebuild
            for _, _, stale in heap:
                stale.timed = False
            heap[:] = [t for t in heap if t[2].state == QUEUED]
            for _, _, kept in heap:
                kept.timed = True
            heapify(heap)
        entry.timed = True
        heappush(heap, (deadline, entry.seq, entry))

    # -- removal ---------------------------------------------------------------------------

    def _removed(self, tc: TenantClass) -> None:
        """Bookkeeping after one queued request of ``tc`` left the queue."""
        cq = tc.cq
        tc.queued -= 1
        cq.queued -= 1
        self._queued -= 1
        if not cq.queued:
            cq.last_left = tc.counter
            if not self._queued:
                self._class_last_left = cq.counter

    def _drop(self, entry: RequestEntry) -> None:
        """Remove a queued request from wherever it lies (lazily)."""
        mq = entry.mq
        entry.state = DONE
        del self._entries[entry.request.request_id]
        mq.discard(entry)
        if not mq.live:
            mq.tc.cq.deactivate(mq)
        self._removed(mq.tc)

    # -- dispatch ----------------------------------------------------------------------------

    def dispatch(self, pool: Pool, now: float) -> DispatchResult:
        """Choose requests for a pool's free capacity.

        Fills up to ``pool.free_slots`` (and ``pool.token_budget``, counting input plus
        estimated output tokens) with requests for models the pool serves, class by class
        and tenant by tenant in fair order. On the way it rejects requests whose deadline
        passed or whose reservation can no longer fit the budget, and skips (holds) tenants
        that are rate-limited or whose budget is tied up in flight. It stops at the first
        request that does not fit the token budget rather than overtake it, so large
        requests are not starved by small ones.

        Parameters:
            pool: the pool's models and free capacity now.
            now: current time.

        Returns:
            The requests to send, each with its budget reservation, and the requests that
            left the queue rejected (the caller must report them).
        """
        dispatched: list[Dispatch] = []
        rejected: list[Rejection] = []
        slots = pool.free_slots
        shared = slots if pool.shared_slots is None else min(slots, pool.shared_slots)
        lead = self._urgency_lead
        if slots <= 0 or not self._queued:
            return DispatchResult(dispatched, rejected)
        self._call += 1
        call = self._call
        tokens_left = pool.token_budget
        models = pool.models
        only = next(iter(models)) if len(models) == 1 else None
        held: list[TenantClass] = []
        active = [c for c in self._classes if c.queued]  # rank order
        # Class keys: counter minus aging credit. `now` is fixed for the call, so a key
        # changes only when its class is served (then its credit drops to 0).
        rate, cap = self._aging_rate, self._aging_cap
        keys = [c.counter - c.credit(now, rate, cap) for c in active]
        w_in, w_out, w_req = self._w_in, self._w_out, self._w_req
        dispatches = self._dispatches
        try:
            while slots > 0 and active:
                # The class with the least key; min() takes the first, the higher class.
                i = 0 if len(keys) == 1 else keys.index(min(keys))
                cq = active[i]
                if cq.rank and shared <= 0:  # the rest is interactive headroom
                    del active[i], keys[i]
                    continue
                # The tenant: least counter among those backlogged on the pool's models.
                if only is None:
                    top = cq.least(models, call)
                else:  # cq.top(), inlined: this is the hottest loop
                    top = None
                    heap = cq.heaps.get(only)
                    while heap:
                        top = heap[0]
                        mq = top[4]
                        if top[3] != mq.version or not mq.live:
                            heappop(heap)
                        elif top[0] != (tc := mq.tc).counter or top[1] != tc.last_served:
                            mq.version = version = top[3] + 1
                            mq.key = tc.counter
                            heapreplace(heap, (tc.counter, tc.last_served, tc.name, version, mq))
                        elif tc.held == call:
                            heappop(heap)
                        else:
                            break
                        top = None
                if top is None:
                    del active[i], keys[i]
                    continue
                mq = top[4]
                if cq.urgent:
                    mq = self._urgent_queue(cq, top[0] + lead, models, call) or mq
                tc = mq.tc
                first = mq.first
                if tc.others is None and first and not mq.edf and first.state == QUEUED:
                    entry = first  # the common case of mq.head(), inlined
                else:  # the tenant's next request over the pool's models
                    head = mq.head() if tc.others is None else tc.head(models)
                    assert head is not None
                    entry, mq = head, head.mq
                req = entry.request
                deadline = req.deadline
                if deadline is not None and deadline <= now:
                    self._drop(entry)
                    rejected.append(_expired(req, now))
                    if not cq.queued:
                        del active[i], keys[i]
                    continue
                tenant = tc.tenant
                budget = tenant.budget
                reservation = entry.reservation
                if budget is not None and reservation is not None:
                    verdict = budget.check(now, reservation)
                    if verdict is BudgetCheck.REJECT:
                        self._drop(entry)
                        rejected.append(_over_budget(req, reservation, budget.limit - budget.spent))
                        if not cq.queued:
                            del active[i], keys[i]
                        continue
                    if verdict is BudgetCheck.HOLD:
                        tc.held = call
                        held.append(tc)
                        continue
                need = req.input_tokens + entry.estimate
                limiter = tenant.limiter
                if limiter is not None and not limiter.allows(now, need):
                    tc.held = call
                    held.append(tc)
                    continue
                if tokens_left is not None:
                    if need > tokens_left:
                        break
                    tokens_left -= need
                # Dispatch it, charging the counters from the estimate.
                edf = mq.edf
                if edf and edf[0][2] is entry:
                    heappop(edf)
                else:  # it is the head of the linked list
                    mq.first = entry.next
                    if mq.first is None:
                        mq.last = None
                mq.live -= 1
                if not mq.live:
                    cq.live_queues[mq.model] -= 1
                entry.state = IN_FLIGHT
                tokens = w_req + w_in * req.input_tokens + w_out * entry.estimate
                weight = tenant.weight
                charge = tokens / weight
                entry.tokens = tokens
                entry.weight = weight
                tc.counter = counter = tc.counter + charge
                dispatches += 1
                tc.last_served = dispatches
                cq.counter = keys[i] = cq.counter + tokens / cq.share
                cq.waiting_since = now
                tc.queued -= 1
                cq.queued -= 1
                self._queued -= 1
                if not cq.queued:
                    cq.last_left = counter
                    if not self._queued:
                        self._class_last_left = cq.counter
                    del active[i], keys[i]
                if reservation is not None and budget is not None:
                    budget.reserve(reservation)
                if limiter is not None:
                    limiter.take(need)
                tenant.in_flight += 1
                dispatched.append(_tuple_new(Dispatch, (req, reservation, charge)))
                slots -= 1
                if cq.rank:
                    shared -= 1
        finally:
            self._dispatches = dispatches
            self._in_flight += len(dispatched)
            if held:
                self._release_held(held)
        return DispatchResult(dispatched, rejected)

    @staticmethod
    def _urgent_queue(
        cq: ClassQueue, ceiling: float, models: frozenset[str], call: int
    ) -> ModelQueue | None:
        """The queue of the least served urgent tenant backlogged on ``models`` whose
        counter is at most ``ceiling`` (None: no such tenant)."""
        best: TenantClass | None = None
        for tc in cq.urgent:
            if (
                tc.queued
                and tc.held != call
                and tc.counter <= ceiling
                and (best is None or tc.counter < best.counter)
                and any(mq.live and mq.model in models for mq in tc.queues())
            ):
                best = tc
        if best is None:
            return None
        head = best.head(models)
        return None if head is None else head.mq

    def _release_held(self, held: list[TenantClass]) -> None:
        """Re-enter held tenants, lifted so that time spent held is not banked either."""
        for tc in held:
            if not tc.held:
                continue  # already released (held twice in one call)
            tc.held = 0
            if not tc.queued:
                continue
            floor = tc.cq.tenant_floor()
            if floor is not None and tc.counter < floor:
                tc.counter = floor
            for mq in tc.live_queues():
                tc.cq.push(mq)

    # -- deadlines ------------------------------------------------------------------------

    def set_urgent(self, tenant: str, priority: Priority, urgent: bool) -> None:
        """Mark a tenant's work in a class urgent (a completion window at risk) or not.

        An urgent tenant is served ahead of its class's fair order while its counter leads
        the least served backlogged tenant's by at most ``config.urgency_lead``; past that,
        it waits for the others as usual. So no tenant falls further behind an urgent one
        than that lead, and the classes' shares are untouched.

        Raises:
            UnknownTenant: the tenant was never added.
        """
        tc = self._tenant(tenant).classes[RANK[priority]]
        if urgent:
            tc.cq.urgent.add(tc)
        else:
            tc.cq.urgent.discard(tc)

    def urgent(self, priority: Priority) -> frozenset[str]:
        """The tenants marked urgent in a class."""
        return frozenset(tc.name for tc in self._classes[RANK[priority]].urgent)

    # -- completion, requeue, cancel, expiry ---------------------------------------------------

    def complete(
        self, request_id: str, input_tokens: int, output_tokens: int, now: float
    ) -> Completion | None:
        """Settle a dispatched request with its actual token counts.

        Corrects the fair-share counters and the token rate limit from the estimate to the
        actual counts, and swaps the budget reservation for the actual cost.

        Parameters:
            request_id: id of a dispatched request.
            input_tokens, output_tokens: what the engine actually processed.
            now: current time (the budget period the cost is booked in).

        Returns:
            The settlement, or None if the id is not in flight (e.g. a repeated completion
            under at-least-once delivery).

        Raises:
            InvalidRequest: a token count is not an int >= 0.
            InvalidPolicy: the cost function failed to return a Decimal >= 0.
        """
        if (
            type(input_tokens) is not int
            or type(output_tokens) is not int
            or input_tokens < 0
            or output_tokens < 0
        ):
            raise InvalidRequest(
                f"request {request_id!r}: token counts must be ints >= 0, got "
                f"input {input_tokens!r}, output {output_tokens!r}"
            )
        entry = self._entries.get(request_id)
        if entry is None or entry.state != IN_FLIGHT:
            return None
        req = entry.request
        reservation = entry.reservation
        cost = None
        if reservation is not None:
            cost = self._price(req, output_tokens, input_tokens)  # may raise: before changes
        mq = entry.mq
        tc = mq.tc
        tenant = tc.tenant
        delta_tokens = (
            self._w_req + self._w_in * input_tokens + self._w_out * output_tokens - entry.tokens
        )
        if delta_tokens:  # _correct(), inlined
            delta = delta_tokens / entry.weight
            tc.counter = counter = tc.counter + delta
            cq = tc.cq
            cq.counter += delta_tokens / cq.share
            if delta < 0 and tc.queued:
                tc.repush_above(counter)  # its heap entries would sit too deep
        if cost is not None and reservation is not None and tenant.budget is not None:
            tenant.budget.settle(now, reservation, cost)
        if tenant.limiter is not None:
            tenant.limiter.correct(input_tokens + output_tokens - req.input_tokens - entry.estimate)
        entry.state = DONE
        del self._entries[request_id]
        tenant.in_flight -= 1
        self._in_flight -= 1
        return _tuple_new(Completion, (req, reservation, cost))

    def _correct(self, entry: RequestEntry, delta_tokens: float) -> None:
        """Add ``delta_tokens`` weighted tokens to the counters the entry was charged to."""
        tc = entry.mq.tc
        delta = delta_tokens / entry.weight
        tc.counter += delta
        tc.cq.counter += delta_tokens / tc.cq.share
        entry.tokens += delta_tokens
        if delta < 0 and tc.queued:
            tc.repush_above(tc.counter)  # its heap entries would sit too deep

    def requeue(self, request_id: str, now: float) -> QueuedRequest | None:
        """Return a dispatched request to its tenant's queue, e.g. when its worker died.

        It goes back to the head of its tenant's queue (it had reached the head once
        already); its charge is refunded and its budget reservation released.

        Returns:
            The request, or None if the id is not in flight.
        """
        entry = self._entries.get(request_id)
        if entry is None or entry.state != IN_FLIGHT:
            return None
        mq = entry.mq
        tenant = mq.tc.tenant
        self._correct(entry, -entry.tokens)
        if entry.reservation is not None and tenant.budget is not None:
            tenant.budget.release(entry.reservation)
        tenant.in_flight -= 1
        self._in_flight -= 1
        entry.state = QUEUED
        self._head_seq -= 1
        entry.seq = self._head_seq
        self._insert(entry, mq, mq.tc, now, True)
        return entry.request

    def cancel(self, request_id: str, now: float) -> QueuedRequest | None:
        """Remove a queued request by id in O(1) (amortised).

        Returns:
            The request, or None if it is not queued (unknown, or already in flight: then
            the service aborts it on its worker and reports a completion).
        """
        entry = self._entries.get(request_id)
        if entry is None or entry.state != QUEUED:
            return None
        self._drop(entry)
        return entry.request

    def expire(self, now: float) -> list[Rejection]:
        """Remove every queued request whose deadline is at or before ``now``.

        Returns:
            The expired requests with reason ``DEADLINE_EXPIRED``, earliest deadline first.
        """
        out: list[Rejection] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heappop(heap)[2]
            entry.timed = False
            if entry.state == QUEUED:
                self._drop(entry)
                out.append(_expired(entry.request, now))
        return out

    # -- introspection ---------------------------------------------------------------------

    def backlog(self, tenant: str | None = None, priority: Priority | None = None) -> int:
        """Queued requests, in all or of one tenant, in all classes or one.

        Raises:
            UnknownTenant: ``tenant`` was never added.
        """
        if tenant is None:
            if priority is None:
                return self._queued
            return self._classes[RANK[priority]].queued
        state = self._tenant(tenant)
        if priority is None:
            return state.queued
        return state.classes[RANK[priority]].queued

    def in_flight(self, tenant: str | None = None) -> int:
        """Dispatched requests not yet completed or requeued."""
        return self._in_flight if tenant is None else self._tenant(tenant).in_flight

    def counter(self, tenant: str, priority: Priority) -> float:
        """A tenant's virtual token counter in a class (weighted service, plus lifts)."""
        return self._tenant(tenant).classes[RANK[priority]].counter

    def class_counter(self, priority: Priority) -> float:
        """A class's service counter (weighted tokens divided by its share, plus lifts)."""
        return self._classes[RANK[priority]].counter

    def budget(self, tenant: str, now: float) -> BudgetView | None:
        """A tenant's budget in the period current at ``now`` (None: no budget)."""
        budget = self._tenant(tenant).budget
        if budget is None:
            return None
        budget.roll(now)
        return BudgetView(budget.limit, budget.spent, budget.reserved)

    def queued_requests(self) -> list[QueuedRequest]:
        """Every queued request, in arrival order (what a restart must re-read)."""
        entries = [e for e in self._entries.values() if e.state == QUEUED]
        entries.sort(key=lambda e: e.seq)
        return [e.request for e in entries]

    @property
    def tenants(self) -> dict[str, TenantPolicy]:
        return {name: t.policy for name, t in self._tenants.items()}

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self._models)

    # -- restart ----------------------------------------------------------------------------

    def set_spending(self, spent: Mapping[str, Decimal], now: float) -> None:
        """Set budgeted tenants' settled spending in the period current at ``now`` (read
        from the ledger by the service); tenants absent or without a budget are left
        as they are. Reservations are untouched."""
        restart.set_spending(self, spent, now)

    def forget(self, request_id: str) -> QueuedRequest | None:
        """Drop an in-flight request whose cost the spending already holds (its ledger
        entry was found before its completion arrived): its reservation is released,
        nothing is spent, and a later completion finds nothing to settle.

        Returns:
            The request, or None if it is not in flight.
        """
        return restart.forget(self, request_id)

    def in_flight_record(self, request_id: str) -> InFlightRecord | None:
        """What a restart needs to settle an in-flight request (None: not in flight)."""
        entry = self._entries.get(request_id)
        if entry is None or entry.state != IN_FLIGHT:
            return None
        return InFlightRecord.of(entry)

    def snapshot(self) -> SchedulerSnapshot:
        """The state a restart needs besides the queued requests (which live in topics)."""
        return restart.take_snapshot(self)

    def restore(
        self, snapshot: SchedulerSnapshot, undispatched: Iterable[QueuedRequest], now: float
    ) -> list[Rejection]:
        """Rebuild the state after a restart: counters from ``snapshot``, queues from
        ``undispatched`` (in the order they were first enqueued, e.g. topic order).

        Tenants and models must have been added first; the queues must be empty. Requests
        in flight in the snapshot are restored as in flight, so their completions settle;
        an undispatched request with the same id as one of those is skipped. Budgets are not
        re-checked here: dispatch rejects what no longer fits.

        Returns:
            Requests that could not be re-admitted (reason ``INVALID``).

        Raises:
            InvalidPolicy: the scheduler already has queued or in-flight requests.
        """
        return restart.restore(self, snapshot, undispatched, now)


def _expired(req: QueuedRequest, now: float) -> Rejection:
    return Rejection(
        req,
        RejectReason.DEADLINE_EXPIRED,
        f"deadline {req.deadline} passed while queued (now {now})",
    )


def _over_budget(req: QueuedRequest, reservation: Decimal, left: Decimal) -> Rejection:
    return Rejection(
        req,
        RejectReason.BUDGET_EXCEEDED,
        f"tenant {req.tenant!r}: reservation {reservation} exceeds the {left} left of its "
        "budget this period",
    )

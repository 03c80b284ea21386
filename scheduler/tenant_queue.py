"""Per-tenant state: the request queues of one tenant and its fair-share counters.

A tenant has one :class:`TenantClass` per priority class (its counter in that class) and,
inside it, one :class:`ModelQueue` per model, since a pool takes only the models it serves.
A model queue is FIFO, except that requests with a deadline go first, earliest deadline
first. Removal by id is lazy (the entry is marked dead and skipped when it reaches the
head), which makes cancel O(1); queues are compacted when dead entries outnumber live ones.
"""

from __future__ import annotations

from decimal import Decimal
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from .budget import Budget
from .rate_limit import RateLimiter
from .types import QueuedRequest, TenantPolicy

if TYPE_CHECKING:
    from .class_queue import ClassQueue

# Entry states.
QUEUED = 0
IN_FLIGHT = 1
DONE = 2  # dispatched and settled, cancelled, expired or rejected

_COMPACT_MIN = 32


class RequestEntry:
    """The scheduler's mutable record of one request, queued or in flight."""

    __slots__ = (
        "estimate",
        "mq",
        "next",
        "request",
        "reservation",
        "seq",
        "state",
        "timed",
        "tokens",
        "weight",
    )

    def __init__(
        self,
        request: QueuedRequest,
        seq: int,
        estimate: int,
        reservation: Decimal | None,
        mq: ModelQueue,
    ) -> None:
        self.request = request
        self.seq = seq
        self.state = QUEUED
        self.mq = mq
        self.estimate = estimate
        self.reservation = reservation
        # Set when needed, not here (enqueue is hot): `tokens` (weighted tokens charged)
        # and `weight` (the tenant's weight then) at dispatch, `timed` (in the deadline
        # heap) when the request has a deadline.
        self.tokens: float
        self.weight: float
        self.timed: bool
        self.next: RequestEntry | None  # in its queue's linked list (set when linked)

    def order_key(self) -> tuple[float, int]:
        """Position within its tenant: earliest deadline first, then arrival order."""
        deadline = self.request.deadline
        return (float("inf") if deadline is None else deadline, self.seq)


class ModelQueue:
    """Requests of one tenant, class and model; ``version`` stamps its heap entries.

    Requests without a deadline form a singly linked list through ``RequestEntry.next``
    (``first`` to ``last``): no container per queue, which keeps the state of thousands of
    tenants small enough for the CPU caches. Requests with a deadline sit in ``edf``.
    """

    __slots__ = ("dead", "edf", "first", "key", "last", "live", "model", "tc", "version")

    def __init__(self, tc: TenantClass, model: str) -> None:
        self.tc = tc
        self.model = model
        self.first: RequestEntry | None = None
        self.last: RequestEntry | None = None
        self.edf: list[tuple[float, int, RequestEntry]] | None = None  # made when needed
        self.live = 0
        self.dead = 0
        self.version = 0
        self.key = 0.0  # counter in its current heap entry (<= the tenant's counter, or stale)

    def append(self, entry: RequestEntry) -> None:
        """Add a request without a deadline at the tail (does not count it as live)."""
        entry.next = None
        last = self.last
        if last is None:
            self.first = entry
        else:
            last.next = entry
        self.last = entry

    def push(self, entry: RequestEntry) -> None:
        deadline = entry.request.deadline
        if deadline is None:
            self.append(entry)
        else:
            if self.edf is None:
                self.edf = []
            heappush(self.edf, (deadline, entry.seq, entry))
        self.live += 1

    def reinsert(self, entry: RequestEntry) -> None:
        """Put a requeued request at the head (its ``seq`` was made the lowest)."""
        deadline = entry.request.deadline
        if deadline is not None:
            if self.edf is None:
                self.edf = []
            heappush(self.edf, (deadline, entry.seq, entry))
        else:
            entry.next = self.first
            self.first = entry
            if self.last is None:
                self.last = entry
        self.live += 1

    def head(self) -> RequestEntry | None:
        """The next live request, dropping dead entries from the front."""
        edf = self.edf
        while edf:
            entry = edf[0][2]
            if entry.state == QUEUED:
                return entry
            heappop(edf)
            self.dead -= 1
        first = self.first
        while first is not None and first.state != QUEUED:
            first = first.next
            self.dead -= 1
        self.first = first
        if first is None:
            self.last = None
        return first

    def pop_head(self, entry: RequestEntry) -> None:
        """Remove ``entry``, which :meth:`head` just returned."""
        if self.edf and self.edf[0][2] is entry:
            heappop(self.edf)
        else:
            self.first = entry.next
            if self.first is None:
                self.last = None
        self.live -= 1

    def discard(self, entry: RequestEntry) -> None:
        """Count ``entry`` (already marked not queued) as dead where it lies."""
        self.live -= 1
        self.dead += 1
        if self.dead > _COMPACT_MIN and self.dead > self.live:
            kept = self._linked()
            self.first = self.last = None
            for e in kept:
                self.append(e)
            if self.edf:
                self.edf = [t for t in self.edf if t[2].state == QUEUED]
                heapify(self.edf)
            self.dead = 0

    def _linked(self) -> list[RequestEntry]:
        out = []
        e = self.first
        while e is not None:
            if e.state == QUEUED:
                out.append(e)
            e = e.next
        return out

    def live_entries(self) -> list[RequestEntry]:
        return [t[2] for t in self.edf or () if t[2].state == QUEUED] + self._linked()


class TenantClass:
    """A tenant within one priority class: its virtual token counter and queues.

    Most tenants use one model per class, so its queue sits in ``mq``; a dict of further
    queues (``others``) appears only for a second model. Small per-tenant state keeps many
    tenants in the CPU caches.
    """

    __slots__ = ("counter", "cq", "held", "last_served", "mq", "name", "others", "queued", "tenant")

    def __init__(self, tenant: TenantState, cq: ClassQueue) -> None:
        self.tenant = tenant
        self.name = tenant.name
        self.cq = cq
        self.counter = 0.0
        self.last_served = 0  # the scheduler's dispatch count at its last dispatch
        self.queued = 0
        self.mq: ModelQueue | None = None  # the queue of its first model
        self.others: dict[str, ModelQueue] | None = None  # queues of further models
        self.held = 0  # id of the dispatch call that found it held (rate limit, budget)

    def find(self, model: str) -> ModelQueue | None:
        mq = self.mq
        if mq is not None and mq.model == model:
            return mq
        return None if self.others is None else self.others.get(model)

    def queue(self, model: str) -> ModelQueue:
        mq = self.find(model)
        if mq is None:
            mq = ModelQueue(self, model)
            if self.mq is None:
                self.mq = mq
            else:
                if self.others is None:
                    self.others = {}
                self.others[model] = mq
        return mq

    def queues(self) -> list[ModelQueue]:
        if self.mq is None:
            return []
        return [self.mq] if self.others is None else [self.mq, *self.others.values()]

    def live_queues(self) -> list[ModelQueue]:
        return [mq for mq in self.queues() if mq.live]

    def repush_above(self, counter: float) -> None:
        """Fresh heap entries for live queues whose entry's key exceeds ``counter``."""
        for mq in self.queues():
            if mq.live and counter < mq.key:
                self.cq.push(mq)

    def head(self, models: frozenset[str]) -> RequestEntry | None:
        """The next request over ``models``: earliest deadline, then arrival order."""
        best: RequestEntry | None = None
        best_key = (float("inf"), 0)
        for mq in self.queues():
            if mq.live and mq.model in models:
                head = mq.head()
                assert head is not None
                key = head.order_key()
                if best is None or key < best_key:
                    best, best_key = head, key
        return best


class TenantState:
    """A tenant: its policy, budget, rate limits and one :class:`TenantClass` per class."""

    __slots__ = ("budget", "classes", "in_flight", "limiter", "name", "policy", "weight")

    def __init__(self, policy: TenantPolicy, classes: list[ClassQueue]) -> None:
        self.policy = policy
        self.name = policy.name
        self.weight = float(policy.weight)
        self.budget: Budget | None = None
        self.limiter: RateLimiter | None = None
        self.classes = [TenantClass(self, cq) for cq in classes]
        self.in_flight = 0
        self.adopt(policy)

    @property
    def queued(self) -> int:
        return sum(tc.queued for tc in self.classes)

    def queued_entries(self) -> list[RequestEntry]:
        return [e for tc in self.classes for mq in tc.queues() for e in mq.live_entries()]

    def adopt(self, policy: TenantPolicy) -> None:
        """Take a new policy, carrying over spending, reservations and bucket levels."""
        budget = (
            Budget(
                policy.budget, policy.budget_period_s, calendar_month=policy.budget_calendar_month
            )
            if policy.budget is not None
            else None
        )
        old = self.budget
        if budget is not None and old is not None:
            if (old.period_s, old.calendar_month) == (budget.period_s, budget.calendar_month):
                budget.period = old.period
            budget.spent, budget.reserved = old.spent, old.reserved
        limiter = RateLimiter(policy.requests_per_min, policy.tokens_per_min)
        if self.limiter is not None:
            for new, prev in (
                (limiter.requests, self.limiter.requests),
                (limiter.tokens, self.limiter.tokens),
            ):
                if new is not None and prev is not None:
                    new.level, new.stamp = min(prev.level, new.capacity), prev.stamp
        self.policy = policy
        self.weight = float(policy.weight)
        self.budget = budget
        self.limiter = limiter if limiter.requests or limiter.tokens else None

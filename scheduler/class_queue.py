"""One priority class: which backlogged tenant is next, and how long the class has waited.

Per model, a heap orders the tenants backlogged on that model by their counter in this
class; ties go to the tenant served least recently (so a tenant lifted to the others'
counter on its return goes first), then by name, so the order is reproducible after a
restart. Entries are ``(counter, last_served, tenant, version, model_queue)`` with lazy
deletion: an entry whose version is not its queue's current one, or whose queue is empty,
is dropped when it reaches the top; one whose counter has since grown is re-keyed there. Counters only fall on a completion
correction or a requeue, and those push a fresh entry at once. Every operation is
O(log n) amortised in the number of backlogged tenants.

An entry whose key is below its tenant's counter is harmless (it surfaces early and is
re-keyed); one above it would let the tenant wait too long, so a counter that falls below
its queue's key (``ModelQueue.key``) gets a fresh entry at once.

Aging is O(1): the class records since when it has waited for service.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace

from .tenant_queue import ModelQueue, TenantClass
from .types import Priority

HeapEntry = tuple[float, int, str, int, ModelQueue]
TenantHeap = list[HeapEntry]

_SLACK = 64


class ClassQueue:
    """Backlog and counters of one priority class."""

    __slots__ = (
        "counter",
        "heaps",
        "last_left",
        "live_queues",
        "priority",
        "queued",
        "rank",
        "share",
        "urgent",
        "waiting_since",
    )

    def __init__(self, priority: Priority, rank: int, share: float) -> None:
        self.priority = priority
        self.rank = rank
        self.share = share
        #: Class service counter: weighted tokens dispatched in this class / share.
        self.counter = 0.0
        self.queued = 0
        self.heaps: dict[str, TenantHeap] = {}
        self.live_queues: dict[str, int] = {}  # per model: model queues with live requests
        #: Counter of the tenant whose departure last emptied this class (VTC's lift floor).
        self.last_left = 0.0
        #: When the class last got a dispatch or became backlogged, for aging.
        self.waiting_since = 0.0
        #: Tenants whose deadlines are at risk (usually none): see Scheduler.set_urgent.
        self.urgent: set[TenantClass] = set()

    # -- tenants -------------------------------------------------------------------------

    def activate(self, mq: ModelQueue) -> None:
        """A model queue got its first live request: enter it in its model's heap."""
        model = mq.model
        self.live_queues[model] = self.live_queues.get(model, 0) + 1
        self.push(mq)

    def deactivate(self, mq: ModelQueue) -> None:
        """A model queue ran empty; its heap entry goes stale and is dropped lazily."""
        self.live_queues[mq.model] -= 1

    def push(self, mq: ModelQueue) -> None:
        """(Re-)enter ``mq`` at its tenant's current counter, superseding older entries."""
        heap = self.heaps.get(mq.model)
        if heap is None:
            heap = self.heaps[mq.model] = []
        elif len(heap) > 2 * self.live_queues[mq.model] + _SLACK:
            self._compact(heap)
        mq.version += 1
        tc = mq.tc
        mq.key = tc.counter
        heappush(heap, (tc.counter, tc.last_served, tc.name, mq.version, mq))

    def top(self, heap: TenantHeap, call: int = -1) -> HeapEntry | None:
        """The valid entry with the least counter, cleaning stale entries on the way.

        Entries of tenants held in dispatch call ``call`` are popped (they are pushed back
        when the call ends).
        """
        while heap:
            key, served, name, version, mq = heap[0]
            if version != mq.version or not mq.live:
                heappop(heap)
                continue
            tc = mq.tc
            if key != tc.counter or served != tc.last_served:  # it was served since
                mq.version = version = version + 1
                mq.key = tc.counter
                heapreplace(heap, (tc.counter, tc.last_served, name, version, mq))
                continue
            if tc.held == call:
                heappop(heap)
                continue
            return heap[0]
        return None

    def least(self, models: frozenset[str], call: int = -1) -> HeapEntry | None:
        """The least (counter, last served, name) entry over the heaps of ``models``."""
        best: HeapEntry | None = None
        heaps = self.heaps
        for model in models if len(models) <= len(heaps) else list(heaps):
            heap = heaps.get(model)
            if not heap or model not in models:
                continue
            top = self.top(heap, call)
            if top is not None and (best is None or top[:3] < best[:3]):
                best = top
        return best

    def tenant_floor(self) -> float | None:
        """Least counter among this class's backlogged tenants (None if none)."""
        floor: float | None = None
        for heap in self.heaps.values():
            top = self.top(heap)
            if top is not None and (floor is None or top[0] < floor):
                floor = top[0]
        return floor

    def _compact(self, heap: TenantHeap) -> None:
        valid = [
            (mq.tc.counter, mq.tc.last_served, name, version, mq)
            for _, _, name, version, mq in heap
            if version == mq.version and mq.live
        ]
        heap[:] = valid
        heapify(heap)

    # -- aging ---------------------------------------------------------------------------

    def credit(self, now: float, rate: float, cap: float) -> float:
        """Aging credit: ``rate`` per second since the class was last served (or became
        backlogged), up to ``cap``."""
        waited = now - self.waiting_since
        if waited <= 0.0:
            return 0.0
        credit = waited * rate
        return min(credit, cap)

"""Which offset of each request-topic partition is safe to commit.

A request leaves the scheduler's hands when it is dispatched (Celery then owns its
delivery), cancelled, expired or rejected. The committed offset of a partition is
the lowest offset still *undispatched*, or one past the last offset read when none
is: a restart re-reads exactly what was not yet handed on, never less.
"""

from __future__ import annotations

from heapq import heappop, heappush

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, list[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int) -> None:
        """An offset was consumed and is now held undispatched."""
        heappush(self._pending.setdefault(tp, []), offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def skip(self, tp: TopicPartition, offset: int) -> None:
        """An offset was consumed and needs no further work (duplicate, dead letter)."""
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def release(self, tp: TopicPartition, offset: int) -> None:
        """A held offset left the scheduler (dispatched, cancelled, expired, rejected)."""
        self._done.setdefault(tp, set()).add(offset)

    def commit_points(self) -> dict[TopicPartition, int]:
        """Offsets to commit that moved since the last call."""
        out: dict[TopicPartition, int] = {}
        for tp, nxt in self._next.items():
            heap, done = self._pending.get(tp, []), self._done.get(tp, set())
            while heap and heap[0] in done:
                done.discard(heappop(heap))
            point = heap[0] if heap else nxt
            if self._committed.get(tp) != point:
                out[tp] = point
        return out

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)

    def held(self) -> int:
        return sum(len(h) for h in self._pending.values()) - sum(
            len(d) for d in self._done.values()
        )

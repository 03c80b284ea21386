"""Where token events go: an :class:`EventSink`.

Production publishes to Kafka ``tokenmill.token-events`` keyed by tenant (so one
tenant's events stay in order on one partition); tests can use :class:`MemorySink`.

Event semantics (all events of one attempt share ``attempt``; ``seq`` orders them):

* ``dispatched`` (seq 0) when a worker starts the request;
* ``first_token`` when the engine produced its first token(s);
* ``progress`` coalesced: after ``progress_tokens`` new tokens or ``progress_interval_s``;
* one terminal event: ``finished`` (engine's own prompt/completion counts), ``failed``
  (``reason``) or ``cancelled``. A failed or cancelled (or expired: ``failed`` with
  reason ``expired: …``) request carries the work the engine had done for it — its
  prompt once admitted, the tokens generated — which the ledger bills as partial work;
  one that never reached the engine carries zero counts and costs nothing.

``delta_tokens`` is the number of tokens since the previous event of the attempt, so
the deltas of an attempt sum to its final ``completion_tokens``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from ..logs import get_logger
from ..wire import TOKEN_EVENTS_TOPIC, TokenEvent

__all__ = ["EventSink", "KafkaSink", "MemorySink"]

log = get_logger(__name__)


class EventSink(Protocol):
    async def start(self) -> None: ...

    async def send_many(self, events: Sequence[TokenEvent]) -> list[Awaitable[Any]]:
        """Queue ``events`` in order; one awaitable per event, completing once it is
        delivered."""

    async def close(self) -> None:
        """Deliver what is queued, then release the connection."""


class KafkaSink:
    """aiokafka producer on ``topic`` (``acks=all``, short linger), key = tenant."""

    def __init__(self, bootstrap: str, topic: str = TOKEN_EVENTS_TOPIC, **overrides: Any) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._overrides = overrides
        self._producer: Any = None

    async def start(self) -> None:
        from .. import kafka

        await kafka.ensure_topics(self.bootstrap, [self.topic])
        opts = {"linger_ms": 5, **self._overrides}
        self._producer = kafka.producer(self.bootstrap, **opts)
        await kafka.start(self._producer, "token-event producer")

    async def send_many(self, events: Sequence[TokenEvent]) -> list[Awaitable[Any]]:
        """One record batch per partition (:func:`tokenmill.kafka.send_batched`)."""
        from .. import kafka

        records = [(self.topic, e.tenant.encode(), e.to_bytes()) for e in events]
        futures = await kafka.send_batched(self._producer, records)
        for fut in set(futures):
            fut.add_done_callback(_log_failure)
        return list(futures)

    async def close(self) -> None:
        if self._producer is not None:
            try:
                await self._producer.flush()
            finally:
                await self._producer.stop()
            self._producer = None


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("token event not delivered", error=repr(fut.exception()))


class MemorySink:
    """Keeps events in a list (tests, and ``--events none`` runs)."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    async def start(self) -> None:
        return None

    async def send_many(self, events: Sequence[TokenEvent]) -> list[Awaitable[Any]]:
        self.events.extend(events)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [done] * len(events)

    async def close(self) -> None:
        return None

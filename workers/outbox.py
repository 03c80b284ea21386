"""The host's outbox: token events and stream deltas, sent in order and in batches.

Everything the host emits goes through one queue drained by one task, so events of a
request reach Kafka in the order they were made, stream deltas reach Redis before the
stream's ``end`` entry (:meth:`Outbox.barrier`), and a terminal event can be awaited
until the broker acknowledged it (:meth:`Outbox.deliver`). Each drain writes all queued
deltas in one Redis pipeline, and all queued events as one record batch per partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aredis

from ..errors import StackError
from ..logs import get_logger
from ..wire import TokenEvent
from .events import EventSink
from .results import ResultStore

__all__ = ["Outbox"]

log = get_logger(__name__)


class Outbox:
    def __init__(self, sink: EventSink, store: ResultStore, redis: aredis.Redis) -> None:
        self.sink = sink
        self.store = store
        self.redis = redis
        self._queue: list[tuple[Any, ...]] = []
        self._kick = asyncio.Event()

    def emit(self, event: TokenEvent) -> None:
        """Queue ``event`` (fire and forget; failures are logged)."""
        self._queue.append(("event", event, None))
        self._kick.set()

    def delta(self, request_id: str, text: str, completion_tokens: int) -> None:
        """Queue a stream ``delta`` entry for a streaming request."""
        self._queue.append(("delta", request_id, text, completion_tokens))
        self._kick.set()

    async def deliver(self, event: TokenEvent) -> None:
        """Send ``event`` after everything queued before it; wait for the broker's ack.

        Raises:
            StackError: Kafka did not take it.
        """
        await self.deliver_many([event])

    async def deliver_many(self, events: list[TokenEvent]) -> None:
        """:meth:`deliver` for several events, with one wait for all of their acks."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.extend(("event", event, done) for event in events)
        self._kick.set()
        await done

    async def barrier(self) -> None:
        """Wait until everything queued so far is written (deltas) or queued (events)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(("barrier", done))
        self._kick.set()
        await done

    async def run(self) -> None:
        """Drain the queue forever (the host runs this as a task)."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            batch, self._queue = self._queue, []
            delta_error = await self._write_deltas([i for i in batch if i[0] == "delta"])
            events: list[tuple[TokenEvent, asyncio.Future[Any] | None]] = []
            for item in batch:
                if item[0] == "event":
                    events.append((item[1], item[2]))
                elif item[0] == "barrier":
                    await self._send(events)  # what came before the barrier is queued
                    events = []
                    if item[1].done():
                        continue
                    if delta_error is not None:
                        item[1].set_exception(StackError(f"Redis: {delta_error!r}"))
                    else:
                        item[1].set_result(None)
            await self._send(events)

    async def _write_deltas(self, deltas: list[tuple[Any, ...]]) -> BaseException | None:
        if not deltas:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for _, rid, text, tokens in deltas:
            self.store.add_delta(pipe, rid, text, tokens)
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - reported to barriers
            log.error("stream deltas not written", error=repr(exc))
            return exc
        return None

    async def _send(self, events: list[tuple[TokenEvent, asyncio.Future[Any] | None]]) -> None:
        if not events:
            return
        try:
            deliveries = await self.sink.send_many([event for event, _ in events])
        except Exception as exc:  # noqa: BLE001 - reported to the waiters
            log.error("token events not queued", count=len(events), error=repr(exc))
            for _, waiter in events:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
            return
        # A sink hands the same future to every event of one record batch, and a waiter
        # may wait for many events: one callback per waiter, on its distinct batches.
        batches: dict[int, tuple[asyncio.Future[Any], dict[int, Awaitable[Any]]]] = {}
        for (_, waiter), delivered in zip(events, deliveries):
            if waiter is not None:
                batches.setdefault(id(waiter), (waiter, {}))[1][id(delivered)] = delivered
        for waiter, delivered_by in batches.values():
            _resolve_when_delivered(waiter, list(delivered_by.values()))


def _resolve_when_delivered(waiter: asyncio.Future[Any], deliveries: list[Awaitable[Any]]) -> None:
    src = (
        asyncio.ensure_future(deliveries[0])
        if len(deliveries) == 1
        else asyncio.gather(*deliveries)
    )

    def copy(f: asyncio.Future[Any]) -> None:
        if waiter.done():
            return
        if f.cancelled():
            waiter.set_exception(StackError("token event delivery was cancelled"))
        elif f.exception() is not None:
            waiter.set_exception(StackError(f"Kafka: token event not delivered: {f.exception()!r}"))
        else:
            waiter.set_result(None)

    src.add_done_callback(copy)

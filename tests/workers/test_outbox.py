"""The host's outbox: one wait covers every record batch its events went out in, and a
failed batch fails exactly the waiters that have events in it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
import redis.asyncio as aredis
from tokenmill.workers.outbox import Outbox
from tokenmill.workers.results import ResultStore

from tokenmill.errors import StackError
from tokenmill.wire import EventKind, TokenEvent


class PerTenantBatches:
    """A sink whose record batches are per tenant (as Kafka's are per partition) and
    complete when the test says so."""

    def __init__(self) -> None:
        self.sent: list[TokenEvent] = []
        self.batches: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        return None

    async def send_many(self, events: Sequence[TokenEvent]) -> list[Awaitable[Any]]:
        self.sent.extend(events)
        loop = asyncio.get_running_loop()
        return [self.batches.setdefault(e.tenant, loop.create_future()) for e in events]

    async def close(self) -> None:
        return None


def event(tenant: str, n: int, kind: EventKind = EventKind.finished) -> TokenEvent:
    return TokenEvent(kind=kind, request_id=f"r{n}", tenant=tenant, model="m", finished_at=1.0)


def run_with_outbox(redis_url: str, body: Any) -> Any:
    async def main() -> Any:
        client = aredis.Redis.from_url(redis_url)
        sink = PerTenantBatches()
        outbox = Outbox(sink, ResultStore(client), client)  # type: ignore[arg-type]
        drain = asyncio.create_task(outbox.run())
        try:
            return await asyncio.wait_for(body(outbox, sink), 10)
        finally:
            drain.cancel()
            await client.aclose()

    return asyncio.run(main())


def test_one_wait_covers_every_batch_and_keeps_order(redis_url: str) -> None:
    async def body(outbox: Outbox, sink: PerTenantBatches) -> None:
        outbox.emit(event("a", 0, EventKind.dispatched))
        waiting = asyncio.create_task(outbox.deliver_many([event("a", 1), event("b", 2)]))
        while len(sink.batches) < 2:
            await asyncio.sleep(0.001)
        assert [e.request_id for e in sink.sent] == ["r0", "r1", "r2"]
        sink.batches["a"].set_result(None)
        await asyncio.sleep(0.01)
        assert not waiting.done()  # tenant b's batch is not acknowledged yet
        sink.batches["b"].set_result(None)
        await waiting

    run_with_outbox(redis_url, body)


def test_a_failed_batch_fails_only_its_waiters(redis_url: str) -> None:
    async def body(outbox: Outbox, sink: PerTenantBatches) -> None:
        both = asyncio.create_task(outbox.deliver_many([event("a", 1), event("b", 2)]))
        only_a = asyncio.create_task(outbox.deliver(event("a", 3)))
        while len(sink.batches) < 2:
            await asyncio.sleep(0.001)
        sink.batches["a"].set_result(None)
        sink.batches["b"].set_exception(RuntimeError("broker down"))
        await only_a
        with pytest.raises(StackError, match="not delivered.*broker down"):
            await both

    run_with_outbox(redis_url, body)

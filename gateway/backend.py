"""The services behind the gateway, as the routes need them: publish a request for a
tenant, wait for or stream its outcome, cancel it, and say whether all is reachable.

The gateway records the tenant it accepted each request for (``tokenmill:owner:<id>``)
before publishing it, so a stream or cancel of an id is checked against its owner even
before it has a result; a result carries its tenant too. Another tenant's id answers
exactly as an unknown one does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from sqlalchemy import text

from .. import kafka, wire
from ..config import Settings
from ..errors import StackError
from ..producers.waiter import ResultWaiter
from ..redis_client import async_redis
from ..stack import Endpoints
from ..workers import keys
from ..workers.cancel import request_cancel_async
from ..workers.results import RESULT_TTL_S, StreamItem, get_result_async, stream_events_async

__all__ = ["Backend", "RateLimited"]

#: the window of ``requests_per_min``, shared by every gateway copy through Redis
_WINDOW_S = 60
#: Redis connections one gateway may hold; more callers wait for one
_REDIS_CONNECTIONS = 64


class RateLimited(Exception):
    """Over the tenant's request rate; ``retry_after`` seconds until the window turns."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited for {retry_after:.0f}s")
        self.retry_after = retry_after


class _Coalescer:
    """Redis commands of concurrent requests, sent as one pipeline per event-loop turn:
    a round trip per HTTP request cost the gateway more than the rest of its work."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[list[Any]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands`` (``("set", key, value, ttl)`` or ``(name, *args)``).

        Raises:
            StackError: Redis failed.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((commands, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[tuple[Any, ...]], asyncio.Future[list[Any]]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for commands, _ in batch:
            for name, *args in commands:
                if name == "set":
                    pipe.set(args[0], args[1], ex=args[2])
                else:
                    getattr(pipe, name)(*args)
        try:
            replies = await pipe.execute()
        except RedisError as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StackError(f"Redis: cannot record requests: {exc!r}"))
            return
        at = 0
        for commands, fut in batch:
            if not fut.done():
                fut.set_result(replies[at : at + len(commands)])
            at += len(commands)


class Backend:
    """Kafka, Redis and the ledger, for one gateway process."""

    def __init__(self, settings: Settings, ep: Endpoints) -> None:
        self.settings = settings
        self.endpoints = ep
        self.producer = kafka.producer(ep.kafka_bootstrap)
        self.redis = async_redis(ep.redis_url, blocking=True, max_connections=_REDIS_CONNECTIONS)
        self._writes = _Coalescer(self.redis)
        self._waiters: dict[str, ResultWaiter] = {}
        self._ledger: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
        await kafka.start(self.producer, "gateway producer")

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for waiter in self._waiters.values():
            await waiter.close()
        await self.producer.stop()
        await self.redis.aclose()

    @property
    def ledger(self) -> Any:
        """The ledger's session factory (made on first use)."""
        if self._ledger is None:
            from ..ledger import shared_factory

            self._ledger = shared_factory(self.settings.ledger_url)
        return self._ledger

    # -- requests ------------------------------------------------------------------

    async def submit(self, requests: Sequence[wire.InferenceRequest]) -> None:
        """Count the requests against their tenant's rate, record each one's owner, then
        publish; returns once Kafka has them all. One Redis round trip for the first two.

        Raises:
            RateLimited: over the tenant's ``requests_per_min``; nothing was published.
            StackError: Redis or Kafka did not take them (nothing is promised to the caller).
        """
        tenant = requests[0].tenant
        limit = self.settings.tenants[tenant].rate_limit
        per_min = limit.requests_per_min if limit is not None else None
        now = time.time()
        window = int(now // _WINDOW_S)
        commands: list[tuple[Any, ...]] = []
        if per_min is not None:
            key = f"{keys.PREFIX}gateway-rate:{tenant}:{window}"
            commands += [("incrby", key, len(requests)), ("expire", key, _WINDOW_S * 2)]
        commands += [("set", keys.owner(req.id), req.tenant, RESULT_TTL_S) for req in requests]
        replies = await self._writes.run(commands)
        if per_min is not None and replies[0] > per_min:
            # The owner keys of refused ids expire unused: the caller never learns them.
            raise RateLimited(max(1.0, (window + 1) * _WINDOW_S - now))
        await kafka.publish(self.producer, [(r.priority.topic, r.tenant.encode(), r.to_bytes()) for r in requests])

    async def owns(self, tenant: str, request_id: str) -> bool:
        """Whether ``request_id`` was accepted for ``tenant``."""
        try:
            owner = await self.redis.get(keys.owner(request_id))
        except RedisError as exc:
            raise StackError(f"Redis: cannot read the request's owner: {exc!r}") from exc
        return owner is not None and owner.decode() == tenant

    async def wait(self, tenant: str, request_id: str, timeout: float) -> wire.Result | None:
        """The request's result once stored (None after ``timeout`` seconds)."""
        waiter = self._waiters.get(tenant)
        if waiter is None:
            waiter = self._waiters[tenant] = ResultWaiter(self.redis, tenant)
        found = await waiter.wait(request_id, timeout)
        return found if found is None or found.tenant == tenant else None

    async def result(self, tenant: str, request_id: str) -> wire.Result | None:
        try:
            found = await get_result_async(self.redis, request_id)
        except RedisError as exc:
            raise StackError(f"Redis: cannot read the result: {exc!r}") from exc
        return found if found is None or found.tenant == tenant else None

    def events(self, request_id: str, timeout: float) -> AsyncIterator[StreamItem]:
        """The request's stream entries (deltas, then ``end``); check ownership first."""
        return stream_events_async(self.redis, request_id, timeout_s=timeout)

    async def cancel(self, tenant: str, request_id: str) -> None:
        """Stop the request: the flag reaches its worker, the control message the
        scheduler (which checks the tenant again). Call only for the owner."""
        msg = wire.ControlMessage(kind=wire.ControlKind.cancel, request_id=request_id, tenant=tenant)
        try:
            await request_cancel_async(self.redis, request_id)
            await self.producer.send_and_wait(wire.CONTROL_TOPIC, msg.to_bytes(), key=tenant.encode())
        except (RedisError, KafkaError) as exc:
            raise StackError(f"cannot cancel {request_id}: {exc!r}") from exc

    def cancel_soon(self, tenant: str, request_id: str) -> None:
        """:meth:`cancel` from code that is being cancelled itself (a client went away)."""
        task = asyncio.get_running_loop().create_task(self.cancel(tenant, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- health ---------------------------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        """``"ok"`` or the reason, for Kafka, Redis and the ledger."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.producer.client.fetch_all_metadata(), 2.0)
            checks["kafka"] = "ok"
        except (KafkaError, TimeoutError, OSError) as exc:
            checks["kafka"] = type(exc).__name__
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
            checks["redis"] = "ok"
        except (RedisError, TimeoutError, OSError) as exc:
            checks["redis"] = type(exc).__name__
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ledger_ping), 2.0)
            checks["ledger"] = "ok"
        except Exception as exc:  # noqa: BLE001 (any driver error means not ready)
            checks["ledger"] = type(exc).__name__
        return checks

    def _ledger_ping(self) -> None:
        with self.ledger() as session:
            session.execute(text("SELECT 1"))

"""The services behind the gateway, as the routes need them: publish a request for a
tenant, wait for or stream its outcome, cancel it, and say whether all is reachable.

The gateway records the tenant it accepted each request for (``tokenmill:owner:<id>``)
before publishing it, so a stream or cancel of an id is checked against its owner even
before it has a result; a result carries its tenant too. Another tenant's id answers
exactly as an unknown one does.

A caller waiting on a lost service hears about it within seconds, as
:class:`~tokenmill.stack.errors.ServiceUnavailable` naming it (503): Redis — the
:class:`ResultWaiter` fails every wait once Redis has been unreachable for a few
seconds; Kafka — when the broker comes back without the request topics (an embedded
broker restarted empty) or, for the embedded broker (which keeps its data in memory
only), stops answering for :data:`BROKER_LOST_S`, the requests waited for that no
scheduler has dispatched yet (no dispatched mark in Redis) are lost with it and their
waits fail; dispatched ones run on and keep waiting. A configured (durable) Kafka that
is unreachable for a while loses nothing, so its callers keep waiting: failing them
would invite a second submission of work that still runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from sqlalchemy import text

from .. import kafka, wire
from ..config import Settings
from ..errors import StackError
from ..logs import get_logger
from ..producers.waiter import ResultWaiter
from ..redis_client import async_redis
from ..stack import Endpoints
from ..stack.errors import ServiceUnavailable
from ..workers import keys
from ..workers.cancel import request_cancel_async
from ..workers.results import RESULT_TTL_S, StreamItem, get_result_async, stream_events_async

__all__ = ["Backend", "RateLimited"]

#: the window of ``requests_per_min``, shared by every gateway copy through Redis
_WINDOW_S = 60
#: Redis connections one gateway may hold; more callers wait for one
_REDIS_CONNECTIONS = 64
#: how often the gateway asks the broker for metadata
BROKER_CHECK_S = 1.0
#: how long the broker may not answer before undispatched requests count as lost
BROKER_LOST_S = 5.0
#: ids of lost requests remembered, so a later wait or poll for one fails at once too
_LOST_KEPT = 100_000

log = get_logger(__name__)


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
                    fut.set_exception(_redis_lost("cannot record the request", exc))
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
        self._lost: OrderedDict[str, ServiceUnavailable] = OrderedDict()
        self._watch: asyncio.Task[None] | None = None
        #: the embedded broker keeps its data in memory: unreachable means lost
        self._broker_in_memory = not settings.kafka_url

    async def start(self) -> None:
        await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
        await kafka.start(self.producer, "gateway producer")
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_broker(), name="tokenmill-broker-watch"
        )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
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
        records = [(r.priority.topic, r.tenant.encode(), r.to_bytes()) for r in requests]
        try:
            await kafka.publish(self.producer, records)
        except StackError as exc:
            raise ServiceUnavailable("Kafka", "did not accept the request", detail=str(exc)) from exc

    async def owns(self, tenant: str, request_id: str) -> bool:
        """Whether ``request_id`` was accepted for ``tenant``."""
        try:
            owner = await self.redis.get(keys.owner(request_id))
        except RedisError as exc:
            raise _redis_lost("cannot read the request's owner", exc) from exc
        return owner is not None and owner.decode() == tenant

    async def wait(self, tenant: str, request_id: str, timeout: float) -> wire.Result | None:
        """The request's result once stored (None after ``timeout`` seconds).

        Raises:
            ServiceUnavailable: Redis is unreachable, or the broker was lost before the
                request was dispatched.
        """
        self._raise_if_lost(request_id)
        waiter = self._waiters.get(tenant)
        if waiter is None:
            waiter = self._waiters[tenant] = ResultWaiter(self.redis, tenant)
        found = await waiter.wait(request_id, timeout)
        return found if found is None or found.tenant == tenant else None

    async def result(self, tenant: str, request_id: str) -> wire.Result | None:
        try:
            found = await get_result_async(self.redis, request_id)
        except RedisError as exc:
            raise _redis_lost("cannot read the result", exc) from exc
        if found is None:
            self._raise_if_lost(request_id)
        return found if found is None or found.tenant == tenant else None

    async def events(self, request_id: str, timeout: float) -> AsyncIterator[StreamItem]:
        """The request's stream entries (deltas, then ``end``); check ownership first.

        Raises:
            ServiceUnavailable: Redis failed, or the request was lost with the broker.
        """
        self._raise_if_lost(request_id)
        try:
            async for item in stream_events_async(self.redis, request_id, timeout_s=timeout):
                yield item
        except RedisError as exc:
            raise _redis_lost("cannot read the request's tokens", exc) from exc

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

    # -- a lost broker ----------------------------------------------------------------

    def _raise_if_lost(self, request_id: str) -> None:
        lost = self._lost.get(request_id)
        if lost is not None:
            raise lost

    async def _watch_broker(self) -> None:
        """Ask the broker for metadata every :data:`BROKER_CHECK_S`; fail the waits of
        undispatched requests when it stays away or comes back without its topics."""
        failing_since: float | None = None
        while True:
            await asyncio.sleep(BROKER_CHECK_S)
            try:
                metadata = await asyncio.wait_for(
                    self.producer.client.fetch_all_metadata(), BROKER_CHECK_S * 2
                )
            except (KafkaError, TimeoutError, OSError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if self._broker_in_memory and now - failing_since >= BROKER_LOST_S:
                    await self._broker_lost(
                        f"is unreachable (for {now - failing_since:.0f}s)", repr(exc)
                    )
                continue
            failing_since = None
            missing = sorted(set(wire.REQUEST_TOPICS) - metadata.topics())
            if missing:
                await self._broker_lost("was restarted without its queued requests", str(missing))
                try:  # so that new requests can be taken again
                    await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
                except (KafkaError, TimeoutError, OSError, StackError) as exc:
                    log.warning("request topics not recreated", error=repr(exc))

    async def _broker_lost(self, how: str, detail: str) -> None:
        """Fail the waits of the requests no scheduler dispatched yet: they were only in
        the broker. Dispatched ones are running; their results come through Redis."""
        waiting = {rid: w for w in self._waiters.values() for rid in w.pending()}
        if not waiting:
            return
        try:
            marks = await self.redis.mget([keys.dispatched(rid) for rid in waiting])
        except RedisError:
            return  # the waiters fail on their own while Redis is unreachable
        lost = [rid for rid, mark in zip(waiting, marks, strict=True) if mark is None]
        log.error("kafka lost; failing undispatched requests", broker=how, lost=len(lost),
                  dispatched=len(waiting) - len(lost), detail=detail)
        for rid in lost:
            exc = ServiceUnavailable(
                "Kafka", f"{how}: the request was not dispatched yet and is lost; submit it again",
                detail=detail,
            )
            self._lost[rid] = exc
            waiting[rid].fail([rid], exc)
        while len(self._lost) > _LOST_KEPT:
            self._lost.popitem(last=False)

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


def _redis_lost(what: str, exc: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable("Redis", f"is unreachable: {what}", detail=repr(exc))

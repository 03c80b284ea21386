"""The services behind the gateway, as the routes need them: publish a request for a
tenant, wait for or stream its outcome, cancel it, and say whether all is reachable.

The gateway records the tenant it accepted each request for (``tokenmill:owner:<id>``)
before publishing it, so a stream or cancel of an id is checked against its owner even
before it has a result; a result carries its tenant too. Another tenant's id answers
exactly as an unknown one does.

A caller waiting on a lost service hears about it within seconds, as
:class:`~tokenmill.stack.errors.ServiceUnavailable` naming it (503): Redis — the
:class:`ResultWaiter` fails every wait once Redis has been unreachable for a few
seconds; Kafka — see below.

The embedded broker keeps its data in memory only, so when it stops answering for
:data:`BROKER_LOST_S` (or any broker comes back without the request topics) the
requests no scheduler has dispatched yet (no dispatched mark in Redis) are lost with it.
Each one this gateway accepted (it remembers, in memory and bounded, the requests it
published and has not seen finish) gets a terminal ``failed`` result, code
``broker_lost``, through the result store, and its cancel flag: any later wait or poll,
on any gateway copy and after a restart, finds that result at once; its webhook fires
once with it; it never runs later, and with no tokens it is never billed. While the
embedded broker stays unreachable, every wait for a request with no result fails at
once (:class:`BrokerLost`) and new submissions are refused: a dispatched request's
worker cannot report without Kafka. The routes say what that means for the caller: a
chat or completion is cancelled (nobody will read its answer; it is billed only the
work done), a request API caller may poll again once the stack is back.

A Kafka of your own (configured, not run by ``tokenmill up``) that is unreachable for
a while loses nothing, so its callers keep waiting: failing them would invite a second
submission of work that still runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from sqlalchemy import text

from .. import kafka, wire
from ..config import Settings
from ..errors import ConfigError, StackError
from ..logs import get_logger
from ..producers.waiter import ResultWaiter
from ..redis_client import async_redis
from ..stack import Endpoints
from ..stack.builtin import KAFKA
from ..stack.errors import ServiceUnavailable
from ..stack.state import StackState, state_path
from ..stack.urls import normalize_kafka_url
from ..workers import keys
from ..workers.cancel import request_cancel_async, request_cancel_many_async
from ..workers.results import (
    RESULT_TTL_S,
    ResultStore,
    StreamItem,
    get_result_async,
    stream_events_async,
)
from ..workers.webhook_watch import WATCH_KEY, watch_notes

__all__ = ["BROKER_LOST_CODE", "Backend", "BrokerLost", "RateLimited"]

#: the window of ``requests_per_min``, shared by every gateway copy through Redis
_WINDOW_S = 60
#: Redis connections one gateway may hold; more callers wait for one
_REDIS_CONNECTIONS = 64
#: how often the gateway asks the broker for metadata
BROKER_CHECK_S = 1.0
#: how long the embedded broker may not answer before it counts as lost
BROKER_LOST_S = 5.0
#: the error code of the result of a request lost with the broker
BROKER_LOST_CODE = "broker_lost"
#: requests accepted and not seen finished, remembered per gateway process (the oldest
#: are forgotten first: the likeliest to be dispatched or done long ago)
_ACCEPTED_KEPT = 100_000
#: ids per Redis round trip when a lost broker's requests are sorted out
_LOST_CHUNK = 2000

log = get_logger(__name__)


class RateLimited(Exception):
    """Over the tenant's request rate; ``retry_after`` seconds until the window turns."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited for {retry_after:.0f}s")
        self.retry_after = retry_after


class BrokerLost(ServiceUnavailable):
    """The broker was lost while the request had no result. ``dispatched``: a scheduler
    had handed it to a worker, which may still finish it once the stack is back;
    otherwise it is lost and its result says so."""

    def __init__(self, how: str, detail: str, *, dispatched: bool) -> None:
        outcome = (
            "the request was dispatched before and may still finish once the stack is back; "
            "poll its result again later"
            if dispatched
            else "the request was not dispatched yet and is lost; submit it again"
        )
        super().__init__("Kafka", f"{how}: {outcome}", detail=detail)
        self.how = how
        self.dispatched = dispatched

    def cancelled(self) -> ServiceUnavailable:
        """The same loss, told to a caller whose dispatched request was cancelled."""
        return ServiceUnavailable(
            "Kafka", f"{self.how}: the request was cancelled (billed only for the work done); "
            "submit it again", detail=self.detail,
        )


class GatewayStopping(ServiceUnavailable):
    """The gateway got SIGTERM: its callers are answered now (503) rather than cut off
    when it exits; their requests go on (a plain completion's is cancelled: nobody will
    read its answer)."""

    def __init__(self) -> None:
        super().__init__("the gateway", "is stopping; poll the request again later")

    def cancelled(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "the gateway", "is stopping: the request was cancelled (billed only for the work "
            "done); submit it again",
        )


class _Accepted(NamedTuple):
    """What a lost request's result and event need, kept from its submission."""

    tenant: str
    model: str
    priority: wire.Priority
    submitted_at: float


class _Loss(NamedTuple):
    how: str
    detail: str


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
        self._store = ResultStore(self.redis)
        #: published by this process, not seen finished: what a lost broker may take
        self._accepted: OrderedDict[str, _Accepted] = OrderedDict()
        #: set while the embedded broker is lost (unreachable for BROKER_LOST_S)
        self._loss: _Loss | None = None
        self._watch: asyncio.Task[None] | None = None
        #: set on SIGTERM (see :meth:`stopping`)
        self._stopping = False

    async def start(self) -> None:
        await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
        await kafka.start(self.producer, "gateway producer")
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_broker(), name="tokenmill-broker-watch"
        )

    def stopping(self) -> None:
        """The process got SIGTERM: end every wait now with :class:`GatewayStopping`, so
        each caller gets a 503 before the server exits instead of a cut connection."""
        self._stopping = True
        exc = GatewayStopping()
        for waiter in self._waiters.values():
            waiter.fail(list(waiter.pending()), exc)

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
        if self._loss is not None:
            raise ServiceUnavailable(
                "Kafka", f"{self._loss.how}: the request was not accepted; retry once it is back",
                detail=self._loss.detail,
            )
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
        # Noted before publishing: a request's webhook must not depend on the broker
        # keeping the request until the watcher reads it.
        commands += [("hset", WATCH_KEY, rid, note) for rid, note in watch_notes(requests).items()]
        replies = await self._writes.run(commands)
        if per_min is not None and replies[0] > per_min:
            # The owner keys of refused ids expire unused: the caller never learns them.
            raise RateLimited(max(1.0, (window + 1) * _WINDOW_S - now))
        records = [(r.priority.topic, r.tenant.encode(), r.to_bytes()) for r in requests]
        try:
            await kafka.publish(self.producer, records)
        except StackError as exc:
            raise ServiceUnavailable("Kafka", "did not accept the request", detail=str(exc)) from exc
        for r in requests:
            self._accepted[r.id] = _Accepted(r.tenant, r.model, r.priority, r.submitted_at)
        while len(self._accepted) > _ACCEPTED_KEPT:
            self._accepted.popitem(last=False)

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
            ServiceUnavailable: Redis is unreachable.
            BrokerLost: the embedded broker is lost and the request has no result.
        """
        if self._stopping:
            raise GatewayStopping()
        if self._loss is not None:
            found = await self._while_lost(request_id)
        else:
            waiter = self._waiters.get(tenant)
            if waiter is None:
                waiter = self._waiters[tenant] = ResultWaiter(self.redis, tenant)
            found = await waiter.wait(request_id, timeout)
        return self._seen(tenant, found)

    async def result(self, tenant: str, request_id: str) -> wire.Result | None:
        """The request's result if stored (None while it has none).

        Raises:
            ServiceUnavailable: Redis is unreachable.
            BrokerLost: the embedded broker is lost and the request has no result.
        """
        try:
            found = await get_result_async(self.redis, request_id)
        except RedisError as exc:
            raise _redis_lost("cannot read the result", exc) from exc
        if found is None and self._loss is not None:
            found = await self._while_lost(request_id)
        return self._seen(tenant, found)

    def _seen(self, tenant: str, found: wire.Result | None) -> wire.Result | None:
        if found is None:
            return None
        self._accepted.pop(found.request_id, None)
        return found if found.tenant == tenant else None

    async def events(self, request_id: str, timeout: float) -> AsyncIterator[StreamItem]:
        """The request's stream entries (deltas, then ``end``); check ownership first.

        Raises:
            ServiceUnavailable: Redis failed.
            BrokerLost: the embedded broker was lost before the request ended.
        """
        ended = False
        try:
            async for item in stream_events_async(
                self.redis, request_id, timeout_s=timeout, stop=lambda: self._loss is not None
            ):
                ended = item.kind == "end"
                yield item
        except RedisError as exc:
            raise _redis_lost("cannot read the request's tokens", exc) from exc
        if not ended and self._loss is not None:
            found = await self._while_lost(request_id)  # raises unless it has a result
            yield StreamItem(kind="end", status=found.status.value)

    async def cancel(self, tenant: str, request_id: str, *, control: bool = True) -> None:
        """Stop the request: the flag reaches its worker, the control message (unless not
        ``control``: a dispatched request needs none) the scheduler, which checks the
        tenant again. Call only for the owner."""
        msg = wire.ControlMessage(kind=wire.ControlKind.cancel, request_id=request_id, tenant=tenant)
        try:
            await request_cancel_async(self.redis, request_id)
            if control:
                await self.producer.send_and_wait(wire.CONTROL_TOPIC, msg.to_bytes(), key=tenant.encode())
        except (RedisError, KafkaError) as exc:
            raise StackError(f"cannot cancel {request_id}: {exc!r}") from exc

    def cancel_soon(self, tenant: str, request_id: str, *, control: bool = True) -> None:
        """:meth:`cancel` from code that is being cancelled itself (a client went away)."""
        task = asyncio.get_running_loop().create_task(self._cancel_logged(tenant, request_id, control))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_logged(self, tenant: str, request_id: str, control: bool) -> None:
        try:
            await self.cancel(tenant, request_id, control=control)
        except StackError as exc:  # nobody awaits it: say so in the log
            log.warning("request not cancelled", request_id=request_id, error=str(exc))

    # -- a lost broker ----------------------------------------------------------------

    async def _while_lost(self, request_id: str) -> wire.Result:
        """The request's result if it has one now; else the :class:`BrokerLost` for it.

        Raises:
            ServiceUnavailable: Redis is unreachable.
            BrokerLost: no result (yet).
        """
        loss = self._loss or _Loss("was lost", "")
        try:
            raw, mark = await self.redis.mget([keys.result(request_id), keys.dispatched(request_id)])
        except RedisError as exc:
            raise _redis_lost("cannot read the result", exc) from exc
        if raw is not None:
            return wire.decode(wire.Result, raw)
        raise BrokerLost(loss.how, loss.detail, dispatched=mark is not None)

    async def _watch_broker(self) -> None:
        """Ask the broker for metadata every :data:`BROKER_CHECK_S`; settle the requests
        lost with it when the embedded one stays away or any comes back without its topics."""
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
                if (
                    now - failing_since >= BROKER_LOST_S
                    and (self._loss is not None or await asyncio.to_thread(self._broker_in_memory))
                ):
                    if self._loss is None:
                        self._loss = _Loss(f"is unreachable (for {now - failing_since:.0f}s)", repr(exc))
                        log.error("kafka lost: the embedded broker keeps its data in memory",
                                  broker=self._loss.how, detail=repr(exc))
                    await self._broker_lost(self._loss)
                continue
            failing_since = None
            missing = sorted(set(wire.REQUEST_TOPICS) - metadata.topics())
            if missing:
                loss = _Loss("was restarted without its queued requests", str(missing))
                if await self._broker_lost(loss):
                    try:  # so that new requests can be taken again
                        await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
                    except (KafkaError, TimeoutError, OSError, StackError) as exc:
                        log.warning("request topics not recreated", error=repr(exc))
                        continue
            if self._loss is not None:
                log.info("kafka is back", after=self._loss.how)
            self._loss = None

    def _broker_in_memory(self) -> bool:
        """Whether Kafka is the stack's embedded broker, which keeps its data in memory
        only: unreachable means lost. The setting alone cannot tell (``tokenmill up``
        hands every service the embedded broker's address as ``TOKENMILL_KAFKA_URL``);
        the stack's state file records the broker it runs. Read, never repaired, here."""
        if not self.settings.kafka_url:
            return True
        try:
            recorded = StackState.model_validate_json(state_path(self.settings.home).read_bytes())
        except (OSError, ValueError):
            return False
        broker = recorded.service(KAFKA)
        try:
            return broker is not None and (
                normalize_kafka_url(broker.address) == self.endpoints.kafka_bootstrap
            )
        except ConfigError:
            return False

    async def _broker_lost(self, loss: _Loss) -> bool:
        """Settle what the broker took: each accepted request with no dispatched mark gets
        a terminal ``broker_lost`` result and a cancel flag (so it can never run later);
        the waits for them fail, and while the broker stays away (``self._loss``) so do
        the waits for dispatched ones. Returns False if Redis failed (try again later)."""
        waiting = {rid: w for w in self._waiters.values() for rid in w.pending()}
        ids = list(dict.fromkeys([*waiting, *self._accepted]))
        lost: list[str] = []
        try:
            for at in range(0, len(ids), _LOST_CHUNK):
                chunk = ids[at : at + _LOST_CHUNK]
                marks = await self.redis.mget([keys.dispatched(rid) for rid in chunk])
                lost += [rid for rid, mark in zip(chunk, marks, strict=True) if mark is None]
            settled = [rid for rid in lost if rid in self._accepted]
            await request_cancel_many_async(self.redis, settled)  # before the result: never runs
            committed = await self._store.commit_many(
                [self._lost_outcome(rid, self._accepted[rid], loss) for rid in settled]
            )
        except RedisError as exc:  # the waiters fail on their own while Redis is unreachable
            log.warning("requests lost with kafka not settled yet", error=repr(exc))
            return False
        if ids:
            log.error("kafka lost; requests settled", broker=loss.how, accepted=len(self._accepted),
                      undispatched=len(lost), failed=sum(committed), waiting=len(waiting),
                      detail=loss.detail)
        for rid in ids:  # settled, or dispatched: nothing more to do for them here
            self._accepted.pop(rid, None)
        lost_set = set(lost)
        for rid, waiter in waiting.items():
            if rid in lost_set or self._loss is not None:
                waiter.fail([rid], BrokerLost(loss.how, loss.detail, dispatched=rid not in lost_set))
        return True

    @staticmethod
    def _lost_outcome(rid: str, acc: _Accepted, loss: _Loss) -> tuple[wire.Result, wire.TokenEvent]:
        """The failed result and terminal event of a request lost with the broker: no tokens,
        so never billed (the event stays in the result store, where reconciliation reads it)."""
        now = time.time()
        message = (f"Kafka (the message broker) {loss.how} and lost the request before it was "
                   "dispatched; submit it again")
        event = wire.TokenEvent(
            kind=wire.EventKind.failed, request_id=rid, tenant=acc.tenant, model=acc.model,
            priority=acc.priority, ts=now, submitted_at=acc.submitted_at, finished_at=now,
            reason=f"{BROKER_LOST_CODE}: {message}",
        )
        result = wire.Result(
            request_id=rid, tenant=acc.tenant, model=acc.model, status=wire.ResultStatus.failed,
            error=wire.ErrorInfo(code=BROKER_LOST_CODE, message=message), finished_at=now,
        )
        return result, event

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

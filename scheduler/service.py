"""The scheduler service: a thin async loop around the pure :class:`Scheduler` policy.

It reads the priority topics (and the control topic for cancels), feeds the policy,
reads worker heartbeats for capacity, and dispatches slices of requests into free
capacity only, so worker queues stay short and fairness is decided here. It settles
budgets and frees capacity from the workers' terminal token events.

Restart safety (at-least-once, idempotent):

* request-topic offsets are committed only below the lowest undispatched request
  (:mod:`.offsets`), so nothing accepted is lost;
* a slice is dispatched by one Lua call that marks its requests dispatched (a key
  with a TTL holding the leader's fencing token), writes their in-flight records
  (reservations) and pushes the Celery message (:mod:`.publish`), all or nothing; a
  re-read request with that mark is skipped, so nothing runs twice, and a restart
  after SIGKILL still holds every reservation. Counters and rate-limit levels are
  snapshotted every 2 s.
* only the scheduler holding the pool set's lease acts (:mod:`.leader`); the others
  wait as standbys and consume nothing. Every dispatch and every snapshot or in-flight
  write checks the lease in the same Lua call (the fence), so a leader paused past its
  lease writes nothing when it resumes, and exits.
* budget spending is the ledger's (:mod:`.spending`): read at start and every 2 s,
  plus what was settled here and is not in the ledger yet. A settled request's record
  stays in the hash until the ledger holds its charge, so a restart re-reserves it in
  the meantime.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

import redis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from celery import Celery

from .. import kafka, presence, wire
from ..config import Settings
from ..config.models import BudgetPeriod
from ..errors import ConfigError, SchemaError, TokenmillError
from ..logs import get_logger
from ..pricing import cost as price
from ..redis_client import async_redis
from ..stack import Endpoints
from ..workers import keys as worker_keys
from ..workers.celery_app import celery_priority, create_app
from ..workers.heartbeat import live_workers_async
from ..workers.results import ResultStore
from .deadlines import FORECASTS_KEY, DeadlinePlanner
from .errors import BudgetExceeded, DuplicateRequest, InvalidPolicy, SchedulerError
from .leader import ALL_POOLS, LEASE_TTL_S, POLL_EVERY_S, Fenced, LeaderLease, fenced_script
from .offsets import OffsetTracker
from .policy import Scheduler
from .publish import SlicePublisher
from .snapshot import InFlightRecord, SchedulerSnapshot
from .spending import LedgerReader, Unbilled
from .types import (
    Completion,
    Pool,
    Priority,
    QueuedRequest,
    Rejection,
    SchedulerConfig,
    TenantPolicy,
)

log = get_logger(__name__)

GROUP_ID = "tokenmill-scheduler"
SETTLE_GROUP_ID = "tokenmill-scheduler-settle"
SNAPSHOT_KEY = worker_keys.PREFIX + "scheduler:snapshot"
#: request id -> its in-flight record (JSON), from dispatch until settled and billed
IN_FLIGHT_KEY = worker_keys.PREFIX + "scheduler:in-flight"
#: how often spending is re-read from the ledger
SPENDING_REFRESH_S = 2.0
#: an engine this full takes no more work below interactive (its KV cache is the
#: limit, not its slots)
KV_CACHE_HIGH = 0.95
#: set (short TTL, renewed by housekeeping) while a scheduler is consuming
ALIVE_KEY = worker_keys.PREFIX + "scheduler:alive"
ALIVE_TTL_S = 5
_Arg = bytes | str | int | float  #: a Lua script argument
#: how long a stopping leader waits for its loops to end
STOP_TASKS_S = 5.0
#: long poll of the settle consumer: less idle broker CPU, ~25 ms later capacity
IDLE_FETCH_WAIT_MS = 100
DISPATCHED_TTL_S = 7 * 24 * 3600
# One call dispatches a whole slice, fenced: KEYS: the lease, the in-flight hash, the n
# dispatched marks, then the key of each Celery publish command; ARGV: the lease
# value, mark ttl, fencing token (the marks' value), n, (request id, in-flight record)
# per mark, then (command, payload) per publish command. -1: fenced, nothing written.
_MARK_DISPATCHED = fenced_script("""
local n = tonumber(ARGV[4])
for j = 1, n do
  redis.call('SET', KEYS[2 + j], ARGV[3], 'EX', ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[3 + 2 * j], ARGV[4 + 2 * j])
end
local a = 5 + 2 * n
for i = 3 + n, #KEYS do
  if ARGV[a] == 'LPUSH' then
    redis.call('LPUSH', KEYS[i], ARGV[a + 1])
  else
    redis.call('PUBLISH', KEYS[i], ARGV[a + 1])
  end
  a = a + 2
end
return n
""")
# The checkpoint's writes, fenced: KEYS: the lease, the snapshot, the in-flight hash;
# ARGV: the lease value, the snapshot JSON ('' for none), the number of in-flight fields
# to delete, those fields, then (field, value) pairs to set. -1: fenced, nothing written.
_WRITE_STATE = fenced_script("""
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
local nd = tonumber(ARGV[3])
for i = 4, 3 + nd do redis.call('HDEL', KEYS[3], ARGV[i]) end
for i = 4 + nd, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return 1
""")
#: exact JSON of the non-terminal kinds: TokenEvent has no nested objects, and a quote
#: inside a string value is escaped, so these bytes only ever occur as the kind field
_NOT_TERMINAL = tuple(
    b'"kind":"%s"' % k.value.encode() for k in wire.EventKind if not k.is_terminal
)
#: a daily budget's period: UTC days (monthly ones run per UTC calendar month, the
#: months the ledger's invoices cover)
_DAY_S = 86_400.0


@dataclass
class PricingClock:
    """The instant the policy prices at: a settling request's ``finished_at`` — the
    instant the ledger prices it at, so a price-card change between the two cannot
    make them differ — and now otherwise (reservations)."""

    at: float | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() if self.at is None else self.at, UTC)


# The policy's and the wire's priority enums, mapped by value once (an Enum lookup by
# value per request showed up in the scheduler's profile).
_POLICY_PRIORITY: dict[wire.Priority, Priority] = {p: Priority(p.value) for p in wire.Priority}
_WIRE_PRIORITY: dict[Priority, wire.Priority] = {v: k for k, v in _POLICY_PRIORITY.items()}


def build_policy(settings: Settings, clock: PricingClock | None = None) -> Scheduler:
    """The policy configured from settings, pricing budgets with the price cards."""
    s = settings.scheduler
    clock = clock or PricingClock()

    def cost(
        tenant: str, model: str, input_tokens: int, output_tokens: int, prio: Priority
    ) -> Decimal:
        at = clock.now()
        card = settings.price_card(model, at)
        amount = price(card, input_tokens, output_tokens, _WIRE_PRIORITY[prio])
        if clock.at is None:
            # A reservation: a dearer card may start before the request finishes (and is
            # billed at its finish), so reserve at the dearest of now's and the later ones.
            for later in settings.price_book.versions(model):
                if later.effective_from > at:
                    amount = max(
                        amount, price(later, input_tokens, output_tokens, _WIRE_PRIORITY[prio])
                    )
        return amount

    config = SchedulerConfig(
        w_in=s.w_in,
        w_out=s.w_out,
        interactive_share=s.class_shares.get("interactive", 0.7),
        standard_share=s.class_shares.get("standard", 0.2),
        batch_share=s.class_shares.get("batch", 0.1),
        # About one class step of credit (in weighted tokens / share) per `aging_s` waited.
        aging_rate=10_000.0 / s.aging_s,
        urgency_lead=s.urgency_lead,
    )
    tenants = []
    for name, t in settings.tenants.items():
        rl = t.rate_limit
        period = t.budget.period if t.budget else None
        tenants.append(
            TenantPolicy(
                name=name,
                weight=settings.tenant_weight(name),
                budget=t.budget.amount if t.budget else None,
                budget_period_s=_DAY_S if period is BudgetPeriod.day else None,
                budget_calendar_month=period is BudgetPeriod.month,
                requests_per_min=rl.requests_per_min if rl else None,
                tokens_per_min=rl.tokens_per_min if rl else None,
            )
        )
    return Scheduler(config, cost=cost, tenants=tenants, models=settings.models)


def to_queued(req: wire.InferenceRequest, payload: object) -> QueuedRequest:
    return QueuedRequest(
        request_id=req.id,
        tenant=req.tenant,
        model=req.model,
        priority=_POLICY_PRIORITY[req.priority],
        input_tokens=req.prompt_tokens_estimate,
        max_output_tokens=req.max_tokens,
        enqueued_at=req.submitted_at,
        deadline=req.deadline,
        payload=payload,
    )


@dataclass
class Held:
    """What the service keeps beside a queued request (the policy's opaque payload)."""

    request: wire.InferenceRequest
    tp: TopicPartition
    offset: int
    #: the message as read: dispatched as is, never re-serialized
    raw: bytes


@dataclass
class PoolState:
    name: str
    models: frozenset[str]
    #: slots of the live workers, their interactive headroom included
    capacity: int = 0
    #: slots of ``capacity`` only interactive requests take
    reserved: int = 0
    #: every live worker's engine says it is full (requests waiting inside it, or its
    #: KV cache nearly so): work below interactive would only queue there
    saturated: bool = False
    in_flight: set[str] = field(default_factory=set)
    #: the interactive requests among ``in_flight``
    interactive: set[str] = field(default_factory=set)
    last_dispatch: float = 0.0

    def shared_free(self) -> int:
        """Slots free now for requests below interactive."""
        if self.saturated:
            return 0
        taken = len(self.in_flight) - len(self.interactive)
        return max(
            0, min(self.capacity - len(self.in_flight), self.capacity - self.reserved - taken)
        )


def engine_full(beat: wire.WorkerHeartbeat) -> bool:
    """The worker's engine queues requests or has (nearly) no KV cache left."""
    return bool(beat.engine_waiting) or (beat.kv_cache_usage or 0.0) >= KV_CACHE_HIGH


class SchedulerService:
    """Run with :meth:`run`; stop by setting the event passed to it."""

    def __init__(
        self,
        settings: Settings,
        endpoints: Endpoints,
        *,
        celery_app: Celery | None = None,
        max_slice: int | None = None,
        max_slice_delay_s: float | None = None,
        tick_s: float = 0.002,
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.clock = PricingClock()
        self.policy = build_policy(settings, self.clock)
        self.app = celery_app or create_app(endpoints.redis_url)
        self.max_slice = max_slice or settings.scheduler.max_slice
        self.max_slice_delay_s = (
            settings.scheduler.slice_fill_s if max_slice_delay_s is None else max_slice_delay_s
        )
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        #: this process's claim on the lease (set by run())
        self.lease: LeaderLease | None = None
        self.offsets = OffsetTracker()
        self.pools: dict[str, PoolState] = {}
        for model in settings.models:
            pool = settings.pool_of(model)
            ps = self.pools.setdefault(pool, PoolState(pool, frozenset()))
            ps.models = ps.models | {model}
        self._pool_of_request: dict[str, str] = {}
        #: tenant of each queued request, so a cancel is checked before it touches the queue
        self._owner: dict[str, str] = {}
        #: next offset of each token-events partition that the policy has applied
        self._event_positions: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()
        #: settled here with a cost the ledger does not show yet
        self.unbilled = Unbilled()
        #: settled at no cost: their in-flight records go at the next checkpoint
        self._settled_free: list[str] = []
        #: settled at a cost since the last checkpoint: (request id, tenant, cost)
        self._settled_costly: list[tuple[str, str, Decimal]] = []
        #: in-flight records restored at start, not settled since (may be billed already)
        self._restored: set[str] = set()
        #: reads spending from the ledger (None: no tenant has a budget); set by run()
        self.ledger: LedgerReader | None = None
        self.dispatched_total = 0
        self.slices_total = 0
        self.planner = DeadlinePlanner(
            min_batch_fraction=self.policy.config.share(Priority.BATCH)
            / sum(self.policy.config.share(p) for p in Priority)
        )
        #: per dispatched request: its planning units and whether it is of the batch class
        self._units: dict[str, tuple[float, bool]] = {}
        #: batches whose lines go to the engine marked urgent
        self._urgent_batches: set[str] = set()
        self._at_risk_logged: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Wait as a standby until this process holds the lease, then lead until
        ``stop``.

        Raises:
            Fenced: the lease was lost while leading (the caller exits; a new start
                comes back as a standby).
        """
        await kafka.ensure_topics(self.endpoints.kafka_bootstrap)
        self.redis = async_redis(self.endpoints.redis_url)
        # Renewals on a thread of their own (a busy loop must not lose the lease); a
        # renewal must give up well within the TTL, hence the short timeouts.
        renew_client = redis.Redis.from_url(
            self.endpoints.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        self.lease = LeaderLease(
            self.redis, ALL_POOLS, ttl_s=self.lease_ttl_s, renew_client=renew_client
        )
        announcing = asyncio.Event()
        announcer = asyncio.create_task(
            presence.run_presence(self.redis, "scheduler", announcing, self._describe),
            name="presence",
        )
        try:
            log.info(
                "scheduler standing by", pools=sorted(self.pools), instance=self.lease.instance
            )
            if await self.lease.wait_until_held(stop, POLL_EVERY_S):
                await self._lead(stop)
        finally:
            announcing.set()
            await announcer
            await self.redis.aclose()
            renew_client.close()

    def _describe(self) -> tuple[presence.Role, dict[str, object]]:
        pools = sorted(self.pools)
        if self.lease is None or not self.lease.held:
            return "standby", {"pools": pools}
        return "active", {
            "pools": pools,
            "fencing_token": self.lease.token,
            "queued": self.policy.backlog(),
            "in_flight": sum(len(p.in_flight) for p in self.pools.values()),
        }

    async def _leading(self) -> LeaderLease:
        """The lease, known to be held (see :meth:`LeaderLease.ensure`).

        Raises:
            Fenced: it is lost: this process must stop acting.
        """
        if self.lease is None:
            raise Fenced("scheduler lease: never taken")
        await self.lease.ensure()
        return self.lease

    async def _lead(self, stop: asyncio.Event) -> None:
        """Today's start path, as the leader: restore, consume from committed offsets,
        dispatch; on a clean stop, checkpoint and hand the lease over."""
        lease = await self._leading()
        # The loops stop on `halt`, not on cancellation alone: after a long pause many
        # timers fire at once, and a cancel racing a timeout can be swallowed (3.11).
        halt = asyncio.Event()
        # Renewed from the start: restoring and joining Kafka can outlast the TTL.
        tasks = [asyncio.create_task(lease.keep(halt), name="lease")]
        bootstrap = self.endpoints.kafka_bootstrap
        self.publisher = SlicePublisher(self.app)
        self._mark_dispatched = self.redis.register_script(_MARK_DISPATCHED)
        self._write_state = self.redis.register_script(_WRITE_STATE)
        self.store = ResultStore(self.redis)
        self.ledger = _ledger_reader(self.settings)
        self.producer = kafka.producer(bootstrap)
        # Assigned partitions, not group membership: the lease already makes this the
        # only consumer, and a group would hold a dead leader's partitions for its
        # session timeout (6 s) before the new leader could read them. Offsets are
        # still committed to (and read from) the groups.
        self.requests = kafka.consumer(bootstrap, group_id=GROUP_ID)
        # Each fetch costs the broker (Tansu) ~2 ms of CPU even when empty, and Tansu
        # answers a long poll about a quarter of its wait after records arrive (measured
        # p50 9 ms at 50 ms, 50 ms at 200 ms): settling frees capacity, so it waits a
        # little longer than intake but not much.
        self.events = kafka.consumer(bootstrap, group_id=SETTLE_GROUP_ID,
                                     fetch_max_wait_ms=IDLE_FETCH_WAIT_MS)  # fmt: skip
        started = []
        fenced = running = False
        try:
            await self._restore()
            for client, what in (
                (self.producer, "producer"),
                (self.requests, "requests"),
                (self.events, "events"),
            ):
                await kafka.start(client, f"scheduler {what}")
                started.append(client)
            await _assign(self.requests, (*wire.REQUEST_TOPICS, wire.CONTROL_TOPIC))
            await _assign(self.events, (wire.TOKEN_EVENTS_TOPIC,))
            if tasks[0].done():
                tasks[0].result()  # the lease was lost while starting: raises Fenced
            await self._leading()
            log.info("scheduler started", pools=sorted(self.pools), fencing_token=lease.token)
            await self.redis.set(ALIVE_KEY, str(os.getpid()), ex=ALIVE_TTL_S)
            running = True
            tasks += [
                asyncio.create_task(self._consume_requests(halt), name="requests"),
                asyncio.create_task(self._consume_events(halt), name="events"),
                asyncio.create_task(self._watch_workers(halt), name="heartbeats"),
                asyncio.create_task(self._dispatch_loop(halt), name="dispatch"),
                asyncio.create_task(self._housekeeping(halt), name="housekeeping"),
                asyncio.create_task(self._spending_loop(halt), name="spending"),
            ]
            done, _ = await asyncio.wait(
                [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                if t in tasks and t.exception():
                    raise t.exception()  # type: ignore[misc]
        except Fenced:
            fenced = True  # act no more: no checkpoint, no release
            raise
        finally:
            halt.set()
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TASKS_S)
            if stuck:
                log.warning(
                    "scheduler tasks did not stop", tasks=sorted(t.get_name() for t in stuck)
                )
            if running and not fenced:
                try:
                    await self._checkpoint()
                except Fenced as exc:  # another leader took over meanwhile
                    log.error("scheduler checkpoint refused", error=str(exc))
                    fenced = True
            for client in started:
                await client.stop()
            self.publisher.close()
            if not fenced:
                if running:
                    await self.redis.delete(ALIVE_KEY)
                await lease.release()
            log.info("scheduler stopped", dispatched=self.dispatched_total)

    async def _restore(self) -> None:
        """Counters from the snapshot, reservations from the in-flight hash, spending
        from the ledger."""
        raw = await self.redis.get(SNAPSHOT_KEY)
        snap = SchedulerSnapshot.from_dict(json.loads(raw)) if raw else self.policy.snapshot()
        records = []
        for key, value in (await self.redis.hgetall(IN_FLIGHT_KEY)).items():
            try:
                doc = json.loads(value)
                if "settled" in doc:  # its event is committed: spending, not work in flight
                    tenant, cost = doc["settled"]
                    self.unbilled.add(key.decode(), tenant, Decimal(cost))
                    continue
                records.append(InFlightRecord.from_dict(doc))
            except (ValueError, KeyError, TypeError, InvalidPolicy, ArithmeticError) as exc:
                log.error("unreadable in-flight record dropped", error=str(exc))
        snap = replace(snap, in_flight=tuple(records))
        now = time.time()
        self.policy.restore(snap, [], now)
        # Restored records may be billed already (settled before the restart): the
        # first ledger read releases those.
        for rec in snap.in_flight:
            pool = (
                self.settings.pool_of(rec.request.model)
                if rec.request.model in self.settings.models
                else None
            )
            if pool:
                self.pools[pool].in_flight.add(rec.request.request_id)
                self._pool_of_request[rec.request.request_id] = pool
        self._restored = {r.request.request_id for r in records}
        await self._refresh_spending(now)
        log.info("scheduler state restored", in_flight=len(snap.in_flight))

    # -- intake ---------------------------------------------------------------------

    async def _consume_requests(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self.requests.getmany(timeout_ms=50, max_records=2000)
            records = [r for recs in batches.values() for r in recs]
            if records:
                await self._intake(records)
                self._wake.set()

    async def _intake(self, records: list[ConsumerRecord]) -> None:
        parsed: list[tuple[ConsumerRecord, wire.InferenceRequest]] = []
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            try:
                if rec.topic == wire.CONTROL_TOPIC:
                    await self._control(wire.decode(wire.ControlMessage, rec.value))
                    self.offsets.skip(tp, rec.offset)
                    continue
                req = wire.decode(wire.InferenceRequest, rec.value)
                self._check_known(req)
            except SchemaError as exc:
                await self._dead_letter(rec, str(exc))
                self.offsets.skip(tp, rec.offset)
                continue
            parsed.append((rec, req))
        if not parsed:
            return
        # Skip what an earlier life of the scheduler already dispatched.
        seen = await self.redis.mget([worker_keys.dispatched(req.id) for _, req in parsed])
        now = time.time()
        for (rec, req), already in zip(parsed, seen):
            tp = TopicPartition(rec.topic, rec.partition)
            if already:
                self.offsets.skip(tp, rec.offset)
                continue
            try:
                self.policy.enqueue(to_queued(req, Held(req, tp, rec.offset, rec.value)), now)
            except DuplicateRequest:
                self.offsets.skip(tp, rec.offset)  # redelivered while still queued/in flight
                continue
            except BudgetExceeded as exc:
                self.offsets.skip(tp, rec.offset)
                await self._report(req, wire.ResultStatus.failed, "budget_exceeded", str(exc))
                continue
            except SchedulerError as exc:
                await self._dead_letter(rec, f"rejected by scheduler: {exc}")
                self.offsets.skip(tp, rec.offset)
                continue
            self.offsets.read(tp, rec.offset)
            self._owner[req.id] = req.tenant
            if req.batch_id is not None and req.deadline is not None:
                pool = self.settings.pool_of(req.model)
                self.planner.queued(req.batch_id, req.tenant, pool, req.deadline, _units(req))

    def _check_known(self, req: wire.InferenceRequest) -> None:
        if req.tenant not in self.settings.tenants:
            raise SchemaError(f"InferenceRequest: tenant: unknown tenant {req.tenant!r}")
        if req.model not in self.settings.models:
            raise SchemaError(f"InferenceRequest: model: unknown model {req.model!r}")

    async def _dead_letter(self, rec: ConsumerRecord, reason: str) -> None:
        await self._leading()
        log.warning("dead-lettered message", topic=rec.topic, offset=rec.offset, reason=reason)
        await self.producer.send_and_wait(
            wire.DEAD_LETTER_TOPIC,
            rec.value,
            key=rec.key,
            headers=[
                ("reason", reason.encode()),
                ("source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
            ],
        )

    async def _control(self, msg: wire.ControlMessage) -> None:
        if msg.kind is wire.ControlKind.cancel:
            if self._owner.get(msg.request_id) != msg.tenant:
                return  # not queued here, or not this tenant's: tenants only cancel their own
            queued = self.policy.cancel(msg.request_id, time.time())
            if queued is not None:
                del self._owner[msg.request_id]
                held = _held(queued)
                self._left_queue(held.request)
                self.offsets.release(held.tp, held.offset)
                await self._report(
                    held.request, wire.ResultStatus.cancelled, "cancelled", "cancelled while queued"
                )
            # In flight: the worker sees the cancel flag the client set in Redis.

    # -- capacity and dispatch ------------------------------------------------------------

    async def _watch_workers(self, stop: asyncio.Event) -> None:
        timeout = self.settings.scheduler.heartbeat_timeout_s
        while not stop.is_set():
            for pool in self.pools.values():
                beats = await live_workers_async(self.redis, pool.name, timeout_s=timeout)
                capacity = sum(b.capacity for b in beats)
                reserved = sum(min(b.reserved, b.capacity) for b in beats)
                if (capacity, reserved) != (pool.capacity, pool.reserved):
                    log.info("pool capacity", pool=pool.name, workers=len(beats), capacity=capacity,
                             interactive_headroom=reserved)  # fmt: skip
                    pool.capacity, pool.reserved = capacity, reserved
                    self._wake.set()
                saturated = bool(beats) and all(engine_full(b) for b in beats)
                if saturated != pool.saturated:
                    pool.saturated = saturated
                    if not saturated:
                        self._wake.set()
            await asyncio.sleep(0.25)

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.max_slice_delay_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.dispatch_once()
            await asyncio.sleep(self.tick_s)  # let intake batch up a little

    async def dispatch_once(self) -> int:
        sent = 0
        now = time.time()
        for pool in self.pools.values():
            free = pool.capacity - len(pool.in_flight)
            if free <= 0 or not self.policy.backlog():
                continue
            # A Celery message costs milliseconds, so under load wait (briefly) for a
            # full slice of free capacity; at low load send at once, for latency.
            busy = len(pool.in_flight) >= self.max_slice
            if busy and free < self.max_slice and now - pool.last_dispatch < self.max_slice_delay_s:
                continue
            pool.last_dispatch = now
            result = self.policy.dispatch(
                Pool(pool.name, pool.models, free, shared_slots=pool.shared_free()), now
            )
            for rej in result.rejected:
                await self._reject(rej)
            picked = [d.request for d in result.dispatched]
            for start in range(0, len(picked), self.max_slice):
                chunk = picked[start : start + self.max_slice]
                await self._send(pool, chunk, now)
                sent += len(chunk)
        self.dispatched_total += sent
        return sent

    async def _send(self, pool: PoolState, chunk: list[QueuedRequest], now: float) -> None:
        lease = await self._leading()
        held = [_held(q) for q in chunk]
        # The requests go out as read from Kafka (the worker validates them again).
        tail = b',"dispatched_at":%s,"attempt":1}' % repr(now).encode()
        urgent_tail = tail[:-1] + b',"urgent":true}'
        urgent = self._urgent_batches
        payload = (
            b"["
            + b",".join(
                b'{"request":' + h.raw + (urgent_tail if h.request.batch_id in urgent else tail)
                for h in held
            )
            + b"]"
        )
        rank = min(h.request.priority.rank for h in held)
        # Built by Celery (no I/O); pushed by the fenced script below, with the marks.
        commands = self.publisher.commands(pool.name, payload, celery_priority(rank))
        # (`or`: only for the type checker; ensured held above, and '' never matches)
        args: list[_Arg] = [lease.value or "", DISPATCHED_TTL_S, lease.token or 0, len(chunk)]
        for q in chunk:
            record = self.policy.in_flight_record(q.request_id)
            args += [q.request_id, json.dumps(record.to_dict()) if record else "{}"]
        for c in commands:
            args += [c.name, c.payload]
        marks = [worker_keys.dispatched(q.request_id) for q in chunk]
        keys = [lease.key, IN_FLIGHT_KEY, *marks, *(c.key for c in commands)]
        if await self._mark_dispatched(keys=keys, args=args) == -1:
            raise lease.lost(f"dispatch of {len(chunk)} requests refused")
        self.slices_total += 1
        for q, h in zip(chunk, held):
            pool.in_flight.add(q.request_id)
            if q.priority is Priority.INTERACTIVE:
                pool.interactive.add(q.request_id)
            self._pool_of_request[q.request_id] = pool.name
            self._units[q.request_id] = (_units(h.request), q.priority is Priority.BATCH)
            self._left_queue(h.request)
            self._owner.pop(q.request_id, None)
            self.offsets.release(h.tp, h.offset)

    def _left_queue(self, req: wire.InferenceRequest) -> None:
        if req.batch_id is not None and req.deadline is not None:
            self.planner.left_queue(req.batch_id, _units(req))

    async def _reject(self, rej: Rejection) -> None:
        held = _held(rej.request)
        self._left_queue(held.request)
        self._owner.pop(held.request.id, None)
        self.offsets.release(held.tp, held.offset)
        status = (
            wire.ResultStatus.expired
            if rej.reason.value == "deadline_expired"
            else wire.ResultStatus.failed
        )
        await self._report(held.request, status, rej.reason.value, rej.detail)

    async def _report(
        self, req: wire.InferenceRequest, status: wire.ResultStatus, code: str, detail: str
    ) -> None:
        """Report a request that ends in the scheduler: result first, then its event."""
        await self._leading()
        now = time.time()
        kind = (
            wire.EventKind.cancelled
            if status is wire.ResultStatus.cancelled
            else wire.EventKind.failed
        )
        event = wire.TokenEvent(
            kind=kind,
            request_id=req.id,
            tenant=req.tenant,
            model=req.model,
            priority=req.priority,
            ts=now,
            submitted_at=req.submitted_at,
            finished_at=now,
            reason=f"{code}: {detail}",
            batch_id=req.batch_id,
            custom_id=req.custom_id,
        )
        result = wire.Result(
            request_id=req.id,
            tenant=req.tenant,
            model=req.model,
            status=status,
            error=wire.ErrorInfo(code=code, message=detail),
            batch_id=req.batch_id,
            custom_id=req.custom_id,
            finished_at=now,
        )
        if await self.store.commit(result, event):
            await self.producer.send_and_wait(
                wire.TOKEN_EVENTS_TOPIC, event.to_bytes(), key=req.tenant.encode()
            )
            await self.store.mark_reported(req.id)

    # -- settlement -------------------------------------------------------------------------

    async def _consume_events(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self.events.getmany(timeout_ms=50, max_records=5000)
            freed = False
            for tp, recs in batches.items():
                for rec in recs:
                    freed |= self._settle(rec)
                if recs:
                    self._event_positions[tp] = recs[-1].offset + 1
            if freed:
                self._wake.set()

    def _settle(self, rec: ConsumerRecord) -> bool:
        if any(marker in rec.value for marker in _NOT_TERMINAL):
            return False  # most events; decoding them was most of the settle cost
        try:
            ev = wire.decode(wire.TokenEvent, rec.value)
        except SchemaError:
            return False  # the stream processors dead-letter bad events
        if not ev.kind.is_terminal:
            return False
        done = settle(self.policy, self.clock, ev, time.time())
        if done is not None:
            self._restored.discard(ev.request_id)
            if done.cost:
                self.unbilled.add(ev.request_id, ev.tenant, done.cost)
                self._settled_costly.append((ev.request_id, ev.tenant, done.cost))
            else:
                self._settled_free.append(ev.request_id)
        return self._free_slot(ev.request_id)

    def _free_slot(self, request_id: str) -> bool:
        pool = self._pool_of_request.pop(request_id, None)
        if pool is None:
            return False
        state = self.pools[pool]
        state.in_flight.discard(request_id)
        state.interactive.discard(request_id)
        units = self._units.pop(request_id, None)
        if units is not None:
            self.planner.finished(pool, units[0], batch=units[1])
        return True

    # -- spending ---------------------------------------------------------------------------

    async def _refresh_spending(self, now: float) -> None:
        """Spending := the ledger's sums + what is settled here and not billed there yet.

        Raises:
            LedgerError: the ledger cannot be read (at start; later reads log and retry).
        """
        if self.ledger is None:
            return
        asked = set(self.unbilled.costs) | self._restored
        read = await asyncio.to_thread(self.ledger.read, now, asked)
        self.unbilled.drop(read.billed)
        freed = False
        for rid in read.billed & self._restored:
            # Settled and billed before the restart: the ledger's sum holds its cost.
            self._restored.discard(rid)
            self.policy.forget(rid)
            freed |= self._free_slot(rid)
        self.policy.set_spending(self.unbilled.spent(read.spend, self.ledger.periods), now)
        if read.billed:
            await self._write_in_flight(deleted=sorted(read.billed))
        if freed:
            self._wake.set()

    async def _spending_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(SPENDING_REFRESH_S)
            try:
                await self._refresh_spending(time.time())
            except TokenmillError as exc:  # keep the last spending (it only grows here)
                log.error("ledger spending not refreshed", error=str(exc))

    # -- housekeeping --------------------------------------------------------------------------

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        rounds = 0
        ticked = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.5)
            await self._leading()
            await self.redis.set(ALIVE_KEY, str(os.getpid()), ex=ALIVE_TTL_S)
            for rej in self.policy.expire(time.time()):
                await self._reject(rej)
            at = time.monotonic()
            await self._plan(at - ticked)
            ticked = at
            rounds += 1
            if rounds % 4 == 0:  # a snapshot is O(in flight): every 2 s is plenty
                await self._checkpoint()

    async def _plan(self, dt: float) -> None:
        """Forecast every batch with queued lines; mark the urgent ones (their tenants
        go ahead in the batch class, their lines run first among the engine's batch
        work) and publish the forecasts."""
        saturated = [p.name for p in self.pools.values()
                     if p.capacity and len(p.in_flight) >= p.capacity - p.reserved]  # fmt: skip
        self.planner.tick(dt, saturated)
        now = time.time()
        forecasts = self.planner.forecasts(now, self.settings.tenant_weight)
        # A batch at risk is reported, not favoured: it would make others late too.
        urgent = {f.batch_id for f in forecasts if f.urgent and not f.at_risk}
        for f in forecasts:
            if f.at_risk and f.batch_id not in self._at_risk_logged:
                log.warning("batch at risk of missing its window", batch_id=f.batch_id,
                            tenant=f.tenant, deadline=f.deadline, eta=f.eta_best)  # fmt: skip
        self._at_risk_logged = {f.batch_id for f in forecasts if f.at_risk}
        tenants = {f.tenant for f in forecasts if f.batch_id in urgent}
        for name in self.policy.urgent(Priority.BATCH) - tenants:
            self.policy.set_urgent(name, Priority.BATCH, False)
        for name in tenants:
            self.policy.set_urgent(name, Priority.BATCH, True)
        self._urgent_batches = urgent
        fields = {f.batch_id: json.dumps(f.to_dict()) for f in forecasts}
        stale = {k.decode() for k in await self.redis.hkeys(FORECASTS_KEY)} - set(fields)
        await self._leading()
        pipe = self.redis.pipeline(transaction=True)
        if stale:
            pipe.hdel(FORECASTS_KEY, *stale)
        if fields:
            pipe.hset(FORECASTS_KEY, mapping=fields)
        await pipe.execute()

    async def _checkpoint(self) -> None:
        """Snapshot the policy, then commit the offsets that snapshot reflects.

        Event offsets are committed only after a snapshot that includes their effect,
        so a restart re-applies exactly the completions the restored state lacks.
        """
        log.info(
            "scheduler checkpoint",
            dispatched=self.dispatched_total,
            slices=self.slices_total,
            backlog=self.policy.backlog(),
            held=self.offsets.held(),
        )
        snapshot = replace(self.policy.snapshot(), in_flight=()).to_dict()
        lease = await self._leading()
        snapshot["fencing_token"] = lease.token  # which leader wrote it (ignored on read)
        event_points = dict(self._event_positions)
        free, self._settled_free = self._settled_free, []
        costly, self._settled_costly = self._settled_costly, []
        # Before their events' offsets are committed (a restart will not replay those
        # events): a settled request stops being work in flight. One that cost nothing
        # is forgotten, and so is one the ledger already bills (or with no budget to
        # hold it against); any other stays as spending the ledger does not hold yet.
        unbilled = {} if self.ledger is None else self.unbilled.costs
        gone = [*free, *(rid for rid, _, _ in costly if rid not in unbilled)]
        settled = {rid: json.dumps({"settled": [tenant, str(cost)]})
                   for rid, tenant, cost in costly if rid in unbilled}  # fmt: skip
        await self._write_in_flight(json.dumps(snapshot), deleted=gone, written=settled)
        if event_points:
            await self._leading()
            await self.events.commit(event_points)
        await self._commit_offsets()

    async def _write_in_flight(
        self,
        snapshot: str = "",
        *,
        deleted: list[str] | None = None,
        written: dict[str, str] | None = None,
    ) -> None:
        """Write the snapshot (if given) and change the in-flight hash, fenced.

        Raises:
            Fenced: another scheduler holds the lease; nothing was written.
        """
        lease = await self._leading()
        deleted = deleted or []
        args: list[_Arg] = [lease.value or "", snapshot, len(deleted), *deleted]
        for rid, value in (written or {}).items():
            args += [rid, value]
        if await self._write_state(keys=[lease.key, SNAPSHOT_KEY, IN_FLIGHT_KEY], args=args) == -1:
            raise lease.lost("snapshot / in-flight write refused")

    async def _commit_offsets(self) -> None:
        points = self.offsets.commit_points()
        if points:
            await self._leading()
            await self.requests.commit(points)
            self.offsets.committed(points)


def settle(
    policy: Scheduler, clock: PricingClock, ev: wire.TokenEvent, now: float
) -> Completion | None:
    """Apply a terminal event to the policy, priced as the ledger prices it.

    Every terminal kind settles at the engine's token counts: a request cancelled,
    expired or failed after it started is billed the work done (a partial line in the
    ledger); one that ended before it ran carries zero counts and costs nothing.

    Returns:
        The settlement, or None if the request was not in flight here.
    """
    clock.at = ev.finished_at if ev.finished_at is not None else ev.ts
    try:
        return policy.complete(ev.request_id, ev.prompt_tokens, ev.completion_tokens, now)
    except ConfigError as exc:  # no card in force then: price now (nothing changed yet)
        log.error("request priced at settle time", request_id=ev.request_id, error=str(exc))
        clock.at = None
        return policy.complete(ev.request_id, ev.prompt_tokens, ev.completion_tokens, now)
    finally:
        clock.at = None


async def _assign(consumer: AIOKafkaConsumer, topics: tuple[str, ...]) -> None:
    """Assign every partition of ``topics`` to ``consumer``; reading starts at the
    group's committed offsets (the earliest where none is committed)."""
    await consumer.topics()  # fetches the cluster's metadata
    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise SchedulerError(f"Kafka topic {topic!r} has no partitions (not created?)")
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)


def _ledger_reader(settings: Settings) -> LedgerReader | None:
    """The ledger reader for the budgeted tenants (None: no tenant has a budget)."""
    periods = {name: t.budget.period for name, t in settings.tenants.items() if t.budget}
    if not periods:
        return None
    from ..ledger.db import shared_factory

    return LedgerReader(shared_factory(settings.ledger_url), periods)


def _units(req: wire.InferenceRequest) -> float:
    """A request's work for deadline planning (see :mod:`.deadlines`)."""
    return float(req.prompt_tokens_estimate + req.max_tokens)


def _held(q: QueuedRequest) -> Held:
    if not isinstance(q.payload, Held):
        raise TokenmillError(
            f"request {q.request_id} has no payload (restored without its message)"
        )
    return q.payload


async def serve(
    settings: Settings, endpoints: Endpoints, stop: asyncio.Event | None = None
) -> None:
    """Run the scheduler until ``stop`` is set (or SIGTERM/SIGINT)."""
    import signal

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await SchedulerService(settings, endpoints).run(stop)

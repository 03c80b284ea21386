"""The stream processor's consumer: a plain aiokafka batch loop, token events → ledger.

**Why not faust.** A faust agent receives one event at a time: faust wraps every record
in an ``Event`` and routes it through the conductor, a channel queue and the stream's
iterator, with a couple of asyncio tasks per record. ``bench/streams.py`` measures an
agent on faust's public API (``stream.take_events``) into the same sink as the
baseline: it stays far below the 20,000 events/s target on this 2-core machine, and
the only way past that was to reimplement faust's private consumer internals, which
any faust release may change. So this module uses aiokafka's public API alone:
:class:`StreamProcessor` joins the consumer group (settings from
:mod:`tokenmill.kafka`), takes whole fetches with ``getmany`` and hands each to a
:class:`~.processor.BatchProcessor` (one transaction per batch), as the scheduler
consumes its topics.

**Pipelining.** While a batch's transaction runs on a worker thread (SQLite's work runs
without the GIL), the loop decodes and prices the next fetch; the next transaction
starts only when the previous one has committed.

**Exactness.** The ledger's unique keys make a replayed record a no-op, so delivery may
be at-least-once; what must never happen is a committed offset past a record that is
not in the ledger. Batches are written one at a time in fetch order, and a batch's
offsets (one past its last record, per partition) join the committable offsets only
once its transaction has committed; they are committed to the group every
``commit_interval_s``, when partitions are revoked, and at stop. A rebalance
(``on_partitions_revoked``) first lets the batch in flight finish (or, if it cannot
within :data:`FINISH_ON_REVOKE_S`, leaves its offsets uncommitted), commits, and drops
whatever was fetched but not yet written: aiokafka starts every assigned partition
again from its committed offset, so those records are read again, by this or another
member. A batch that fails with anything but an unreachable database (retried until
it comes back) ends the process at once (:data:`EXIT_BATCH_FAILED`) without committing
anything more, to be restarted and replay it. No broker transactions (Tansu has none):
every figure lives in the ledger, which survives restarts and rebalances.

**Drain on stop.** The first SIGTERM (or SIGINT) makes the processor consume until its
assigned partitions have no lag, then commit and exit 0, so that ``tokenmill down``,
which stops producers and workers first, leaves no token event in the broker (the
embedded one keeps its data in memory only). Lag is the highwater mark of a fetch
response received after the signal minus the consumer's position; Tansu's
``end_offsets`` (ListOffsets) is wrong (it answers the base offset of a partition's last
record batch), the highwater of its fetch responses is right. The drain is bounded by
``drain_timeout_s``; past it the processor commits what it wrote and exits
:data:`EXIT_DRAIN_TIMEOUT`. A second signal stops at once (the batch in flight is
finished and committed).

**Copies.** Run any number: they share the consumer group ``app_id``, so the partitions
are spread over them and a dead copy's move to the others once its session times out
(``session_timeout_ms`` in :mod:`tokenmill.kafka`); the ledger's unique keys make the
replays this causes no-ops. Each copy announces itself as ``streams`` in Redis with its
partitions and lag (``tokenmill status``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from tokenmill import kafka, presence
from tokenmill.logs import get_logger
from tokenmill.redis_client import async_redis

from ..db import transaction
from ..fairness import Fairness, fairness_of
from ..sla import served_requests, sla_attainment
from .config import StreamsConfig
from .metrics import StreamMetrics
from .processor import BatchProcessor, BatchReport
from .sink import LedgerSink

log = get_logger(__name__)

#: exit status when a batch could not be recorded (its offsets are not committed)
EXIT_BATCH_FAILED = 70
#: exit status when a drain on stop ran out of time with events still unconsumed
EXIT_DRAIN_TIMEOUT = 75
#: how long stopping waits for the batch in flight before exiting without committing it
FINISH_ON_STOP_S = 30.0
#: how long a rebalance waits for the batch in flight before leaving its offsets
#: uncommitted (within the group's rebalance timeout, ``rebalance_timeout_ms`` in
#: tokenmill.kafka)
FINISH_ON_REVOKE_S = 2.0
#: longest a fetch waits at the broker for records. Tansu holds a fetch that long even
#: with records waiting, and each fetch costs its CPU even when empty: 200 ms keeps
#: finished → ledger well inside the 2 s target without spinning the broker.
FETCH_MAX_WAIT_MS = 200
#: how long one ``getmany`` waits for records when none are buffered
POLL_MS = 200
#: most bytes fetched per partition at once (aiokafka's default is 1 MiB, ~2,300 events):
#: under a backlog a fetch should fill a whole ``batch_max`` batch (as faust's 4 MiB did)
MAX_PARTITION_FETCH_BYTES = 4 << 20


class KafkaPublisher:
    """Publishes dead letters and violations with an aiokafka producer (``acks=all``),
    batching whatever a batch of events produces."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: Any = None

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Awaitable[Any]:
        if self._producer is None:
            producer = kafka.producer(self.bootstrap, linger_ms=2)
            await kafka.start(producer, "stream-processor producer")
            self._producer = producer
        return await self._producer.send(topic, value, key=key, headers=headers or None)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()


@dataclass(eq=False)
class _Writing:
    """A batch handed to the database."""

    #: the rebalance generation it was fetched in (its offsets count only in that one)
    generation: int
    #: per partition, one past the batch's last offset
    ends: dict[TopicPartition, int]
    task: asyncio.Future[BatchReport]


class StreamProcessor(ConsumerRebalanceListener):  # type: ignore[misc]
    """One member of the stream processors' consumer group (see the module docstring).

    Parameters:
        config: topic, group (``app_id``), batching, commits, drain timeout.
        bootstrap: Kafka ``host:port[,host:port]``.
        sink: a prepared ledger sink (:meth:`LedgerSink.prepare`).
        metrics: counters and gauges to keep, if any.
    """

    def __init__(
        self,
        config: StreamsConfig,
        bootstrap: str,
        sink: LedgerSink,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        self.publisher = KafkaPublisher(bootstrap)
        self.processor = BatchProcessor(sink, config, self.publisher, metrics)
        self.consumer = kafka.consumer(
            bootstrap, group_id=config.app_id, fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_poll_records=config.batch_max, max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        )  # fmt: skip
        self._generation = 0
        self._rebalancing = True  # until the first assignment
        self._writing: _Writing | None = None
        #: per partition, one past the last offset the ledger holds (committable)
        self._written: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        #: per partition, one past the last offset fetched (for the lag announced)
        self._fetched: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        #: time.time() in ms when draining began; None while not draining
        self._drain_since_ms: int | None = None
        self._drain_deadline = 0.0
        self._stop_now = False

    # -- control ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain to zero lag, then stop. Second: stop after the batch in flight."""
        if self._drain_since_ms is None:
            self._drain_since_ms = int(time.time() * 1000)
            self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
            log.info("draining before stop", timeout_s=self.config.drain_timeout_s)
        else:
            self._stop_now = True
            log.info("stopping now")

    async def run(self) -> int:
        """Consume until stopped; returns the exit status (0: stopped with no lag)."""
        await kafka.start(self.consumer, "stream-processor consumer")
        self.consumer.subscribe([self.config.topic], listener=self)
        log.info("stream processor starting", group=self.config.app_id, topic=self.config.topic)
        gauges = asyncio.ensure_future(self._refresh_gauges()) if self.metrics else None
        try:
            status = await self._consume()
            if not await self._settle(FINISH_ON_STOP_S):
                _die("batch unfinished at stop", TimeoutError(f"{FINISH_ON_STOP_S} s"))
            await self._commit()
            return status
        finally:
            if gauges is not None:
                gauges.cancel()
            await self.consumer.stop()  # leaves the group: the others take its partitions
            await self.publisher.close()

    # -- the loop -----------------------------------------------------------------------

    async def _consume(self) -> int:
        while not self._stop_now:
            if self._drain_since_ms is not None and time.monotonic() > self._drain_deadline:
                lag = {f"{tp.topic}[{tp.partition}]": n for tp, n in (await self._lag()).items()}
                log.warning("drain timed out with events unconsumed; stopping", lag=lag)
                return EXIT_DRAIN_TIMEOUT
            fetched = await self._fetch()
            generation = self._generation
            if not fetched:
                await self._settle()
                if self._drain_since_ms is not None and await self._drained():
                    log.info("drained: no lag on the assigned partitions; stopping")
                    return 0
                await self._commit_due()
                continue
            records = [rec for recs in fetched.values() for rec in recs]
            ends = {tp: recs[-1].offset + 1 for tp, recs in fetched.items() if recs}
            self._fetched.update(ends)
            try:
                prepared = self.processor.prepare(records)  # while the previous one is written
            except Exception as exc:  # noqa: BLE001
                _die("batch failed", exc)
            await self._settle()
            if generation != self._generation:
                continue  # partitions were revoked since the fetch: read again from the commit
            # started here, not in a task: the transaction is on its thread before we yield
            task = asyncio.ensure_future(self.processor.start(prepared))
            self._writing = _Writing(generation, ends, task)
            await self._commit_due()
        return 0

    async def _fetch(self) -> dict[TopicPartition, list[Any]]:
        """The records fetched so far (up to ``batch_max``), waiting up to :data:`POLL_MS`."""
        return await self.consumer.getmany(  # type: ignore[no-any-return]
            timeout_ms=POLL_MS, max_records=self.config.batch_max
        )

    async def _settle(self, timeout_s: float | None = None) -> bool:
        """Wait for the batch in flight, and make its offsets committable if it still
        belongs to the current generation. Ends the process if the batch failed.

        Returns:
            False if ``timeout_s`` passed first.
        """
        writing = self._writing
        if writing is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(writing.task), timeout_s)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            raise  # this wait was cancelled, not the batch (shielded)
        except BaseException as exc:  # noqa: BLE001
            _die("batch failed", exc)
        if self._writing is writing:
            self._writing = None
        if writing.generation == self._generation:
            self._written.update(writing.ends)
        return True

    # -- offsets ------------------------------------------------------------------------

    async def _commit_due(self) -> None:
        if time.monotonic() - self._last_commit >= self.config.commit_interval_s:
            await self._commit()

    async def _commit(self) -> None:
        """Commit the offsets of what the ledger holds, for the partitions still assigned."""
        self._last_commit = time.monotonic()
        assigned = self.consumer.assignment()
        offsets = {tp: off for tp, off in self._written.items()
                   if tp in assigned and self._committed.get(tp) != off}  # fmt: skip
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance began, or the broker is away: replays are no-ops
            log.warning("offset commit failed; events past the last commit will be read again",
                        error=repr(exc))  # fmt: skip
            return
        self._committed.update(offsets)

    # -- rebalances (aiokafka awaits these between leaving and rejoining the group) ------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalancing = True
        if not await self._settle(FINISH_ON_REVOKE_S):
            log.warning("a batch is still being written at a rebalance; its offsets stay "
                        "uncommitted (its events will be read again, as no-ops)")  # fmt: skip
        self._generation += 1  # drops what was fetched and not yet written
        await self._commit()
        for tp in revoked:
            self._written.pop(tp, None)
            self._committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # aiokafka positions each partition at its committed offset (earliest if none)
        self._rebalancing = False
        log.info("partitions assigned", generation=self._generation,
                 partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))  # fmt: skip

    # -- presence -----------------------------------------------------------------------

    def presence_detail(self) -> dict[str, int]:
        """What ``tokenmill status`` shows of this copy: its partitions, and its lag
        (events on them not yet written to the ledger, as of the last fetch responses)."""
        assigned = self.consumer.assignment()
        lag = 0
        for tp in assigned:
            highwater = self.consumer.highwater(tp)
            done = self._written.get(tp, self._committed.get(tp, self._fetched.get(tp)))
            if highwater is not None and done is not None:
                lag += max(0, highwater - done)
        return {"lag": lag, "partitions": len(assigned)}

    # -- draining -----------------------------------------------------------------------

    async def _lag(self) -> dict[TopicPartition, int | None]:
        """Per assigned partition, highwater − position as of a fetch response received
        since draining began; None where no such response has come yet."""
        since = self._drain_since_ms or 0
        out: dict[TopicPartition, int | None] = {}
        for tp in self.consumer.assignment():
            highwater, seen = self.consumer.highwater(tp), self.consumer.last_poll_timestamp(tp)
            if highwater is None or seen is None or seen < since:
                out[tp] = None
                continue
            try:
                out[tp] = max(0, highwater - await self.consumer.position(tp))
            except KafkaError:  # being reassigned
                out[tp] = None
        return out

    async def _drained(self) -> bool:
        """No lag on any assigned partition (and no rebalance under way). Called with
        no batch in flight, so the position is also what the ledger holds."""
        if self._rebalancing:
            return False
        return all(n == 0 for n in (await self._lag()).values())

    # -- gauges -------------------------------------------------------------------------

    async def _refresh_gauges(self) -> None:
        assert self.metrics is not None
        window, fair_window = self.config.sla_window_s, self.config.fairness_window_s
        while True:
            await asyncio.sleep(self.config.gauge_interval_s)
            try:
                rows = await asyncio.to_thread(_attainment, self.sink, window)
                figures = await asyncio.to_thread(window_fairness, self.sink, fair_window)
            except Exception as exc:  # noqa: BLE001  (a gauge is not worth a crash; next tick retries)
                log.warning("SLA gauges not refreshed", error=repr(exc))
                continue
            self.metrics.set_window(rows, window)
            self.metrics.set_fairness(figures)


#: the service name copies announce themselves under
SERVICE = "streams"


async def serve(
    config: StreamsConfig,
    bootstrap: str,
    sink: LedgerSink,
    metrics: StreamMetrics | None = None,
    *,
    redis_url: str | None = None,
) -> int:
    """Run a :class:`StreamProcessor` until SIGTERM/SIGINT (see the module docstring);
    returns the exit status. With ``redis_url``, announce this copy there meanwhile."""
    processor = StreamProcessor(config, bootstrap, sink, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, processor.request_stop)
    client = async_redis(redis_url) if redis_url else None
    quiet = asyncio.Event()
    announcing = None
    if client is not None:
        announcing = asyncio.ensure_future(presence.run_presence(
            client, SERVICE, quiet, lambda: ("copy", processor.presence_detail())))
    try:
        return await processor.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        quiet.set()
        if announcing is not None:
            await announcing
        if client is not None:
            await client.aclose()


def _attainment(sink: LedgerSink, window_s: float) -> list[Any]:
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    with transaction(sink.sessions) as session:
        return sla_attainment(session, since, sink.settings.sla)


def window_fairness(sink: LedgerSink, window_s: float) -> Fairness:
    """The fair-share figures of the requests that finished in the last ``window_s``."""
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    with transaction(sink.sessions) as session:
        rows = served_requests(session, since)
    return fairness_of(rows, sink.settings, window_s)


def _die(what: str, exc: BaseException) -> NoReturn:
    log.critical(f"{what}; exiting without committing its offsets", error=repr(exc),
                 exit=EXIT_BATCH_FAILED)  # fmt: skip
    time.sleep(0.05)  # let the log line out
    os._exit(EXIT_BATCH_FAILED)

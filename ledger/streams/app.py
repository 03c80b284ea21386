"""The faust app: faust's consumer, with whole fetches of the token-event topic handed
to a :class:`~.processor.BatchProcessor`, which writes each batch in one transaction.

**Why not an agent.** A faust agent receives one event at a time: the consumer wraps
every record in an ``Event``, routes it through the conductor, a channel queue and the
stream's iterator, with a couple of asyncio tasks per record. Measured on this
machine that costs ~200 µs of CPU per record before any work is done. So
:class:`BatchConsumer` keeps everything faust's consumer does (group membership and
rebalances in its consumer thread, fetch, read-offset and gap bookkeeping,
acknowledgement tracking, periodic offset commits, seeking back to the committed
offsets after a rebalance) and replaces the per-record delivery, for the topics
registered as batch topics, by one per fetch: aiokafka's records are handed over as
they are (no faust message object, no per-record sensor call), tracked and acknowledged
as one :class:`Fetched` (~3 µs per record in all). Any other topic of the app still
goes to its agents.

**Pipelining.** While a batch's transaction runs on a worker thread (SQLite's work
runs without the GIL), the loop decodes and prices the next fetch; the next
transaction starts only when the previous one has committed and been acknowledged.

**Exactness.** The ledger's unique keys make a replayed record a no-op, so delivery may
be at-least-once: a batch is acknowledged, hence its offsets committable, only after its
transaction committed. faust commits, per partition, only the consecutive run of
acknowledged offsets above the committed one, and batches are written and
acknowledged one at a time in fetch order, so a commit never passes a record that is
not in the ledger. A batch
that fails with anything but an unreachable database (retried until it comes back)
ends the process without acknowledging it, to be restarted and replay it. No faust
tables, no ``exactly_once`` (Tansu has no transactions): every figure lives in the
ledger, which survives restarts and rebalances.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import ack_lock
from mode.utils.futures import notify
from tokenmill.config import Settings

from tokenmill import kafka
from tokenmill.logs import get_logger

from ..db import transaction
from ..sla import sla_attainment
from .config import StreamsConfig
from .metrics import StreamMetrics
from .processor import BatchProcessor, BatchReport
from .sink import LedgerSink

log = get_logger(__name__)

#: exit status when a batch could not be recorded (the batch is not acknowledged)
EXIT_BATCH_FAILED = 70
#: how long shutdown waits for a batch in flight before exiting without acknowledging it
FINISH_ON_STOP_S = 30.0
#: fetched batches waiting for the processor (each up to ``broker_max_poll_records``)
QUEUED_FETCHES = 4
#: longest a fetch waits at the broker for records (as in tokenmill.kafka.CONSUMER_DEFAULTS)
#: lag target is 2 s; each fetch costs the broker CPU even when empty, so not shorter
FETCH_MAX_WAIT_MS = 200


class BatchRouter:
    """The batch topics of an app and the queue their fetches wait in."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self._queue: asyncio.Queue[Fetched] | None = None

    @property
    def queue(self) -> asyncio.Queue[Fetched]:
        if self._queue is None:  # created on the loop that runs the app
            self._queue = asyncio.Queue(QUEUED_FETCHES)
        return self._queue


@dataclass(eq=False)
class Fetched:
    """The records of one fetch of the batch topics (aiokafka's ``ConsumerRecord`` objects),
    tracked by the consumer as one unacknowledged message (so a rebalance waits for it)
    until :meth:`BatchConsumer.ack_fetched`."""

    records: list[Any]
    #: partition → offsets, in fetch order
    offsets: dict[Any, list[int]] = field(default_factory=dict)
    acked: bool = False
    refcount: int = 1  # read by faust's wait_empty log line


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, delivering each fetch of the batch topics as one
    :class:`Fetched` (see the module docstring); a transcription of faust's
    ``Consumer.getmany`` and ``_drain_messages`` with the per-record message objects,
    sensor calls and acknowledgements replaced, for those topics, by one per fetch."""

    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - via workers
        router: BatchRouter | None = getattr(self.app, "batch_router", None)
        if router is None:
            await super()._drain_messages(fetcher)
            return
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        commit_every = self._commit_every
        queue = router.queue
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched = await self._fetch(router)
                self.diag.unset_flag(CONSUMER_FETCHING)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                if fetched is not None:
                    await queue.put(fetched)
                else:
                    await asyncio.sleep(0)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            # Stopping (also in the middle of a rebalance's seek): end quietly, as faust's
            # own drain does; nothing fetched here has been acknowledged.
            if self.transport.app.should_stop or consumer_should_stop() or fetcher_should_stop():
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _fetch(self, router: BatchRouter) -> Fetched | None:
        """One fetch: the batch topics' new records as a tracked :class:`Fetched`; any
        other topic's records go to their agents, one by one, as faust does."""
        records, active = await self._wait_next_records(1.0)
        if records is None or self.should_stop:
            return None
        if not self.flow_active:
            try:
                await self.perform_seek()  # as faust's getmany: back to the committed offsets
            except Exception as exc:  # noqa: BLE001
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return None
        generation_id = self.app.consumer_generation_id
        batch = Fetched([])
        for tp, tp_records in records.items():
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break  # a rebalance began: drop the rest, it will be fetched again
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            batch_topic = tp.topic in router.topics
            acks = self.app.topics.acks_enabled_for(tp.topic)
            r_offset = self._read_offset[tp]
            offsets: list[int] = []
            for record in tp_records:
                offset = record.offset
                if r_offset is not None and offset < r_offset:
                    continue  # already read (faust drops these too)
                if r_offset and offset - r_offset > 1 and acks:
                    await self._add_gap(tp, r_offset + 1, offset)
                if batch_topic:
                    batch.records.append(record)
                    offsets.append(offset)
                else:
                    message = self._to_message(tp, record)
                    await self.wait_first(self.callback(message), self.suspend_flow.wait())
                r_offset = offset
                self._read_offset[tp] = offset
            if offsets:
                batch.offsets[tp] = offsets
        if not batch.records:
            return None
        self._unacked_messages.add(batch)  # type: ignore[arg-type]
        return batch

    def ack_fetched(self, batch: Fetched) -> None:
        """Acknowledge every record of ``batch`` (faust's ``ack`` for each, in one go)."""
        with ack_lock:
            if batch.acked:
                return
            batch.acked = True
            acked_now = 0
            for tp, offsets in batch.offsets.items():
                if not self.app.topics.acks_enabled_for(tp.topic):
                    continue
                committed = self._committed_offset[tp]
                index, acked = self._acked_index[tp], self._acked[tp]
                for offset in offsets:
                    if (committed is None or offset >= committed) and offset not in index:
                        index.add(offset)
                        acked.append(offset)
                        acked_now += 1
            self._n_acked += acked_now
            self._unacked_messages.discard(batch)  # type: ignore[arg-type]
            notify(self._waiting_for_ack)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust hard-codes fetch_max_wait_ms=1500; Tansu holds a fetch that long even
        # with records waiting, which would add ~1 s of latency to every event.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Transport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class BatchApp(faust.App):
    """A faust app whose consumer can deliver topics in batches (:meth:`batch_topic`)."""

    batch_router: BatchRouter | None = None

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self, loop=self.loop)

    def batch_topic(self, name: str) -> Any:
        """Subscribe to ``name``; its records go to :attr:`batch_router`'s queue as
        :class:`Fetched` batches, to be acknowledged with ``app.consumer.ack_fetched``."""
        if self.batch_router is None:
            self.batch_router = BatchRouter(set())
        self.batch_router.topics.add(name)
        topic = self.topic(name, key_serializer="raw", value_serializer="raw")
        self.topics.add(topic)
        return topic


class KafkaPublisher:
    """Publishes dead letters and violations with an aiokafka producer (``acks=all``).

    Not faust's producer: it sends and awaits one message at a time (measured: ~5 ms a
    message), while this one batches whatever a batch of events produces.
    """

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


def faust_settings(config: StreamsConfig, bootstrap: str, datadir: Path) -> dict[str, Any]:
    """faust settings that are reliable on Tansu and Apache Kafka alike (see
    ARCHITECTURE.md). ``producer_max_batch_size=1`` is left out: it only protects table
    changelogs, and this app has no tables."""
    return {
        "broker": [f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip()],
        "datadir": str(datadir),
        "autodiscover": False,
        "web_enabled": False,
        "store": "memory://",
        "processing_guarantee": "at_least_once",
        "topic_replication_factor": 1,
        "topic_disable_leader": True,
        "topic_partitions": config.partitions,
        "broker_session_timeout": 6,
        "broker_rebalance_timeout": 6,
        "broker_heartbeat_interval": 0.5,
        "broker_commit_interval": config.commit_interval_s,
        "broker_max_poll_records": config.batch_max,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
    }


def create_app(
    settings: Settings,
    config: StreamsConfig,
    bootstrap: str,
    sink: LedgerSink,
    metrics: StreamMetrics | None = None,
) -> BatchApp:
    """The stream-processor app (not started).

    Parameters:
        settings: tenants, tiers, SLA classes.
        config: topics, group, batching, metrics.
        bootstrap: Kafka ``host:port[,host:port]``.
        sink: a prepared ledger sink (see :meth:`LedgerSink.prepare`).
        metrics: counters and gauges to keep, if any.
    """
    app = BatchApp(
        config.app_id, **faust_settings(config, bootstrap, config.datadir_for(settings.home))
    )
    app.batch_topic(config.topic)
    publisher = KafkaPublisher(bootstrap)
    processor = BatchProcessor(sink, config, publisher, metrics)

    async def ledger() -> None:
        assert app.batch_router is not None
        queue = app.batch_router.queue
        try:
            await _consume(queue)
        finally:
            await publisher.close()

    async def _consume(queue: asyncio.Queue[Fetched]) -> None:
        writing: asyncio.Future[bool] | None = None  # the batch being written, then acked
        try:
            while True:
                fetches = [await queue.get()]
                size = len(fetches[0].records)
                while not queue.empty() and size < config.batch_max:
                    fetches.append(queue.get_nowait())  # coalesce what waits: one transaction
                    size += len(fetches[-1].records)
                records = fetches[0].records
                for more in fetches[1:]:
                    records = records + more.records
                try:
                    prepared = processor.prepare(records)  # while the previous one is written
                except Exception as exc:  # noqa: BLE001
                    _die("batch failed", exc)
                if writing is not None and await asyncio.shield(writing):
                    raise asyncio.CancelledError
                # started here, not in the task: the next prepare may not yield first
                writing = asyncio.ensure_future(_write(processor.start(prepared), fetches))
        finally:
            if writing is not None and not writing.done():
                # Shutdown: let the batch in flight finish and be acknowledged (_finish
                # ends the process if it cannot).
                await asyncio.wait([writing], timeout=FINISH_ON_STOP_S + 5)

    async def _write(work: Awaitable[BatchReport], fetches: list[Fetched]) -> bool:
        stopping = await _finish(work)
        consumer: BatchConsumer = app.consumer  # type: ignore[assignment]
        for fetched in fetches:
            consumer.ack_fetched(fetched)
        return stopping

    app.task(ledger)

    if metrics is not None:

        async def refresh_gauges() -> None:
            try:
                rows = await asyncio.to_thread(_attainment, sink, config.sla_window_s)
            except Exception as exc:  # noqa: BLE001  (a gauge is not worth a crash; next tick retries)
                log.warning("SLA gauges not refreshed", error=repr(exc))
                return
            metrics.set_window(rows, config.sla_window_s)

        app.timer(interval=config.gauge_interval_s, name=f"{config.app_id}.gauges")(refresh_gauges)
    return app


def _attainment(sink: LedgerSink, window_s: float) -> list[Any]:
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    with transaction(sink.sessions) as session:
        return sla_attainment(session, since, sink.settings.sla)


async def _finish(work: Awaitable[Any]) -> bool:
    """Await a batch to its end; if it fails, or shutdown cannot wait for it, end the
    process before anything acknowledges it.

    Returns:
        True if shutdown began meanwhile (acknowledge the batch, then stop).
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
        return False
    except asyncio.CancelledError:
        pass
    except BaseException as exc:  # noqa: BLE001
        _die("batch failed", exc)
    try:  # shutdown: finish the batch, so that it can be acknowledged
        await asyncio.wait_for(asyncio.shield(task), FINISH_ON_STOP_S)
    except BaseException as exc:  # noqa: BLE001
        _die("batch failed or unfinished at shutdown", exc)
    return True


def _die(what: str, exc: BaseException) -> None:
    log.critical(
        f"{what}; exiting without acknowledging it", error=repr(exc), exit=EXIT_BATCH_FAILED
    )
    time.sleep(0.05)  # let the log line out
    os._exit(EXIT_BATCH_FAILED)

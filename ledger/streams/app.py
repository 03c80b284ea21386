"""The faust app: faust's consumer, with whole fetches of the token-event topic handed
to a :class:`~.processor.BatchProcessor`, which writes each batch in one transaction.

**Why not an agent.** A faust agent receives one event at a time: the consumer wraps
every record in an ``Event``, routes it through the conductor, a channel queue and the
stream's iterator, with a couple of asyncio tasks per record. Measured on this
machine that costs ~200 µs of CPU per record before any work is done; a batch consumer
on the same faust consumer costs ~20 µs. So :class:`BatchConsumer` keeps everything
faust's consumer does (group membership and rebalances in its consumer thread, fetch,
read-offset and gap bookkeeping, acknowledgement tracking, periodic offset commits,
seeking back to the committed offsets after a rebalance) and replaces only the
per-record delivery, for the topics registered as batch topics; any other topic of the
app still goes to its agents.

**Exactness.** The ledger's unique keys make a replayed record a no-op, so delivery may
be at-least-once: a batch is acknowledged, hence its offsets committable, only after its
transaction committed. faust commits, per partition, only the consecutive run of
acknowledged offsets above the committed one, and batches are processed one at a time
in fetch order, so a commit never passes a record that is not in the ledger. A batch
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from tokenmill.config import Settings

from tokenmill import kafka
from tokenmill.logs import get_logger

from ..db import transaction
from ..sla import sla_attainment
from .config import StreamsConfig
from .metrics import StreamMetrics
from .processor import BatchProcessor, Record
from .sink import LedgerSink

log = get_logger(__name__)

#: exit status when a batch could not be recorded (the batch is not acknowledged)
EXIT_BATCH_FAILED = 70
#: how long shutdown waits for a batch in flight before exiting without acknowledging it
FINISH_ON_STOP_S = 30.0
#: fetched batches waiting for the processor (each up to ``broker_max_poll_records``)
QUEUED_FETCHES = 4
#: longest a fetch waits at the broker for records (as in tokenmill.kafka.CONSUMER_DEFAULTS)
FETCH_MAX_WAIT_MS = 50


class BatchRouter:
    """The batch topics of an app and the queue their fetches wait in."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self._queue: asyncio.Queue[list[Any]] | None = None

    @property
    def queue(self) -> asyncio.Queue[list[Any]]:
        if self._queue is None:  # created on the loop that runs the app
            self._queue = asyncio.Queue(QUEUED_FETCHES)
        return self._queue


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, delivering each fetch of the batch topics as one list
    (see the module docstring); a transcription of ``Consumer._drain_messages`` with
    the per-record callback replaced for those topics."""

    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - via workers
        router: BatchRouter | None = getattr(self.app, "batch_router", None)
        if router is None:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        queue = router.queue
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                batch: list[Any] = []
                self.diag.set_flag(CONSUMER_FETCHING)
                async for tp, message in self.getmany(timeout=1.0):
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already read (faust drops these too)
                    if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if message.topic in router.topics:
                        self.track_message(message)  # a rebalance waits for its ack
                        batch.append(message)
                    else:
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                self.diag.unset_flag(CONSUMER_FETCHING)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                if batch:
                    await queue.put(batch)
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
        """Subscribe to ``name``; its records go to :attr:`batch_router`'s queue as lists
        of faust messages, to be acknowledged with ``app.consumer.ack(message)``."""
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

    async def _consume(queue: asyncio.Queue[list[Any]]) -> None:
        while True:
            messages = await queue.get()
            while not queue.empty() and len(messages) < config.batch_max:
                messages += queue.get_nowait()  # coalesce what is waiting into one transaction
            records = [Record(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]
            stopping = await _finish(processor.process(records))
            ack = app.consumer.ack
            for m in messages:
                ack(m)
            if stopping:
                raise asyncio.CancelledError

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

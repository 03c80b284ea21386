"""One batch of token-event records, end to end: decode, write to the ledger in one
transaction, dead-letter what cannot be recorded, publish SLA violations, count.

Independent of Kafka (the consumer loop in :mod:`.app` feeds it), so it can be driven
and tested alone. The order is what makes the stream exact under at-least-once delivery:

1. the database transaction commits (replays are no-ops: unique request ids);
2. dead letters and violations are delivered (awaited);
3. only then does :meth:`BatchProcessor.finish` (or ``process``) return, and the caller
   may commit the records' offsets.

Decoding, pricing and building the rows (:meth:`BatchProcessor.prepare`) touch no
state that the ledger's writes depend on, so the caller may prepare the next batch
while the previous one is written (:meth:`BatchProcessor.start` hands the transaction to
its thread at once, so that it runs meanwhile); batches are still written, and
committed, one at a time in fetch order.

A crash anywhere before 3 replays the batch. While the database is unreachable the
batch is retried with backoff, holding the stream (nothing is committed).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.logs import get_logger
from tokenmill.wire import EventKind, TokenEvent

from .config import StreamsConfig
from .decode import Rejected, parse
from .metrics import StreamMetrics
from .sink import BatchOutcome, LedgerSink, LedgerUnavailable, Plan
from .violations import violation_of

log = get_logger(__name__)


@dataclass(frozen=True)
class Record:
    """A consumed Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class RecordLike(Protocol):
    """What the processor reads of a record: a :class:`Record` or aiokafka's
    ``ConsumerRecord`` (handed over as fetched, without a copy)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Publisher(Protocol):
    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Awaitable[Any]:
        """Queue a message; the returned awaitable completes when the broker has it."""


@dataclass(frozen=True)
class Prepared:
    """A batch decoded and planned (:meth:`BatchProcessor.prepare`)."""

    records: Sequence[RecordLike]
    plan: Plan
    #: index of the record of each decoded event
    where: list[int]
    #: (record index, reason) of records that cannot be decoded
    rejects: list[tuple[int, str]]
    #: time.monotonic() when preparing began
    started: float
    #: seconds spent preparing
    prepare_s: float


@dataclass(frozen=True)
class BatchReport:
    """What one batch did (also logged)."""

    records: int
    recorded: int
    duplicates: int
    skipped: int
    dead_lettered: int
    violations: int
    #: time spent decoding and planning, writing (the transaction, retries included),
    #: and then publishing
    prepare_ms: float
    write_ms: float
    publish_ms: float


class BatchProcessor:
    """Processes batches (see the module docstring for the order): writes one at a time,
    and a caller may :meth:`prepare` the next batch while one is being written."""

    def __init__(
        self,
        sink: LedgerSink,
        config: StreamsConfig,
        publisher: Publisher,
        metrics: StreamMetrics | None = None,
        *,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.sink = sink
        self.config = config
        self.publisher = publisher
        self.metrics = metrics
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def prepare(self, records: Sequence[RecordLike]) -> Prepared:
        """Decode a batch and plan its ledger rows (CPU only: on the loop's thread, while
        the previous batch is being written)."""
        started = time.monotonic()
        events: list[TokenEvent] = []
        where: list[int] = []
        rejects: list[tuple[int, str]] = []
        validate, finished = TokenEvent.model_validate_json, EventKind.finished
        for i, rec in enumerate(records):
            # The usual case inline (parse() again decides, and says why, for the rest).
            try:
                event = validate(rec.value or b"")
            except ValueError:  # pydantic's ValidationError
                event = None
            if event is None or (event.kind is finished and (event.submitted_at is None
                                                             or event.finished_at is None)):  # fmt: skip
                parsed = parse(rec.value)
                if isinstance(parsed, Rejected):
                    rejects.append((i, parsed.reason))
                    continue
                event = parsed
            events.append(event)
            where.append(i)
        plan = self.sink.plan(events)
        return Prepared(records, plan, where, rejects, started, time.monotonic() - started)

    async def process(self, records: Sequence[RecordLike]) -> BatchReport:
        """Record a batch (:meth:`prepare`, then :meth:`finish`)."""
        return await self.finish(self.prepare(records))

    async def finish(self, prepared: Prepared) -> BatchReport:
        """Write a prepared batch, then publish its dead letters and violations; returns
        once everything it implies is durable (:meth:`start`, awaited).

        Raises:
            Exception: anything but an unreachable database (which is retried): the
                caller must not commit the batch's offsets.
        """
        return await self.start(prepared)

    def start(self, prepared: Prepared) -> Awaitable[BatchReport]:
        """Hand a prepared batch's transaction to its thread now; the returned awaitable
        does the rest of :meth:`finish`.

        The transaction runs on a thread of its own, so that the database's work (the
        bulk of it in SQLite's C code, without the GIL) overlaps the decoding and
        planning of the next batch on the loop's thread. Submitted here rather than when
        a task first runs: a caller that goes on to prepare the next batch without
        yielding to the loop would otherwise delay the transaction until it is done.
        """
        return self._complete(prepared, self._submit(prepared), time.monotonic())

    def _submit(self, prepared: Prepared) -> asyncio.Future[BatchOutcome]:
        call = contextvars.copy_context().run  # as asyncio.to_thread does
        return asyncio.get_running_loop().run_in_executor(
            None, call, self.sink.commit, prepared.plan
        )

    async def _complete(
        self, prepared: Prepared, writing: asyncio.Future[BatchOutcome], write_started: float
    ) -> BatchReport:
        records, started = prepared.records, prepared.started
        delay = self.backoff_s
        while True:
            try:
                outcome = await writing
                break
            except LedgerUnavailable as exc:
                log.warning(
                    "ledger unavailable; retrying the batch", error=str(exc), retry_in_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                writing = self._submit(prepared)
        rejects = prepared.rejects + [(prepared.where[j], why) for j, why in outcome.rejected]
        rejects.sort()
        committed_at = time.time()
        written = time.monotonic()
        pending: list[Awaitable[Any]] = []
        for i, reason in rejects:
            rec = records[i]
            headers = [
                ("reason", reason.encode()[:4000]),
                ("source-topic", rec.topic.encode()),
                ("source-partition", str(rec.partition).encode()),
                ("source-offset", str(rec.offset).encode()),
            ]
            pending.append(
                await self.publisher.send(
                    self.config.dead_letter_topic, rec.key, rec.value or b"", headers
                )
            )
        violations = 0
        for recorded in outcome.recorded:
            if not recorded.measurement.missed:  # most: no call
                continue
            violation = violation_of(recorded)
            if violation is not None:
                violations += 1
                pending.append(
                    await self.publisher.send(
                        self.config.violations_topic,
                        violation.tenant.encode(),
                        violation.to_bytes(),
                        [],
                    )
                )
        if pending:
            await asyncio.gather(*pending)
        if rejects:
            log.warning(
                "dead-lettered token events", count=len(rejects), first_reason=rejects[0][1]
            )
        done = time.monotonic()
        report = BatchReport(len(records), len(outcome.new), outcome.duplicates, outcome.skipped,
                             len(rejects), violations, round(prepared.prepare_s * 1000, 1),
                             round((written - write_started) * 1000, 1),
                             round((done - written) * 1000, 1))  # fmt: skip
        if self.metrics is not None:
            self.metrics.observe(outcome, dead_lettered=len(rejects), committed_at=committed_at,
                                 seconds=time.monotonic() - started)  # fmt: skip
        log.info("batch", **report.__dict__)
        return report

"""The batch runner: the service that takes batches from accepted to their files.

Every poll it reads the active batches from the ledger and, for each:

* ``validating`` → publishes every accepted line (request id
  ``batch_request_id(batch_id, custom_id)``) to its priority topic, then ``in_progress``;
* collects the lines' results from the result store (``MGET``, a thousand at a time),
  appends each outcome to ``results.jsonl`` (fsynced) and only then records it in the
  ledger (request state, batch counts) — each line once, and only a result of the
  batch's own tenant (another tenant's result under a line's id is ignored);
* ``cancelling`` (or past ``expires_at``) → cancels every unfinished line (the cancel
  flag the workers check, and a control message for the scheduler), keeps the
  results that still arrive, ends lines that never answer after ``cancel_grace_s``,
  then writes the files → ``cancelled`` (``expired``);
* all lines done → ``finalizing`` → writes ``output.jsonl`` and ``errors.jsonl``
  atomically, in input order → ``completed``; records the batch webhook and the two
  files' rows (their Files API ids, derived from the batch id, and their expiry when
  the batch has ``output_expires_after``) with the status change.

While a batch runs, ``results.jsonl`` is its progressive output (:mod:`.batch_partial`).
About every ``expire_every_s`` the runner also removes the output files of ended
batches whose ``output_expires_after`` has passed (:func:`.batches.expire_outputs`:
one indexed query when none is due).

Restarts: the ledger and the batch's files hold everything; Kafka and Redis may lose
everything (the local stack keeps neither across ``down``/``up``). A runner that
(re)starts — or finds Redis emptied under it — republishes every unfinished line that
has neither a result nor a dispatch mark, with the *same* request id: the scheduler
skips ids it already holds or dispatched, a worker stores the first outcome only,
and the runner ignores a second outcome of a line it has recorded. So every line of
the input ends exactly once in the output or error file.

Copies: run any number (``tokenmill up`` starts one). Each steps only the batches
whose lease it holds (:mod:`.batch_lease`), takes its share of the free ones, and
checks its lease with the batch locked in the ledger right before every write (file
and ledger alike), so a runner paused past its lease writes nothing once it resumes;
a dead runner's batches are resumed by another within the lease's TTL, by the restart
path above. Every ``results.jsonl`` record names the grant (``lease`` token) and the
runner (``by``) that wrote it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from .. import kafka, presence, tokens, wire
from ..config import Settings
from ..errors import TokenmillError
from ..ledger import Outcome, settle_requests
from ..logs import get_logger
from ..redis_client import async_redis
from ..stack import Endpoints
from ..wire import Batch, BatchStatus, RequestCounts, RequestState, Result
from ..workers import keys
from ..workers.cancel import request_cancel_many_async
from ..workers.results import stored_results_async
from .batch_files import (
    CANCELLED,
    EXPIRED,
    BatchDir,
    append_lines,
    dumps,
    outcome_entry,
    read_jsonl,
    repair_tail,
    write_atomic,
)
from .batch_lease import BatchLeases, LeaseLost
from .batch_partial import invalid_rows, recorded_results
from .batches import batch_data, expire_outputs, output_file_records

__all__ = ["BatchRunner", "serve"]

log = get_logger(__name__)

CHUNK = 1000
#: result keys a batch's poll may look up per second (a big batch is polled less often)
COLLECT_KEYS_PER_S = 50_000
EPOCH_KEY = keys.PREFIX + "batch-runner:epoch"
#: the service name copies announce themselves under (``tokenmill status``)
SERVICE = "batch-runner"
#: how often the number of live copies (for the fair share) is read again
_COPIES_EVERY_S = 1.0
_STATE_OF = {
    "succeeded": RequestState.FINISHED,
    "failed": RequestState.FAILED,
    "cancelled": RequestState.CANCELLED,
    "expired": RequestState.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class Line:
    line: int
    custom_id: str


@dataclass
class Tracker:
    """What the runner knows of one batch in this life (rebuilt from its files)."""

    batch_id: str
    tenant: str
    dir: BatchDir
    lines: dict[str, Line] = field(default_factory=dict)  #: request id → its line
    #: wire request JSON of every unfinished line, to (re)publish it
    raw: dict[str, bytes] = field(default_factory=dict)
    topic: dict[str, str] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)  #: request id → outcome status
    invalid: int = 0
    #: monotonic time unfinished lines were last published (or found in flight); None:
    #: not yet in this life
    published_at: float | None = None
    cancel_sent_at: float | None = None
    #: monotonic time of the next look for results
    next_collect: float = 0.0
    #: request ids whose stored result is another tenant's (warned about once)
    foreign: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, batch: Batch, d: BatchDir) -> Tracker:
        """Raises: FileNotFoundError when the batch's accepted lines are missing."""
        t = cls(batch.id, batch.tenant, d)
        if not d.requests.exists():
            raise FileNotFoundError(d.requests)
        for rec in read_jsonl(d.requests):
            req = rec["request"]
            t.lines[req["id"]] = Line(rec["line"], req["custom_id"])
            t.raw[req["id"]] = json.dumps(req).encode()
            t.topic[req["id"]] = wire.Priority(req.get("priority", "standard")).topic
        t.invalid = sum(1 for _ in read_jsonl(d.invalid))
        repair_tail(d.results)
        for rec in read_jsonl(d.results):
            rid = rec["request_id"]
            if rid in t.lines and rid not in t.done:
                t.done[rid] = rec["status"]
                t.raw.pop(rid, None)
        return t

    def pending(self) -> list[str]:
        return [rid for rid in self.lines if rid not in self.done]

    def counts(self) -> RequestCounts:
        completed = sum(1 for s in self.done.values() if s == "succeeded")
        return RequestCounts(
            total=self.invalid + len(self.lines),
            completed=completed,
            failed=self.invalid + len(self.done) - completed,
        )


class BatchRunner:
    """Run with :meth:`run`; stop by setting the event passed to it.

    Parameters:
        poll_s, max_poll_s: the pause between polls, doubling while nothing happens.
        cancel_grace_s: how long a cancelled or expiring batch waits for lines that
            were asked to stop before it ends them itself.
        republish_after_s: how often unfinished lines with neither a result nor a
            dispatch mark are published again (a broker that lost messages without
            Redis losing its data); the scheduler drops the copies it already holds.
        lease_s: the life of a batch's lease (renewed every poll, so well above
            ``max_poll_s`` and a poll's longest work); default ``[batch] lease_s``.
        expire_every_s: how often ended batches' expired output files are looked for
            (and removed).
    """

    def __init__(
        self,
        settings: Settings,
        endpoints: Endpoints,
        *,
        poll_s: float = 0.1,
        max_poll_s: float = 1.0,
        cancel_grace_s: float = 30.0,
        republish_after_s: float = 600.0,
        lease_s: float | None = None,
        expire_every_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.expire_every_s = expire_every_s
        self._expire_next = 0.0  #: monotonic time of the next look for expired outputs
        self.endpoints = endpoints
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.cancel_grace_s = cancel_grace_s
        self.republish_after_s = republish_after_s
        self.lease_s = settings.batch.lease_s if lease_s is None else lease_s
        self.trackers: dict[str, Tracker] = {}
        self._epoch: bytes | None = None
        self._copies = 1
        self._copies_at = -_COPIES_EVERY_S
        self._renewed_at = 0.0
        #: batches whose at-risk webhook is recorded (or that have none to record)
        self._at_risk_reported: set[str] = set()
        self._risk_read_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        from ..ledger import shared_factory

        self.factory = shared_factory(self.settings.ledger_url)
        bootstrap = self.endpoints.kafka_bootstrap
        await kafka.ensure_topics(bootstrap)
        self.redis = async_redis(self.endpoints.redis_url)
        self.leases = BatchLeases(self.redis, ttl_s=self.lease_s)
        self.producer = kafka.producer(bootstrap)
        await kafka.start(self.producer, "batch runner producer")
        log.info("batch runner started", owner=self.leases.owner, lease_s=self.lease_s)
        quiet = asyncio.Event()  # ends the announcements once this runner is done
        announcing = asyncio.create_task(presence.run_presence(
            self.redis, SERVICE, quiet, lambda: ("copy", {"batches": sorted(self.leases.held)})))
        interval = self.poll_s
        try:
            while not stop.is_set():
                try:
                    busy = await self.tick()
                except (TokenmillError, RedisError, KafkaError, OSError) as exc:
                    log.error("batch runner poll failed; retrying", error=repr(exc))
                    busy = False
                except Exception:  # a bug: keep the other batches going, loudly
                    log.exception("batch runner poll crashed; retrying")
                    busy = False
                interval = self.poll_s if busy else min(self.max_poll_s, interval * 2)
                if busy:
                    try:
                        await asyncio.wait_for(stop.wait(), interval)
                    except TimeoutError:
                        pass
                elif await self._woken(interval):
                    interval = self.poll_s
        finally:
            try:  # hand the batches over now rather than after the TTL
                await self.leases.release_all()
            except (RedisError, OSError) as exc:
                log.warning("batch leases not released; they expire", error=repr(exc))
            quiet.set()
            await announcing
            await self.producer.stop()
            await self.redis.aclose()
            log.info("batch runner stopped")

    async def _woken(self, timeout: float) -> bool:
        """Idle: block until the gateway announces a new batch (True) or ``timeout``."""
        try:
            return await self.redis.blpop([keys.BATCH_WAKE], timeout=timeout) is not None
        except RedisError:
            await asyncio.sleep(timeout)
            return False

    async def tick(self) -> bool:
        """One poll over the active batches this runner holds (taking its share of the
        free ones first); True if anything happened."""
        from ..ledger import active_batches, transaction

        await self._check_epoch()
        await self._renew()
        with transaction(self.factory) as session:
            active = active_batches(session)
        ids = {b.id for b in active}
        for gone in set(self.trackers) - ids:
            del self.trackers[gone]
        for gone in set(self.leases.held) - ids:
            await self.leases.release(gone)
        for lease in await self.leases.take([b.id for b in active], await self._live_copies()):
            self.trackers.pop(lease.batch_id, None)  # (re)load under the new grant
        busy = False
        for batch in active:
            if time.monotonic() - self._renewed_at > self.lease_s / 3:
                await self._renew()  # a long poll must not outlive its leases
            if batch.id not in self.leases.held:
                continue
            try:
                tracker = self.trackers.get(batch.id) or await self._load(batch)
                if tracker is not None:
                    busy |= await self._step(tracker, batch)
            except LeaseLost as exc:
                log.warning("batch lease lost; leaving the batch to its new holder", batch_id=batch.id,
                            error=str(exc))
                self.trackers.pop(batch.id, None)
            except (RedisError, KafkaError):
                raise  # infrastructure: the whole poll retries
            except Exception:  # one broken batch must not stall the others
                log.exception("batch step failed; reloading it next poll", batch_id=batch.id)
                self.trackers.pop(batch.id, None)
        await self._report_at_risk([b for b in active if b.id in self.leases.held])
        self._expire_outputs()
        return busy

    def _expire_outputs(self) -> None:
        """At most every ``expire_every_s``: remove ended batches' expired output files."""
        if time.monotonic() < self._expire_next:
            return
        self._expire_next = time.monotonic() + self.expire_every_s
        try:
            removed = expire_outputs(self.settings, factory=self.factory, limit=_EXPIRE_LIMIT)
        except (TokenmillError, OSError) as exc:
            log.warning("removing expired batch outputs failed; retrying later", error=repr(exc))
            return
        if removed:
            log.info("removed expired batch outputs", batches=len(removed))
        if len(removed) >= _EXPIRE_LIMIT:
            self._expire_next = 0.0  # more are due: go on next poll

    async def _report_at_risk(self, held: list[Batch]) -> None:
        """Tell a batch's webhook, once, that the scheduler forecasts it to miss its
        completion window (``batch.at_risk``), while there is still time to act."""
        from ..ledger import batch_summaries, transaction
        from ..scheduler.deadlines import FORECASTS_KEY, forecast_json
        from ..workers.webhooks import enqueue_event
        from .batches import batch_data

        if time.monotonic() - self._risk_read_at < _RISK_EVERY_S:
            return
        self._risk_read_at = time.monotonic()
        self._at_risk_reported &= {b.id for b in held}
        todo = [b for b in held if b.id not in self._at_risk_reported
                and b.status is BatchStatus.in_progress]  # fmt: skip
        if not todo:
            return
        raws = await self.redis.hmget(FORECASTS_KEY, [b.id for b in todo])
        for batch, raw in zip(todo, raws):
            forecast = forecast_json(raw)
            if forecast is None or not forecast["at_risk"]:
                continue
            log.warning("batch at risk of missing its window", batch_id=batch.id,
                        tenant=batch.tenant, expires_at=batch.expires_at,
                        estimated_completion_at=forecast["estimated_completion_at"])  # fmt: skip
            if batch.webhook_url:
                with transaction(self.factory) as session:
                    b = await self._fenced(session, batch.id)
                    summary = batch_summaries(session, [b.id])[b.id]
                    enqueue_event(session, key=f"{b.id}:at_risk", tenant=b.tenant,
                                  url=batch.webhook_url, event_type="batch.at_risk",
                                  data={**batch_data(b, summary), "forecast": forecast})  # fmt: skip
            self._at_risk_reported.add(batch.id)

    async def _renew(self) -> None:
        for lost in await self.leases.renew():
            self.trackers.pop(lost, None)
        self._renewed_at = time.monotonic()

    async def _live_copies(self) -> int:
        """Live batch runners (this one included), re-read about once a second."""
        if time.monotonic() - self._copies_at >= _COPIES_EVERY_S:
            live = await presence.live_instances_async(self.redis)
            self._copies = max(1, sum(1 for i in live if i.service == SERVICE))
            self._copies_at = time.monotonic()
        return self._copies

    async def _fenced(self, session: Any, batch_id: str) -> Batch:
        """Lock the batch in the ledger, then check this runner still holds its lease:
        call first in every transaction that writes for a batch (see :mod:`.batch_lease`).

        Raises:
            LeaseLost: another runner holds the batch now; write nothing.
        """
        from ..ledger import lock_batch

        b = lock_batch(session, batch_id)
        await self.leases.check(batch_id)
        return b

    async def _check_epoch(self) -> None:
        """Notice Redis losing its data (a restarted local stack): republish then."""
        epoch = await self.redis.get(EPOCH_KEY)
        if epoch is None:
            await self.redis.set(EPOCH_KEY, uuid.uuid4().hex.encode(), nx=True)
            epoch = await self.redis.get(EPOCH_KEY)
        if epoch != self._epoch:
            if self._epoch is not None:
                log.warning("the result store lost its data; republishing unfinished lines")
            self._epoch = epoch
            for t in self.trackers.values():
                t.published_at = None

    async def _load(self, batch: Batch) -> Tracker | None:
        from ..ledger import transaction, unfinished_batch_requests

        d = BatchDir.of(self.settings.home, batch.id)
        # Read the files with the batch locked under this grant: a previous holder's
        # last write is either complete in them or never happens.
        t: Tracker | None = None
        with transaction(self.factory) as session:
            await self._fenced(session, batch.id)
            try:
                t = Tracker.load(batch, d)
            except FileNotFoundError:
                pass
            else:  # outcomes recorded in the file only
                pending = set(unfinished_batch_requests(session, batch.id)) & set(t.done)
                if pending:  # killed between the file's append and the ledger's commit
                    settle_requests(session, _recovered_outcomes(d, pending))
        if t is None:
            log.error("batch files missing; failing the batch", batch_id=batch.id, dir=str(d.root))
            await self._end(batch.id, BatchStatus.failed, None)
            return None
        self.trackers[batch.id] = t
        log.info("tracking batch", batch_id=batch.id, status=batch.status.value,
                 lines=len(t.lines), done=len(t.done))
        return t

    # -- one batch ---------------------------------------------------------------------

    async def _step(self, t: Tracker, batch: Batch) -> bool:
        now = time.time()
        ending: tuple[str, str] | None = None
        if batch.status is BatchStatus.cancelling:
            ending = CANCELLED
        elif batch.status in (BatchStatus.validating, BatchStatus.in_progress) and now >= batch.expires_at:
            ending = EXPIRED
        if ending is None and batch.status is BatchStatus.validating:
            await self._publish(t, t.pending())
            t.published_at = time.monotonic()
            await self._mark_published(batch.id)
            return True
        if ending is None and (
            t.published_at is None or time.monotonic() - t.published_at > self.republish_after_s
        ):
            await self._republish_missing(t)
            t.published_at = time.monotonic()
        busy = False
        if time.monotonic() >= t.next_collect:
            t.next_collect = time.monotonic() + len(t.pending()) / COLLECT_KEYS_PER_S
            busy = await self._collect(t, batch.id, ending)
        if ending is not None and t.pending():
            busy |= await self._end_lines(t, batch, ending, now)
        if not t.pending():
            await self._finalize(t, batch, ending)
            busy = True
        return busy

    async def _publish(self, t: Tracker, rids: Sequence[str]) -> None:
        key = t.tenant.encode()
        for start in range(0, len(rids), CHUNK):
            chunk = [r for r in rids[start : start + CHUNK] if r in t.raw]
            futures = [await self.producer.send(t.topic[r], t.raw[r], key=key) for r in chunk]
            await asyncio.gather(*futures)
        if rids:
            log.info("published batch lines", batch_id=t.batch_id, lines=len(rids))

    async def _mark_published(self, batch_id: str) -> None:
        from ..ledger import transaction, upsert_batch

        with transaction(self.factory) as session:
            b = await self._fenced(session, batch_id)
            update: dict[str, Any] = {"in_progress_at": b.in_progress_at or time.time()}
            if b.status is BatchStatus.validating:
                update["status"] = BatchStatus.in_progress
            upsert_batch(session, b.model_copy(update=update))

    async def _republish_missing(self, t: Tracker) -> None:
        """Publish the unfinished lines that have neither a result nor a dispatch mark
        (lost with a restarted broker/Redis, or never sent)."""
        missing: list[str] = []
        pending = t.pending()
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start : start + CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            pipe.mget([keys.result(r) for r in chunk])
            for r in chunk:
                pipe.exists(keys.dispatched(r))
            results, *marks = await pipe.execute()
            missing += [r for r, res, mark in zip(chunk, results, marks) if res is None and not mark]
        await self._publish(t, missing)

    async def _collect(self, t: Tracker, batch_id: str, ending: tuple[str, str] | None) -> bool:
        pending = t.pending()
        outcomes: list[tuple[str, str, dict[str, Any], Result | None]] = []
        async for rid, result in stored_results_async(self.redis, pending, chunk=CHUNK):
            if result.tenant != t.tenant:
                # Never copy another tenant's result into this batch's output (or its
                # token counts into the ledger); the line ends when the batch does.
                if rid not in t.foreign:
                    t.foreign.add(rid)
                    log.warning("ignoring a result of another tenant", batch_id=batch_id,
                                request_id=rid, tenant=t.tenant, result_tenant=result.tenant)
                continue
            line = t.lines[rid]
            status, entry = outcome_entry(batch_id, line.line, line.custom_id, result, ended_as=ending)
            outcomes.append((rid, status, entry, result))
        if outcomes:
            await self._record(t, outcomes)
        return bool(outcomes)

    async def _end_lines(self, t: Tracker, batch: Batch, ending: tuple[str, str], now: float) -> bool:
        pending = t.pending()
        never_published = batch.in_progress_at is None and t.published_at is None
        if t.cancel_sent_at is None:
            if not never_published:
                await self._cancel(t, pending)
            t.cancel_sent_at = now
            log.info("ending batch lines", batch_id=t.batch_id, lines=len(pending), why=ending[0])
        if not never_published and now - t.cancel_sent_at < self.cancel_grace_s:
            return False
        outcomes = []
        for rid in pending:
            line = t.lines[rid]
            status, entry = outcome_entry(batch.id, line.line, line.custom_id, None, ended_as=ending)
            outcomes.append((rid, status, entry, None))
        await self._record(t, outcomes)
        return True

    async def _cancel(self, t: Tracker, rids: Sequence[str]) -> None:
        key = t.tenant.encode()
        for start in range(0, len(rids), CHUNK):
            chunk = rids[start : start + CHUNK]
            await request_cancel_many_async(self.redis, chunk)
            futures = [
                await self.producer.send(
                    wire.CONTROL_TOPIC,
                    wire.ControlMessage(kind=wire.ControlKind.cancel, request_id=r, tenant=t.tenant).to_bytes(),
                    key=key,
                )
                for r in chunk
            ]
            await asyncio.gather(*futures)

    async def _record(self, t: Tracker, outcomes: Sequence[tuple[str, str, dict[str, Any], Result | None]]) -> None:
        """Outcomes to the file first (durable), then the ledger: both in one ledger
        transaction that holds the batch under this runner's lease (a crash between the
        two is what :func:`_recovered_outcomes` repairs on the next load)."""
        from ..ledger import transaction, upsert_batch

        with transaction(self.factory) as session:
            b = await self._fenced(session, t.batch_id)
            token, by = self.leases.token(t.batch_id), self.leases.owner
            append_lines(
                t.dir.results,
                (
                    {"line": t.lines[rid].line, "custom_id": t.lines[rid].custom_id, "request_id": rid,
                     "status": status, "entry": entry,
                     "finished_at": None if result is None else result.finished_at,
                     "lease": token, "by": by}
                    for rid, status, entry, result in outcomes
                ),
            )
            for rid, status, _, _ in outcomes:
                t.done[rid] = status
                t.raw.pop(rid, None)
            settle_requests(session, [_outcome(rid, status, result) for rid, status, _, result in outcomes])
            if not b.status.is_terminal:
                upsert_batch(session, b.model_copy(update={"request_counts": t.counts()}))

    # -- the end ---------------------------------------------------------------------------

    async def _finalize(self, t: Tracker, batch: Batch, ending: tuple[str, str] | None) -> None:
        from ..ledger import transaction, upsert_batch

        if ending is None:
            with transaction(self.factory) as session:
                b = await self._fenced(session, batch.id)
                if b.status is BatchStatus.in_progress:
                    b = b.model_copy(update={"status": BatchStatus.finalizing, "finalizing_at": time.time()})
                    upsert_batch(session, b)
            if b.status is not BatchStatus.finalizing:
                return  # cancelled meanwhile: the next poll ends it as cancelled
        end = {None: BatchStatus.completed, CANCELLED: BatchStatus.cancelled, EXPIRED: BatchStatus.expired}[ending]
        await self._end(batch.id, end, t)

    async def _end(self, batch_id: str, end: BatchStatus, t: Tracker | None) -> None:
        """Write the output and error files (with ``t``), then move the batch to terminal
        status ``end`` and record its webhook and the files' rows (file ids for the Files
        API), together, under this runner's lease."""
        from ..ledger import add_file, batch_summaries, transaction, upsert_batch
        from ..ledger.batches import record_output_expiry
        from ..workers.webhooks import enqueue_event

        with transaction(self.factory) as session:
            b = await self._fenced(session, batch_id)
            if b.status.is_terminal:
                return
            if t is not None:
                output, errors = assemble(t)
                write_atomic(t.dir.output, (dumps(e) for e in output))
                write_atomic(t.dir.errors, (dumps(e) for e in errors))
            if end is BatchStatus.expired and b.status is BatchStatus.cancelling:
                end = BatchStatus.cancelled
            now = time.time()
            update: dict[str, Any] = {"status": end, f"{end.value}_at": now}
            if t is not None:
                update.update(output_file=str(t.dir.output), error_file=str(t.dir.errors),
                              request_counts=t.counts())
            b = b.model_copy(update=update)
            upsert_batch(session, b)
            # output_expires_after counts from the files' creation: now
            expires = record_output_expiry(session, b.id, now) if t is not None else None
            for f in output_file_records(b, now, expires_at=expires):
                add_file(session, f)
            if b.webhook_url:
                summary = batch_summaries(session, [b.id])[b.id]
                enqueue_event(
                    session, key=f"{b.id}:{end.value}", tenant=b.tenant, url=b.webhook_url,
                    event_type=f"batch.{end.value}", data=batch_data(b, summary),
                )
        log.info("batch ended", batch_id=batch_id, status=end.value,
                 counts=batch_data(b)["request_counts"])


#: how often held batches' forecasts are read for at-risk webhooks
_RISK_EVERY_S = 1.0
#: expired outputs removed per look
_EXPIRE_LIMIT = 100


def assemble(t: Tracker) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output and error entries of a finished batch, each line once (its first
    record), in input order: the rows :mod:`.batch_partial` reads progressively, sorted."""
    output: list[tuple[int, dict[str, Any]]] = []
    errors: list[tuple[int, dict[str, Any]]] = []
    for line, kind, entry in recorded_results(t.dir, lambda rec: rec.get("request_id") in t.lines):
        (output if kind == "output" else errors).append((line, entry))
    errors.extend(invalid_rows(t.dir))
    return [e for _, e in sorted(output, key=_first)], [e for _, e in sorted(errors, key=_first)]


def _first(item: tuple[int, Any]) -> int:
    return item[0]


def _recovered_outcomes(d: BatchDir, rids: set[str]) -> list[Outcome]:
    """The ends of lines ``rids`` as ``results.jsonl`` recorded them: status, finish and
    the usage of the output line, so the ledger gets the counts it would have got."""
    found: dict[str, Outcome] = {}
    for rec in read_jsonl(d.results):
        rid = rec["request_id"]
        if rid not in rids or rid in found:
            continue
        body = (rec["entry"].get("response") or {}).get("body") or {}
        usage = body.get("usage") if isinstance(body, dict) else None
        at = rec.get("finished_at")
        found[rid] = Outcome(
            rid, _STATE_OF[rec["status"]],
            at=None if at is None else datetime.fromtimestamp(at, UTC),
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            completion_tokens=usage.get("completion_tokens") if usage else None,
        )  # fmt: skip
    return [found[rid] for rid in sorted(found)]


def _outcome(rid: str, status: str, result: Result | None) -> Outcome:
    """A line's end for the ledger (:func:`~tokenmill.ledger.settle_requests`)."""
    if result is None:
        return Outcome(rid, _STATE_OF[status])
    return Outcome(
        rid, _STATE_OF[status], at=datetime.fromtimestamp(result.finished_at, UTC),
        error=None if result.error is None else f"{result.error.code}: {result.error.message}",
        prompt_tokens=result.usage.prompt_tokens if result.usage else None,
        completion_tokens=result.usage.completion_tokens if result.usage else None,
    )


async def serve(settings: Settings, endpoints: Endpoints, stop: asyncio.Event | None = None) -> None:
    """Run the batch runner until ``stop`` is set (or SIGTERM/SIGINT)."""
    import signal

    stop = stop or asyncio.Event()
    await asyncio.to_thread(tokens.load_counters, settings)  # exact counts from the start
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await BatchRunner(settings, endpoints).run(stop)

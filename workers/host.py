"""The engine host: one engine, many requests in flight, events and results out.

The host owns one asyncio loop in a dedicated thread. Celery's task threads hand it
slices of :class:`~tokenmill.wire.Dispatch` (:meth:`EngineHost.run_slice`, blocking)
and it runs every request of every slice concurrently on the engine, so the engine
batches them continuously.

For each request it:

1. takes the request's lease (:mod:`~tokenmill.workers.lease`) — if another live worker
   holds it, waits for that worker's outcome instead of running it again;
2. skips it if it already has a result (a redelivery after the outcome was stored),
   sending its stored terminal event again: whoever dispatched it again (a scheduler
   restarted between sending a slice and marking it dispatched) settles it by that
   event, and every consumer of events takes a repeated one as a no-op;
3. honours a cancel requested before start (:mod:`~tokenmill.workers.cancel`);
4. emits ``dispatched``, then ``first_token`` and coalesced ``progress`` events while
   the engine streams, and ``delta`` entries to the result stream for streaming
   requests;
5. commits the outcome (result + terminal event, first outcome wins) and then
   delivers the terminal event: ``finished``, ``failed`` (with the reason — an
   engine failure is never dropped) or ``cancelled``; the last two (and the Result's
   usage) carry the engine's counts of the work done so far (see ``Engine.abort``),
   zero for a request the engine never had.

Each request runs at its engine priority (:func:`~.engines.base.engine_priority`: its
class, and the dispatch's ``urgent`` flag for batch lines), and its terminal event
counts the times the engine preempted it.

Once a second (``maintenance_interval_s``) it publishes the worker's heartbeat (capacity,
the slots of it reserved for interactive requests, and the engine's own stats),
renews its leases and its messages' broker visibility; every ``cancel_poll_s`` it
checks the cancel keys of the requests it runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import loops
from ..errors import EngineDeadError, EngineError, ValidationError
from ..logs import get_logger
from ..redis_client import async_redis
from ..wire import (
    Dispatch,
    ErrorInfo,
    EventKind,
    Result,
    ResultStatus,
    TokenEvent,
    Usage,
    WorkerHeartbeat,
    decode,
)
from . import heartbeat
from .attempt import Attempt
from .batching import Coalescer
from .cancel import CancelWatch
from .engines.base import Engine, EngineStep, engine_priority
from .events import EventSink
from .lease import Admission, Leases, renew_visibility
from .outbox import Outbox
from .responses import response_body
from .results import ResultStore

__all__ = ["EngineHost", "HostConfig", "Outcome"]

log = get_logger(__name__)


@dataclass(frozen=True)
class HostConfig:
    worker: str
    pool: str
    model: str
    #: slots of the engine's capacity that only interactive requests take (the model's
    #: ``interactive_headroom``): told to the scheduler in the heartbeat
    reserved: int = 0
    #: a ``progress`` event after this many new tokens ...
    progress_tokens: int = 64
    #: ... or when this long has passed since the previous event of the request
    progress_interval_s: float = 0.25
    #: request lease lifetime; renewed every ``maintenance_interval_s``
    lease_ttl_s: float = 15.0
    maintenance_interval_s: float = 1.0
    heartbeat_ttl_s: float = 10.0
    cancel_poll_s: float = 0.25
    #: kombu's ``unacked_index`` key whose scores we renew (None: do not renew)
    visibility_index_key: str | None = "unacked_index"
    result_ttl_s: int = 7 * 24 * 3600
    stream_ttl_s: int = 24 * 3600


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request of a slice."""

    request_id: str
    #: a :class:`~tokenmill.wire.ResultStatus` value
    status: str
    #: False if it was already settled (a redelivery), True if this worker ran it
    ran: bool
    attempt: int | None = None


class EngineHost:
    """Runs requests on ``engine`` (see the module docstring).

    Parameters:
        engine: the engine; started in the host's loop by :meth:`start`.
        config: names and timings.
        redis_url: the result store / lease / heartbeat Redis.
        sink: where token events go (started and closed by the host).
        on_dead: called (in the host thread) once if the engine dies.
    """

    def __init__(
        self,
        engine: Engine,
        config: HostConfig,
        *,
        redis_url: str,
        sink: EventSink,
        on_dead: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.redis_url = redis_url
        self.sink = sink
        self.on_dead = on_dead
        self.dead: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._runs: dict[str, Attempt] = {}
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._tags: Counter[str] = Counter()
        self._cancels = CancelWatch()
        self._background: set[asyncio.Task[None]] = set()

    # -- thread-side API --------------------------------------------------------

    def start(self, timeout_s: float = 900.0) -> None:
        """Start the loop thread and the engine; return once requests can be served.

        Raises:
            EngineError: the engine (or Redis/Kafka) failed to start.
        """
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="tokenmill-host", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise EngineError(f"engine {self.engine.name} not ready after {timeout_s:.0f}s") from exc

    def stop(self, timeout_s: float = 60.0) -> None:
        """Shut the engine down, flush events, leave the pool; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(self._stopping.set)  # type: ignore[union-attr]
        thread.join(timeout_s)

    def run_slice(
        self, dispatches: Sequence[Dispatch], *, delivery_tag: str | None = None
    ) -> list[Outcome]:
        """Run every request of a slice concurrently; block until all are settled.

        Raises:
            StackError: Redis or Kafka failed (the message should be retried).
        """
        return self.submit_slice(dispatches, delivery_tag=delivery_tag).result()

    def submit_slice(
        self, dispatches: Sequence[Dispatch], *, delivery_tag: str | None = None
    ) -> concurrent.futures.Future[list[Outcome]]:
        if self._loop is None:
            raise EngineError("engine host is not started")
        return asyncio.run_coroutine_threadsafe(
            self._serve_slice(list(dispatches), delivery_tag), self._loop
        )

    def report_invalid(self, raw: Any, reason: str) -> str | None:
        """Fail a dispatch that cannot be read, if it names a request; returns its id."""
        req = raw.get("request") if isinstance(raw, dict) else None
        if not isinstance(req, dict) or self._loop is None:
            return None
        rid, tenant, model = req.get("id"), req.get("tenant"), req.get("model")
        if not all(isinstance(x, str) and x for x in (rid, tenant, model)):
            return None
        coro = self._report_invalid(rid, tenant, model, reason)
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        return rid

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    @property
    def capacity(self) -> int:
        return 0 if self.dead is not None else self.engine.capacity

    # -- the loop ------------------------------------------------------------------

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = loops.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            loop.close()

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._stopping = asyncio.Event()
        self.redis = async_redis(
            self.redis_url, blocking=True, max_connections=64, timeout=30, health_check_interval=30
        )
        self.store = ResultStore(
            self.redis, result_ttl_s=self.config.result_ttl_s, stream_ttl_s=self.config.stream_ttl_s
        )
        self.leases = Leases(self.redis, self.config.worker, ttl_s=self.config.lease_ttl_s)
        self.outbox = Outbox(self.sink, self.store, self.redis)
        self._finish = Coalescer(self._finish_many)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.redis.ping()
            await self.sink.start()
            await self.engine.start()
            tasks = [
                asyncio.create_task(self.outbox.run(), name="tokenmill-host-flusher"),
                asyncio.create_task(self._maintain(), name="tokenmill-host-maintain"),
            ]
            await self._beat()
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            ready.set_exception(
                exc if isinstance(exc, EngineError) else EngineError(f"start failed: {exc!r}")
            )
            await self._close(tasks)
            return
        ready.set_result(None)
        await self._stopping.wait()
        await self._close(tasks)

    async def _close(self, tasks: list[asyncio.Task[None]]) -> None:
        maintain = [t for t in tasks if t.get_name() == "tokenmill-host-maintain"]
        for task in maintain:  # no heartbeat after we left the pool
            task.cancel()
        await asyncio.gather(*maintain, return_exceptions=True)
        for run in list(self._runs.values()):
            if run.gen_task is not None:
                run.gen_task.cancel()
        steps = [
            heartbeat.remove(self.redis, self.config.pool, self.config.worker),
            self.engine.shutdown(),
        ]
        if any(t.get_name() == "tokenmill-host-flusher" for t in tasks):
            steps.append(self.outbox.barrier())  # queued events out before the sink closes
        for coro in steps:
            try:
                await asyncio.wait_for(coro, 30)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.warning("host shutdown step failed", error=repr(exc))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.sink.close()
        finally:
            await self.redis.aclose()

    # -- serving ---------------------------------------------------------------------

    async def _serve_slice(self, dispatches: list[Dispatch], tag: str | None) -> list[Outcome]:
        if tag:
            self._tags[tag] += 1
        try:
            loop = asyncio.get_running_loop()
            jobs: list[Any] = []
            fresh: list[Dispatch] = []
            for d in dispatches:
                rid = d.request.id
                if rid in self._waiters:  # already served here (this slice or another)
                    jobs.append(self._follow(rid, self._waiters[rid]))
                else:
                    self._waiters[rid] = loop.create_future()
                    fresh.append(d)
                    jobs.append(d)
            try:
                admissions = await self.leases.admit([d.request.id for d in fresh])
            except BaseException as exc:
                for d in fresh:
                    self._fail_waiter(d.request.id, exc)
                raise
            admitted = dict(zip((d.request.id for d in fresh), admissions))
            coros = [
                self._serve(j, admitted[j.request.id]) if isinstance(j, Dispatch) else j for j in jobs
            ]
            got = await asyncio.gather(*coros, return_exceptions=True)
        finally:
            if tag:
                self._tags[tag] -= 1
                if self._tags[tag] <= 0:
                    del self._tags[tag]
        for item in got:
            if isinstance(item, BaseException):
                raise item
        return list(got)

    async def _follow(self, rid: str, waiter: asyncio.Future[Outcome]) -> Outcome:
        done = await asyncio.shield(waiter)
        return Outcome(rid, done.status, ran=False, attempt=done.attempt)

    def _fail_waiter(self, rid: str, exc: BaseException) -> None:
        waiter = self._waiters.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            waiter.exception()  # retrieved: no "never retrieved" warning

    async def _serve(self, dispatch: Dispatch, admission: Admission) -> Outcome:
        rid = dispatch.request.id
        waiter = self._waiters[rid]
        settled_by_us = False
        try:
            while not admission.acquired:
                # Another live worker runs it: wait for its outcome or for its lease to lapse.
                settled = await self._settled(rid)
                if settled is not None:
                    waiter.set_result(settled)
                    return settled
                await asyncio.sleep(min(1.0, self.config.lease_ttl_s / 3))
                [admission] = await self.leases.admit([rid])
            if admission.result is not None:
                outcome = await self._resend(rid, admission)
            else:
                attempt = max(dispatch.attempt, admission.attempt)
                run = Attempt(dispatch, attempt, self.config.worker, self.engine.simulated)
                self._runs[rid] = run
                self._cancels.started(rid)
                try:
                    deadline = dispatch.request.deadline
                    if admission.cancel_requested:
                        outcome = await self._conclude(run, ResultStatus.cancelled)
                    elif deadline is not None and time.time() > deadline:
                        outcome = await self._conclude(
                            run, ResultStatus.expired, "expired", "its deadline passed before it ran"
                        )
                    else:
                        outcome = await self._attempt(run)
                finally:
                    self._runs.pop(rid, None)
                settled_by_us = outcome.ran
            waiter.set_result(outcome)
            return outcome
        except BaseException as exc:
            self._fail_waiter(rid, exc)
            raise
        finally:
            self._waiters.pop(rid, None)
            if not settled_by_us:
                await self.leases.release(rid)

    async def _settled(self, rid: str) -> Outcome | None:
        """If ``rid`` has a result: make sure its terminal event went out; else None."""
        result, event, reported = await self.store.outcome(rid)
        if result is None:
            return None
        if event is not None:
            await self.outbox.deliver(event)
            if not reported:
                await self.store.mark_reported(rid)
        return Outcome(rid, result.status.value, ran=False, attempt=event.attempt if event else None)

    async def _resend(self, rid: str, admission: Admission) -> Outcome:
        """Already settled (a redelivery): send the stored terminal event again (see 2.)."""
        result = decode(Result, admission.result or b"")
        event = decode(TokenEvent, admission.final_event) if admission.final_event else None
        if event is not None:
            await self.outbox.deliver(event)
            if not admission.reported:
                await self.store.mark_reported(rid)
        return Outcome(rid, result.status.value, ran=False, attempt=event.attempt if event else None)

    async def _attempt(self, run: Attempt) -> Outcome:
        rid = run.request.id
        self.outbox.emit(run.event(EventKind.dispatched))
        # Generation runs as a task of its own so that a cancel can stop it without
        # cancelling this one; awaiting it directly (not asyncio.wait) keeps that cheap.
        run.gen_task = asyncio.create_task(self._generate(run))
        exc: BaseException | None = None
        try:
            await run.gen_task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # we were cancelled (shutdown)
                await self.engine.abort(rid)
                raise
            # else the generation was cancelled by _cancel: concluded below
        except BaseException as failed:  # noqa: BLE001 - concluded below as a failure
            exc = failed
        if run.finish_reason is not None:
            return await self._conclude(run, ResultStatus.succeeded)
        if run.cancel_requested:
            return await self._conclude(run, ResultStatus.cancelled)
        if isinstance(exc, ValidationError):
            return await self._conclude(run, ResultStatus.failed, "invalid_request", str(exc))
        if isinstance(exc, EngineDeadError):
            self._engine_died(exc)
            return await self._conclude(run, ResultStatus.failed, "engine_dead", str(exc))
        if isinstance(exc, EngineError):
            return await self._conclude(run, ResultStatus.failed, "engine_error", str(exc))
        if exc is not None:
            log.error("request failed unexpectedly", request_id=rid, error=repr(exc))
            return await self._conclude(
                run, ResultStatus.failed, "internal_error", f"{type(exc).__name__}: {exc}"
            )
        return await self._conclude(
            run, ResultStatus.failed, "engine_error", "the engine ended the request without finishing it"
        )

    async def _generate(self, run: Attempt) -> None:
        cfg = self.config
        gen = self.engine.generate(
            run.request, engine_priority(run.request.priority, run.dispatch.urgent)
        )
        try:
            async for step in gen:
                self._apply(run, step)
                if run.stream_text:
                    self._flush_stream(run)  # streaming clients get every engine output
                if run.first_token_at is None:
                    if run.completion_tokens > 0:
                        run.first_token_at = time.time()
                        if not step.done:  # else the terminal event carries first_token_at
                            self.outbox.emit(run.event(EventKind.first_token))
                elif (
                    not step.done
                    and run.completion_tokens > run.event_tokens
                    and (
                        run.completion_tokens - run.event_tokens >= cfg.progress_tokens
                        or time.time() - run.event_at >= cfg.progress_interval_s
                    )
                ):
                    self.outbox.emit(run.event(EventKind.progress))
                if step.done:
                    return
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()

    def _apply(self, run: Attempt, step: EngineStep) -> None:
        if step.text:
            run.text.append(step.text)
            if run.streaming:
                run.stream_text.append(step.text)
        run.completion_tokens = step.completion_tokens
        run.prompt_tokens = step.prompt_tokens
        run.preemptions = step.preemptions
        if step.embeddings is not None:
            run.embeddings = step.embeddings
        if step.done:
            run.finish_reason = step.finish_reason

    async def _cancel(self, run: Attempt) -> None:
        if run.cancel_requested or run.finish_reason is not None:
            return
        run.cancel_requested = True
        try:
            done = await self.engine.abort(run.request.id)
            if done is not None:  # the work done, delivered or not, is what is billed
                run.prompt_tokens = max(run.prompt_tokens, done.prompt_tokens)
                run.completion_tokens = max(run.completion_tokens, done.completion_tokens)
        finally:
            if run.gen_task is not None and not run.gen_task.done():
                run.gen_task.cancel()

    async def _conclude(
        self, run: Attempt, status: ResultStatus, code: str | None = None, message: str | None = None
    ) -> Outcome:
        req = run.request
        now = time.time()
        usage = Usage(prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens)
        body = None
        if status is ResultStatus.succeeded:
            body = response_body(
                req, "".join(run.text), run.finish_reason or "stop", usage, embeddings=run.embeddings,
                simulated=self.engine.simulated, created=now,
            )
        error = None
        if status is ResultStatus.cancelled:
            error = ErrorInfo(code="cancelled", message="cancelled at the client's request")
        elif code is not None:
            error = ErrorInfo(code=code, message=message or code)
        kind = {
            ResultStatus.succeeded: EventKind.finished,
            ResultStatus.failed: EventKind.failed,
            ResultStatus.cancelled: EventKind.cancelled,
            ResultStatus.expired: EventKind.failed,  # no event kind of its own: reason says so
        }[status]
        self._flush_stream(run)
        event = run.event(
            kind,
            finished_at=now,
            reason=None if error is None else f"{error.code}: {error.message}",
            preemptions=run.preemptions,
        )
        result = Result(
            request_id=req.id, tenant=req.tenant, model=req.model, status=status, body=body,
            error=error, usage=usage, worker=self.config.worker, batch_id=req.batch_id,
            custom_id=req.custom_id, finished_at=now,
        )
        if run.streaming:
            await self.outbox.barrier()  # stream deltas land before the stream's end entry
        if not await self._finish((result, event)):
            settled = await self._settled(req.id)  # someone settled it first: theirs stands
            assert settled is not None
            return settled
        return Outcome(req.id, status.value, ran=True, attempt=run.attempt)

    async def _finish_many(self, outcomes: Sequence[tuple[Result, TokenEvent]]) -> list[bool]:
        """Commit outcomes, deliver the terminal events of those committed, then mark them
        reported and release their leases: three round trips for a whole batch of
        requests (coalesced by ``self._finish``) instead of three per request."""
        committed = await self.store.commit_many(outcomes)
        events = [event for (_, event), ok in zip(outcomes, committed) if ok]
        if events:
            await self.outbox.deliver_many(events)
            await self.leases.settle_many([event.request_id for event in events])
        return committed

    async def _report_invalid(self, rid: str, tenant: str, model: str, reason: str) -> None:
        now = time.time()
        try:
            event = TokenEvent(
                kind=EventKind.failed, request_id=rid, tenant=tenant, model=model,
                worker=self.config.worker, reason=f"invalid_dispatch: {reason}", finished_at=now,
                simulated=self.engine.simulated,
            )
            result = Result(
                request_id=rid, tenant=tenant, model=model, status=ResultStatus.failed,
                error=ErrorInfo(code="invalid_dispatch", message=reason),
                worker=self.config.worker, finished_at=now,
            )
        except Exception as exc:  # noqa: BLE001 - ids too malformed even for an event
            log.error("invalid dispatch cannot be reported", request_id=rid, error=repr(exc))
            return
        if await self.store.commit(result, event):
            await self.outbox.deliver(event)
            await self.store.mark_reported(rid)

    def _engine_died(self, exc: BaseException) -> None:
        if self.dead is None:
            self.dead = exc
            log.critical("engine died", engine=self.engine.name, error=repr(exc))
            if self.on_dead is not None:
                self.on_dead(exc)

    def _flush_stream(self, run: Attempt) -> None:
        if run.stream_text:
            text = "".join(run.stream_text)
            run.stream_text.clear()
            self.outbox.delta(run.request.id, text, run.completion_tokens)

    # -- maintenance: cancels, heartbeats, leases, visibility ----------------------

    async def _maintain(self) -> None:
        cfg = self.config
        next_beat = time.monotonic() + cfg.maintenance_interval_s
        stopping = self._stopping
        assert stopping is not None
        # Checked as well as cancelled: under load a cancellation landing inside a Redis
        # call was seen lost (the loop went on, and stop() waited out its 60 s).
        while not stopping.is_set():
            await asyncio.sleep(cfg.cancel_poll_s)
            try:
                for rid in await self._cancels.poll(self.redis, self._runs.keys()):
                    run = self._runs.get(rid)
                    if run is not None and not run.cancel_requested:
                        task = asyncio.create_task(self._cancel(run))
                        self._background.add(task)  # keep a reference until it is done
                        task.add_done_callback(self._background.discard)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + cfg.maintenance_interval_s
                    await self._beat()
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: try again next tick
                log.warning("host maintenance failed", error=repr(exc))

    async def _beat(self) -> None:
        cfg = self.config
        capacity = self.capacity
        stats = self.engine.stats()
        beat = WorkerHeartbeat(
            worker=cfg.worker, pool=cfg.pool, models=(cfg.model,), engine=self.engine.name,
            simulated=self.engine.simulated, capacity=capacity, in_flight=self.in_flight,
            reserved=min(cfg.reserved, capacity),
            engine_running=None if stats is None else stats.running,
            engine_waiting=None if stats is None else stats.waiting,
            kv_cache_usage=None if stats is None else stats.kv_cache_usage,
            preemptions=0 if stats is None else stats.preemptions,
        )
        # One round trip: each one wakes this thread (with vLLM's ``inproc`` front end,
        # each wake-up stalls the engine thread, one GIL, for longer than the work itself).
        pipe = self.redis.pipeline(transaction=False)
        heartbeat.stage(pipe, beat, ttl_s=cfg.heartbeat_ttl_s)
        await self.leases.renew(pipe, list(self._waiters))
        if self._tags and cfg.visibility_index_key:
            renew_visibility(pipe, list(self._tags), index_key=cfg.visibility_index_key, now=time.time())
        await pipe.execute()

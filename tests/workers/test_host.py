"""The engine host against a real Redis, with the simulated engine and an in-memory sink:
events, coalescing, results and streams, cancel, failures, redelivery and leases."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger import (
    EntryKind,
    LedgerEntry,
    UsageRecord,
    make_engine,
    migrate,
    session_factory,
    transaction,
)
from tokenmill.ledger.streams import LedgerSink
from tokenmill.workers import keys
from tokenmill.workers.cancel import request_cancel
from tokenmill.workers.engines.base import EngineStep
from tokenmill.workers.engines.sim import SimEngine, SimTiming
from tokenmill.workers.events import MemorySink
from tokenmill.workers.heartbeat import live_workers
from tokenmill.workers.host import EngineHost, HostConfig
from tokenmill.workers.results import stream_events, wait_result
from workers_helpers import chat_request, completion_request, dispatches, kinds, wait_for

from tokenmill.errors import EngineError
from tokenmill.pricing import cost
from tokenmill.wire import (
    Dispatch,
    EventKind,
    InferenceRequest,
    Priority,
    Result,
    ResultStatus,
    TokenEvent,
    Usage,
    WorkerHeartbeat,
)

HostFactory = Callable[..., tuple[EngineHost, MemorySink]]

def test_events_result_and_stream(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host(progress_tokens=16, progress_interval_s=10.0)
    req = chat_request("sim", "one two three", max_tokens=50, stream=True)
    [outcome] = host.run_slice(dispatches([req]))
    assert (outcome.status, outcome.ran, outcome.attempt) == ("succeeded", True, 1)

    evs = [e for e in sink.events if e.request_id == req.id]
    assert [e.kind for e in evs] == [
        EventKind.dispatched, EventKind.first_token, EventKind.progress, EventKind.progress,
        EventKind.progress, EventKind.finished,
    ]
    assert [e.seq for e in evs] == list(range(len(evs)))
    assert sum(e.delta_tokens for e in evs) == 50
    fin = evs[-1]
    assert (fin.prompt_tokens, fin.completion_tokens) == (3 + 4 + 2, 50)
    assert fin.simulated and fin.worker == host.config.worker
    assert fin.first_token_at is not None and fin.finished_at is not None
    assert fin.submitted_at == req.submitted_at

    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.status is ResultStatus.succeeded
    assert result.usage == Usage(prompt_tokens=9, completion_tokens=50)
    body = result.body or {}
    assert body["object"] == "chat.completion" and body["simulated"] is True
    assert body["usage"]["total_tokens"] == 59
    content = body["choices"][0]["message"]["content"]
    assert len(content.split()) == 50 and body["choices"][0]["finish_reason"] == "length"

    items = list(stream_events(rclient, req.id, timeout_s=5))
    assert items[-1].kind == "end" and items[-1].status == "succeeded"
    assert "".join(i.text for i in items[:-1]) == content
    assert items[-2].completion_tokens == 50


def test_text_completion_body_and_no_stream_deltas(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, _ = make_host()
    req = completion_request("sim", "a b c", max_tokens=5)
    host.run_slice(dispatches([req]))
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.body is not None
    assert result.body["object"] == "text_completion"
    assert len(result.body["choices"][0]["text"].split()) == 5
    assert [i.kind for i in stream_events(rclient, req.id, timeout_s=5)] == ["end"]


def test_progress_events_are_coalesced(make_host: HostFactory) -> None:
    host, sink = make_host(
        engine=SimEngine(SimTiming(), capacity=256), progress_tokens=32, progress_interval_s=10.0
    )
    reqs = [completion_request("sim", max_tokens=256) for _ in range(20)]
    outcomes = host.run_slice(dispatches(reqs))
    assert {o.status for o in outcomes} == {"succeeded"}
    for req in reqs:
        evs = [e for e in sink.events if e.request_id == req.id]
        progress = [e for e in evs if e.kind is EventKind.progress]
        assert 1 <= len(progress) <= 256 // 32
        assert sum(e.delta_tokens for e in evs) == 256 == evs[-1].completion_tokens


def test_cancel_before_start_never_reaches_the_engine(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host()
    req = chat_request("sim", max_tokens=10)
    request_cancel(rclient, req.id)
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "cancelled"
    assert kinds(sink.events, req.id) == [EventKind.cancelled]
    # no work done, nothing to bill
    assert (sink.events[-1].prompt_tokens, sink.events[-1].completion_tokens) == (0, 0)
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.status is ResultStatus.cancelled
    assert result.error is not None and result.error.code == "cancelled"


def test_cancel_aborts_a_running_request(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host(engine=SimEngine(SimTiming(decode_ms_per_step=5.0), capacity=8))
    victim = chat_request("sim", max_tokens=2000)
    bystander = chat_request("sim", max_tokens=40)
    fut = host.submit_slice(dispatches([victim, bystander]))
    wait_for(lambda: EventKind.first_token in kinds(sink.events, victim.id), 5, "first token")
    t0 = time.monotonic()
    request_cancel(rclient, victim.id)
    outcomes = {o.request_id: o.status for o in fut.result(10)}
    assert time.monotonic() - t0 < 1.0
    assert outcomes == {victim.id: "cancelled", bystander.id: "succeeded"}
    cancelled = [e for e in sink.events if e.request_id == victim.id][-1]
    assert cancelled.kind is EventKind.cancelled and 0 < cancelled.completion_tokens < 2000
    assert cancelled.prompt_tokens == 2 + 4 + 2  # the engine's count: "hello world", chat
    result = wait_result(rclient, victim.id, timeout_s=5)
    assert result is not None and result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        cancelled.prompt_tokens, cancelled.completion_tokens)  # fmt: skip


def test_cancel_mid_generation_bills_exactly_the_work_done(
    make_host: HostFactory, rclient: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while the engine generates is billed, on a real ledger, the
    prompt and exactly the tokens the engine had generated when it stopped it."""
    engine = SimEngine(SimTiming(decode_ms_per_step=5.0), capacity=8)
    host, sink = make_host(engine=engine)
    victim = chat_request("sim", "one two three four five", max_tokens=5000)
    fut = host.submit_slice(dispatches([victim]))
    wait_for(lambda: any(e.kind is EventKind.progress for e in sink.events
                         if e.request_id == victim.id), 5, "tokens being generated")  # fmt: skip
    seq = engine._by_id[victim.id]
    request_cancel(rclient, victim.id)
    assert [o.status for o in fut.result(10)] == ["cancelled"]
    cancelled = [e for e in sink.events if e.request_id == victim.id][-1]
    assert cancelled.kind is EventKind.cancelled
    # the engine's own counts when it stopped: every token it generated, the prompt
    assert (cancelled.prompt_tokens, cancelled.completion_tokens) == (
        seq.prompt_tokens, seq.generated)  # fmt: skip
    assert 0 < seq.generated < 5000 and seq.prompt_tokens == 5 + 4 + 2
    result = wait_result(rclient, victim.id, timeout_s=5)
    assert result is not None and result.usage == Usage(
        prompt_tokens=cancelled.prompt_tokens, completion_tokens=cancelled.completion_tokens)

    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    settings = Settings(home=tmp_path / "home")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    db = make_engine(url)
    try:
        ledger = LedgerSink(session_factory(db), settings)
        ledger.prepare()
        events = [e for e in sink.events if e.request_id == victim.id]
        assert [len(ledger.write(events).new_partial) for _ in range(2)] == [1, 0]  # replayed
        with transaction(session_factory(db)) as s:
            [entry] = s.scalars(select(LedgerEntry)).all()
            usage = s.get(UsageRecord, victim.id)
        card = settings.price_card("sim", datetime.fromtimestamp(cancelled.ts, UTC))
        assert (entry.kind, entry.prompt_tokens, entry.completion_tokens) == (
            EntryKind.partial, cancelled.prompt_tokens, cancelled.completion_tokens)  # fmt: skip
        assert entry.amount == cost(card, cancelled.prompt_tokens, cancelled.completion_tokens,
                                    victim.priority)  # fmt: skip
        assert usage is not None and usage.completion_tokens == seq.generated
    finally:
        db.dispose()


class _FailingEngine:
    name = "failing"
    simulated = True
    capacity = 4

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> None:
        return None

    async def generate(self, request: InferenceRequest, priority: int = 0) -> AsyncIterator[EngineStep]:
        yield EngineStep(text=" a", completion_tokens=1, prompt_tokens=3)
        raise EngineError("CUDA error: out of memory (simulated)")


def test_engine_failure_is_a_failed_event_with_the_reason(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host(engine=_FailingEngine())
    req = chat_request("sim", max_tokens=10)
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "failed"
    assert kinds(sink.events, req.id) == [EventKind.dispatched, EventKind.first_token, EventKind.failed]
    failed = sink.events[-1]
    assert failed.reason == "engine_error: CUDA error: out of memory (simulated)"
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.status is ResultStatus.failed
    assert result.error is not None and "out of memory" in result.error.message


def test_invalid_request_fails_without_harming_the_slice(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, _ = make_host()
    bad = chat_request("sim", max_tokens=10, n=3)
    good = chat_request("sim", max_tokens=10)
    outcomes = {o.request_id: o.status for o in host.run_slice(dispatches([bad, good]))}
    assert outcomes == {bad.id: "failed", good.id: "succeeded"}
    result = wait_result(rclient, bad.id, timeout_s=5)
    assert result is not None and result.error is not None and result.error.code == "invalid_request"


def test_unreadable_dispatch_is_reported(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host()
    rid = f"req_{uuid.uuid4().hex}"
    raw = {"request": {"id": rid, "tenant": "acme", "model": "sim", "body": {}}}
    assert host.report_invalid(raw, "body.messages: missing") == rid
    result = wait_result(rclient, rid, timeout_s=5)
    assert result is not None and result.error is not None and result.error.code == "invalid_dispatch"
    assert [e.kind for e in sink.events if e.request_id == rid] == [EventKind.failed]
    assert host.report_invalid({"nonsense": 1}, "x") is None


def test_redelivered_finished_request_is_not_run_again(make_host: HostFactory) -> None:
    host, sink = make_host()
    req = chat_request("sim", max_tokens=10)
    first = host.run_slice(dispatches([req]))
    again = host.run_slice([Dispatch(request=req, attempt=2)])
    assert first[0].ran and not again[0].ran and again[0].status == "succeeded"
    # run once; its one terminal event sent again, identical, for whoever re-dispatched it
    finished = [e for e in sink.events if e.request_id == req.id and e.kind is EventKind.finished]
    assert len(finished) == 2 and finished[0].event_id == finished[1].event_id
    assert kinds(sink.events, req.id).count(EventKind.dispatched) == 1


def test_same_request_twice_in_one_slice_runs_once(make_host: HostFactory) -> None:
    host, sink = make_host()
    req = chat_request("sim", max_tokens=20)
    outcomes = host.run_slice(dispatches([req, req]))
    assert sorted(o.ran for o in outcomes) == [False, True]
    assert kinds(sink.events, req.id).count(EventKind.dispatched) == 1


def test_outcome_stored_but_not_reported_is_resent_identically(
    make_host: HostFactory, rclient: redis.Redis
) -> None:
    """A worker that died between storing the outcome and Kafka's ack: the redelivery
    re-sends the stored terminal event (same event_id) and runs nothing; so does every
    later redelivery (a scheduler restarted between sending a slice and marking it
    dispatched sends it again, and settles its capacity only by that event)."""
    host, sink = make_host()
    req = chat_request("sim", max_tokens=10)
    event = TokenEvent(
        kind=EventKind.finished, request_id=req.id, tenant=req.tenant, model=req.model,
        worker="dead-worker", attempt=1, seq=4, prompt_tokens=9, completion_tokens=10,
    )
    result = Result(
        request_id=req.id, tenant=req.tenant, model=req.model, status=ResultStatus.succeeded,
        usage=Usage(prompt_tokens=9, completion_tokens=10),
    )
    rclient.set(keys.result(req.id), result.to_bytes())
    rclient.set(keys.final_event(req.id), event.to_bytes())
    [outcome] = host.run_slice(dispatches([req]))
    assert not outcome.ran
    assert [e.event_id for e in sink.events if e.request_id == req.id] == [event.event_id]
    assert rclient.exists(keys.reported(req.id))
    [again] = host.run_slice(dispatches([req]))
    assert not again.ran
    assert [e.event_id for e in sink.events if e.request_id == req.id] == [event.event_id] * 2


def test_lease_held_elsewhere_waits_for_it_to_lapse(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host(lease_ttl_s=0.6)
    req = chat_request("sim", max_tokens=5)
    rclient.set(keys.lease(req.id), b"other-worker", px=800)  # a worker that just died
    rclient.incr(keys.attempts(req.id))
    t0 = time.monotonic()
    [outcome] = host.run_slice(dispatches([req]))
    assert time.monotonic() - t0 >= 0.6
    assert outcome.ran and outcome.attempt == 2
    assert {e.attempt for e in sink.events if e.request_id == req.id} == {2}


def test_lease_holder_finishing_means_no_second_run(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host(lease_ttl_s=3.0)
    req = chat_request("sim", max_tokens=5)
    rclient.set(keys.lease(req.id), b"other-worker", px=5000)
    fut = host.submit_slice(dispatches([req]))
    time.sleep(0.3)
    result = Result(request_id=req.id, tenant="acme", model="sim", status=ResultStatus.succeeded)
    rclient.set(keys.result(req.id), result.to_bytes())
    rclient.set(keys.reported(req.id), b"1")
    [outcome] = fut.result(5)
    assert not outcome.ran and outcome.status == "succeeded"
    assert [e for e in sink.events if e.request_id == req.id] == []


def test_heartbeats_show_capacity_and_drop_out(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, _ = make_host(engine=SimEngine(SimTiming(decode_ms_per_step=5.0), capacity=7))
    pool = host.config.pool
    beats = wait_for(lambda: live_workers(rclient, pool), 5, "heartbeat")
    assert [(b.worker, b.capacity, b.in_flight, b.simulated, b.engine) for b in beats] == [
        (host.config.worker, 7, 0, True, "sim")
    ]
    fut = host.submit_slice(dispatches([chat_request("sim", max_tokens=200) for _ in range(3)]))
    busy = wait_for(
        lambda: [b for b in live_workers(rclient, pool) if b.in_flight == 3], 5, "busy heartbeat"
    )
    assert busy[0].free_slots == 4
    fut.result(10)
    # a stale member (no heartbeat for longer than the timeout) drops out
    stale = WorkerHeartbeat(worker="ghost", pool=pool, models=("sim",), engine="sim", capacity=1,
                            in_flight=0, ts=time.time() - 60)
    rclient.set(keys.worker("ghost"), stale.to_bytes())
    rclient.zadd(keys.pool_workers(pool), {"ghost": stale.ts})
    assert [b.worker for b in live_workers(rclient, pool, timeout_s=5)] == [host.config.worker]
    assert rclient.zscore(keys.pool_workers(pool), "ghost") is None
    host.stop()
    assert live_workers(rclient, pool) == []


def test_heartbeats_carry_engine_stats_and_events_count_preemptions(
    make_host: HostFactory, rclient: redis.Redis
) -> None:
    """Requests run at their engine priority (an urgent batch line above plain batch
    work); the heartbeat tells the reserved slots and the engine's stats, and a terminal
    event how often the engine preempted its request."""
    engine = SimEngine(SimTiming(decode_ms_per_step=5.0), capacity=2)
    host, sink = make_host(engine=engine, reserved=1)
    pool = host.config.pool

    def batch(urgent: bool) -> Dispatch:
        req = chat_request("sim", max_tokens=150).model_copy(update={"priority": Priority.batch})
        return Dispatch(request=req, urgent=urgent)

    plain, urgent = batch(False), batch(True)  # plain arrives first: FIFO alone keeps it
    fut = host.submit_slice([plain, urgent])
    [busy] = wait_for(
        lambda: [b for b in live_workers(rclient, pool) if b.engine_running == 2], 5, "busy heartbeat"
    )
    assert (busy.capacity, busy.reserved, busy.in_flight) == (2, 1, 2)
    assert (busy.engine_waiting, busy.kv_cache_usage, busy.preemptions) == (0, None, 0)
    interactive = chat_request("sim", max_tokens=5).model_copy(update={"priority": Priority.interactive})
    [outcome] = host.run_slice(dispatches([interactive]))
    assert outcome.status == "succeeded"
    assert not fut.done()  # it did not wait for the batch lines
    assert {o.status for o in fut.result(10)} == {"succeeded"}
    finished = {e.request_id: e for e in sink.events if e.kind is EventKind.finished}
    assert [finished[d.request.id].preemptions for d in (plain, urgent)] == [1, 0]
    assert finished[interactive.id].preemptions == 0
    wait_for(lambda: [b for b in live_workers(rclient, pool) if b.preemptions == 1], 5, "preemption count")


def test_request_past_its_deadline_expires_without_running(make_host: HostFactory, rclient: redis.Redis) -> None:
    host, sink = make_host()
    req = chat_request("sim", max_tokens=10).model_copy(update={"deadline": time.time() - 1})
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "expired"
    assert kinds(sink.events, req.id) == [EventKind.failed]
    assert sink.events[-1].reason == "expired: its deadline passed before it ran"
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.status is ResultStatus.expired


class _BrokenEngine(_FailingEngine):
    async def start(self) -> None:
        raise EngineError("no such model")


def test_engine_that_cannot_start_fails_the_host_fast(redis_url: str) -> None:
    host = EngineHost(
        _BrokenEngine(), HostConfig(worker="w", pool=f"p-{uuid.uuid4().hex[:6]}", model="m"),
        redis_url=redis_url, sink=MemorySink(),
    )
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="no such model"):
        host.start(timeout_s=30)
    assert time.monotonic() - t0 < 5

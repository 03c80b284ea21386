"""The whole pipeline on the local stack: client → gateway → Kafka priority topics →
scheduler → Celery workers (simulated engine) → results, with real processes throughout.
Tenants are the HTTP client with the local stack's demo keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaProducer

from tokenmill import Client, wire
from tokenmill.errors import NotFound
from tokenmill.stack.processes import pid_alive, stop_pid

if TYPE_CHECKING:
    from conftest import Stack


def finished_counts(stack: Stack, ids: set[str]) -> Counter[str]:
    return Counter(e.request_id for e in stack.events()
                   if e.kind is wire.EventKind.finished and e.request_id in ids)


def test_three_tenants_complete_exactly_once(client_env: Stack) -> None:
    tenants = ("alpha", "beta", "gamma")
    clients = {t: Client(tenant=t) for t in tenants}
    try:
        handles = [(t, h) for t, c in clients.items()
                   for h in c.submit_many([c.build("sim", prompt=f"{t} {i}", max_tokens=5) for i in range(100)])]
        results = [clients[t].result(h, timeout=60) for t, h in handles]
    finally:
        for c in clients.values():
            c.close()
    assert all(r.status is wire.ResultStatus.succeeded for r in results)
    assert all(r.usage is not None and r.usage.completion_tokens == 5 for r in results)
    assert [r.request_id for r in results] == [h.request_id for _, h in handles]
    assert [r.tenant for r in results] == [t for t, _ in handles]  # stamped by the gateway
    ids = {h.request_id for _, h in handles}
    assert finished_counts(client_env, ids) == Counter({i: 1 for i in ids})


def test_another_tenants_request_is_not_found_server_side(client_env: Stack) -> None:
    """With beta's key, alpha's request id answers 404 to every call, as an unknown id
    does: while it runs (stream, cancel) and after it ended (poll, result)."""
    with Client("tm-alpha-demo-key") as alpha, Client("tm-beta-demo-key") as beta:
        h = alpha.submit("slowsim", prompt="secret", max_tokens=60, stream=True)  # ~1.2 s
        unknown = "req_" + "0" * 32
        for rid in (h.request_id, unknown):
            with pytest.raises(NotFound):
                list(beta.stream(rid, timeout=5))
            with pytest.raises(NotFound):
                beta.cancel(rid)
        deltas = list(alpha.stream(h, timeout=30))
        done = alpha.result(h, timeout=30)
        for rid in (h.request_id, unknown):
            with pytest.raises(NotFound):
                beta.poll(rid)
            with pytest.raises(NotFound):
                beta.result(rid, timeout=5)
    # beta's cancel did not reach it: it ran to the end, and only alpha saw its output.
    assert done.status is wire.ResultStatus.succeeded and done.tenant == "alpha"
    assert done.usage is not None and done.usage.completion_tokens == 60
    assert "".join(deltas) == done.body["choices"][0]["text"]


def test_interactive_overtakes_batch_backlog_which_still_progresses(client_env: Stack) -> None:
    with Client(tenant="gamma") as batch_client, Client(tenant="alpha") as inter_client:
        batch = batch_client.submit_many(
            [batch_client.build("slowsim", prompt=f"b{i}", max_tokens=5, priority="batch") for i in range(150)]
        )
        # Wait until the backlog is being worked on.
        deadline = time.monotonic() + 30
        while sum(batch_client.poll(h) is not None for h in batch[:12]) < 8:
            assert time.monotonic() < deadline, "batch work never started"
            time.sleep(0.05)
        inter = inter_client.submit_many(
            [inter_client.build("slowsim", prompt=f"i{i}", max_tokens=5, priority="interactive") for i in range(40)]
        )
        inter_results = [inter_client.result(h, timeout=60) for h in inter]
        batch_results = [batch_client.result(h, timeout=120) for h in batch]
    first_i = min(r.finished_at for r in inter_results)
    last_i = max(r.finished_at for r in inter_results)
    batch_after = sum(r.finished_at > last_i for r in batch_results)
    batch_during = sum(first_i <= r.finished_at <= last_i for r in batch_results)
    # Interactive work went ahead of most of the standing backlog...
    assert batch_after >= 60, f"only {batch_after} batch requests finished after the interactive ones"
    # ...without starving it: batch kept its share while interactive work was served.
    assert batch_during >= 1
    assert all(r.status is wire.ResultStatus.succeeded for r in [*inter_results, *batch_results])


def test_cancel_queued_and_running(client_env: Stack) -> None:
    with Client(tenant="beta") as c:
        # 4 slots on slowsim: these 4 run (200 tokens ≈ 4 s), the 5th waits.
        running = c.submit_many([c.build("slowsim", prompt=f"long {i}", max_tokens=200) for i in range(4)])
        time.sleep(0.5)  # let them be dispatched and start
        queued = c.submit("slowsim", prompt="waiting", max_tokens=200)
        time.sleep(0.3)
        c.cancel(queued)
        c.cancel(running[0])
        q = c.result(queued, timeout=30)
        r0 = c.result(running[0], timeout=30)
        rest = [c.result(h, timeout=60) for h in running[1:]]
    assert q.status is wire.ResultStatus.cancelled
    assert r0.status is wire.ResultStatus.cancelled
    assert all(r.status is wire.ResultStatus.succeeded for r in rest)
    assert all(r.usage and r.usage.completion_tokens == 200 for r in rest)


def test_malformed_messages_are_dead_lettered_and_scheduler_goes_on(client_env: Stack) -> None:
    import asyncio

    async def produce() -> None:
        p = AIOKafkaProducer(bootstrap_servers=client_env.address("kafka"))
        await p.start()
        try:
            await p.send_and_wait(wire.Priority.standard.topic, b"{not json", key=b"alpha")
            bad_tenant = wire.InferenceRequest(tenant="mallory", model="sim", max_tokens=1,
                                               prompt_tokens_estimate=1, body={"messages": [{"role": "user", "content": "x"}]})
            await p.send_and_wait(wire.Priority.standard.topic, bad_tenant.to_bytes(), key=b"mallory")
        finally:
            await p.stop()

    asyncio.run(produce())
    with Client(tenant="alpha") as c:
        ok = c.result(c.submit("sim", prompt="after the bad ones", max_tokens=3), timeout=30)
    assert ok.status is wire.ResultStatus.succeeded
    dead = client_env.read_topic(wire.DEAD_LETTER_TOPIC)
    reasons = [h["reason"].decode() for _, _, h in dead]
    assert any(v == b"{not json" for _, v, _ in dead)
    assert any("unknown tenant 'mallory'" in r for r in reasons)
    assert all(h["source"].startswith(wire.Priority.standard.topic.encode()) for _, _, h in dead)


def test_scheduler_killed_and_restarted_loses_and_repeats_nothing(client_env: Stack) -> None:
    with Client(tenant="alpha") as c:
        handles = c.submit_many([c.build("slowsim", prompt=f"k{i}", max_tokens=2) for i in range(150)])
        deadline = time.monotonic() + 30
        while sum(c.poll(h) is not None for h in handles[:40]) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        old = client_env.pid("scheduler")
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(old):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        env = {**client_env.env, **client_env.client_env()}
        log = open(client_env.home / "logs" / "scheduler-restarted.log", "ab")
        new = subprocess.Popen([sys.executable, "-m", "tokenmill", "scheduler"], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            results = [c.result(h, timeout=90) for h in handles]
        finally:
            stop_pid(new.pid)
            log.close()
    assert all(r.status is wire.ResultStatus.succeeded for r in results)
    ids = {h.request_id for h in handles}
    events = [e for e in client_env.events() if e.request_id in ids]
    # one terminal event per request (a re-dispatched finished one is sent again, identical)
    finished = Counter(rid for rid, _ in {(e.request_id, e.event_id) for e in events
                                          if e.kind is wire.EventKind.finished})  # fmt: skip
    dispatched = Counter(e.request_id for e in events if e.kind is wire.EventKind.dispatched)
    assert finished == Counter({i: 1 for i in ids})
    assert max(dispatched.values()) == 1, "a request was run twice"

"""Callers waiting on the gateway hear within seconds when the embedded Redis or broker
behind their request is SIGKILLed: 503 ``service_unavailable`` naming it, never a silent
wait until their timeout. With the broker, the requests not dispatched yet are lost for
good: each gets a failed ``broker_lost`` result in the result store and a cancel flag;
a dispatched chat is cancelled; a dispatched request API request may still finish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aredis
from batch_stack import Stack, running_stack, stack_config
from conftest import KEYS
from tokenmill.config.settings import Settings, load_settings
from tokenmill.gateway.backend import Backend
from tokenmill.producers.client import AsyncClient
from tokenmill.workers import keys

from tokenmill.errors import StackError, TokenmillError
from tokenmill.stack import Endpoints
from tokenmill.wire import ResultStatus

#: the issue's bound: the error arrives within this many seconds of the loss
BOUND_S = 10.0
#: slowsim decodes 20 ms a token: this many keep a request in flight for ~40 s
LONG = 2000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of this test's own: the test kills a part of it (unsupervised, so that
    what callers hear is the loss itself, not a restart)."""
    with running_stack(tmp_path, stack_config(), supervise=False) as s:
        try:
            yield s
        finally:
            # With the broker or Redis gone nothing can drain, and a graceful `down`
            # would wait out each service's drain timeout: kill them, `down` records it.
            for service in s.state()["services"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(service["pid"]), signal.SIGKILL)


def _pid(stack: Stack, name: str) -> int:
    return next(int(s["pid"]) for s in stack.state()["services"] if s["name"] == name)


async def _chat(http: httpx.AsyncClient, tenant: str, max_tokens: int) -> tuple[httpx.Response, float]:
    resp = await http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEYS[tenant]}"},
        json={"model": "slowsim", "max_tokens": max_tokens,
              "messages": [{"role": "user", "content": "hello"}]},
    )
    return resp, time.monotonic()


async def _failure(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    try:
        await call
    except TokenmillError as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


async def test_redis_lost_during_waits_answers_503_naming_redis(stack: Stack) -> None:
    gateway = stack.address("gateway")
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http, \
            AsyncClient(KEYS["beta"], base_url=gateway) as client:
        chats = [asyncio.create_task(_chat(http, "alpha", LONG)) for _ in range(2)]
        handle = await client.submit("slowsim", prompt="hello", max_tokens=LONG)
        polled = asyncio.create_task(_failure(client.result(handle, 120.0)))  # long polls
        await asyncio.sleep(1.5)  # all waiting on Redis
        assert not any(t.done() for t in [*chats, polled])

        os.kill(_pid(stack, "redis"), signal.SIGKILL)
        killed = time.monotonic()

        for resp, at in await asyncio.wait_for(asyncio.gather(*chats), BOUND_S + 5):
            assert at - killed < BOUND_S
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["code"] == "service_unavailable" and error["type"] == "server_error"
            assert "Redis" in error["message"]
        exc, at = await asyncio.wait_for(polled, BOUND_S + 5)
        assert isinstance(exc, StackError) and "Redis is unreachable" in str(exc), exc
        assert at - killed < BOUND_S


async def test_broker_lost_fails_every_wait_naming_kafka_cancels_chats_and_settles_the_queued(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = stack.address("gateway")
    store = aredis.Redis.from_url(stack.address("redis"))

    async def dispatched() -> set[str]:
        prefix = keys.dispatched("")
        return {k.decode().removeprefix(prefix) async for k in store.scan_iter(match=prefix + "*")}

    async def flagged(ids: set[str]) -> set[str]:
        flags = await store.mget([keys.cancel(r) for r in ids])
        return {r for r, flag in zip(ids, flags, strict=True) if flag is not None}

    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http, \
            AsyncClient(KEYS["alpha"], base_url=gateway) as client:
        # slowsim runs 4 at a time: the two chats and two requests are dispatched, the
        # other eight queue in Kafka.
        chats = [asyncio.create_task(_chat(http, "alpha", LONG)) for _ in range(2)]
        async with asyncio.timeout(30):
            while len(chat_ids := await dispatched()) < 2:
                await asyncio.sleep(0.1)
        handles = await client.submit_many(
            [client.build("slowsim", prompt="hello", max_tokens=LONG) for _ in range(10)]
        )
        ids = [h.request_id for h in handles]
        async with asyncio.timeout(30):
            while len(await dispatched()) < 4:
                await asyncio.sleep(0.1)
        polled, unpolled = ids[:7], ids[7:]  # the unpolled ones have no wait at the loss
        waits = {rid: asyncio.create_task(_failure(client.result(rid, 120.0))) for rid in polled}
        await asyncio.sleep(1.0)
        assert not any(t.done() for t in [*chats, *waits.values()])

        os.kill(_pid(stack, "kafka"), signal.SIGKILL)
        killed = time.monotonic()
        running = (await dispatched()) & set(ids)  # the scheduler can dispatch no more now
        queued = set(ids) - running
        assert len(running) == 2 and queued & set(unpolled), (running, queued)

        # Dispatched chats: told within seconds, and cancelled (nobody reads their answer).
        for resp, at in await asyncio.wait_for(asyncio.gather(*chats), BOUND_S + 5):
            assert at - killed < BOUND_S
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["code"] == "service_unavailable" and error["type"] == "server_error"
            assert "Kafka" in error["message"] and "cancelled" in error["message"], error
        assert await flagged(chat_ids) == chat_ids
        # Every wait on the request API fails within seconds, saying what it means.
        for rid in polled:
            exc, at = await asyncio.wait_for(waits[rid], BOUND_S + 5)
            assert isinstance(exc, StackError) and "Kafka" in str(exc), exc
            assert at - killed < BOUND_S
            said = "submit it again" if rid in queued else "may still finish"
            assert said in str(exc), (rid in queued, exc)
        # A new wait for a dispatched one fails at once while the broker is away.
        exc, at = await _failure(client.result(next(iter(running)), 30.0))
        assert isinstance(exc, StackError) and "may still finish" in str(exc), exc
        assert time.monotonic() - at < 3.0 and at - killed < BOUND_S + 5

        # The queued ones, waited for or not, ended for good: a failed result naming Kafka
        # in the result store (what every gateway copy, and a restarted one, reads), a
        # cancel flag so that nothing runs them later; a poll answers it at once.
        assert await flagged(queued) == queued
        fresh = Backend(_settings(stack, monkeypatch), Endpoints(
            kafka_bootstrap="127.0.0.1:9", redis_url=stack.address("redis"),
            database_url="sqlite://",
        ))
        try:
            for rid in queued:
                for result in (await fresh.result("alpha", rid), await client.poll(rid)):
                    assert result is not None and result.status is ResultStatus.failed, result
                    assert result.error is not None and result.error.code == "broker_lost"
                    assert "Kafka" in result.error.message and "submit it again" in result.error.message
                    assert result.usage is None  # nothing ran: nothing to bill
            for rid in running:
                assert await fresh.result("alpha", rid) is None  # still its worker's
        finally:
            await fresh.redis.aclose()
    await store.aclose()


def _settings(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The stack's settings, as a gateway of that stack loads them."""
    for key in [k for k in os.environ if k.startswith("TOKENMILL_")]:
        monkeypatch.delenv(key)
    for key in ("TOKENMILL_HOME", "TOKENMILL_CONFIG"):
        monkeypatch.setenv(key, stack.env[key])
    return load_settings()


async def test_a_stopping_gateway_answers_its_waiting_callers_503_naming_itself(stack: Stack) -> None:
    """SIGTERM (``tokenmill down`` stops the gateway first): every caller still waiting
    gets a 503 naming the gateway — a plain completion's request cancelled — instead of
    a connection cut when the server exits."""
    gateway = stack.address("gateway")
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        chats = [asyncio.create_task(_chat(http, "alpha", LONG)) for _ in range(3)]
        deadline = time.monotonic() + BOUND_S
        while not all(await _dispatched(stack, 3)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(t.done() for t in chats)
        os.kill(_pid(stack, "gateway"), signal.SIGTERM)
        stopped = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*chats), BOUND_S)
    for resp, at in answers:
        assert at - stopped < 5.0
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "service_unavailable" and "gateway is stopping" in error["message"]
        assert "cancelled" in error["message"]


async def _dispatched(stack: Stack, n: int) -> list[bool]:
    """Whether ``n`` requests are marked dispatched (the chats are under way)."""
    client = aredis.Redis.from_url(stack.address("redis"))
    try:
        found = [k async for k in client.scan_iter(match=keys.dispatched("*"), count=1000)]
    finally:
        await client.aclose()
    return [len(found) >= n]

"""Callers waiting on the gateway hear within seconds when the embedded Redis or broker
behind their request is SIGKILLed: 503 ``service_unavailable`` naming it, never a silent
wait until their timeout. A request the scheduler already dispatched keeps waiting
when only the broker is lost (its result comes through Redis)."""

from __future__ import annotations

import asyncio
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
from tokenmill.producers.client import AsyncClient
from tokenmill.workers import keys

from tokenmill.errors import StackError, TokenmillError

#: the issue's bound: the error arrives within this many seconds of the loss
BOUND_S = 10.0
#: slowsim decodes 20 ms a token: this many keep a request in flight for ~40 s
LONG = 2000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of this test's own: the test kills a part of it."""
    with running_stack(tmp_path, stack_config()) as s:
        yield s


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


async def test_broker_lost_fails_undispatched_waits_naming_kafka_and_keeps_dispatched_ones(
    stack: Stack,
) -> None:
    gateway = stack.address("gateway")
    marks = aredis.Redis.from_url(stack.address("redis"))

    async def dispatched(ids: list[str]) -> set[str]:
        found = await marks.mget([keys.dispatched(r) for r in ids])
        return {r for r, mark in zip(ids, found, strict=True) if mark is not None}

    async with AsyncClient(KEYS["alpha"], base_url=gateway) as client:
        # slowsim runs 4 at a time: the first 4 are dispatched, the rest queue in Kafka.
        handles = await client.submit_many(
            [client.build("slowsim", prompt="hello", max_tokens=LONG) for _ in range(10)]
        )
        ids = [h.request_id for h in handles]
        async with asyncio.timeout(30):
            while len(await dispatched(ids)) < 4:
                await asyncio.sleep(0.1)
        waits = {rid: asyncio.create_task(_failure(client.result(rid, 120.0))) for rid in ids}
        await asyncio.sleep(1.0)

        os.kill(_pid(stack, "kafka"), signal.SIGKILL)
        killed = time.monotonic()
        running = await dispatched(ids)  # the scheduler can dispatch no more now
        queued = set(ids) - running
        assert queued and running, (queued, running)

        for rid in queued:
            exc, at = await asyncio.wait_for(waits[rid], BOUND_S + 5)
            assert isinstance(exc, StackError) and "Kafka" in str(exc), exc
            assert "not dispatched" in str(exc)
            assert at - killed < BOUND_S
        # The dispatched ones run on in the worker: not failed as lost with the broker.
        await asyncio.sleep(2.0)
        for rid in running:
            if waits[rid].done():
                exc, _ = waits[rid].result()
                assert exc is None or "Kafka" not in str(exc), exc
        # A new poll of a lost request fails at once (the gateway remembers it).
        exc, at = await _failure(client.result(next(iter(queued)), 30.0))
        assert isinstance(exc, StackError) and "Kafka" in str(exc), exc
        assert at - killed < BOUND_S + 3
        for task in waits.values():
            task.cancel()
        await asyncio.gather(*waits.values(), return_exceptions=True)
    await marks.aclose()

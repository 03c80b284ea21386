"""The client's result waiter on a real Redis: announced results, results stored before
anyone waited, announcements lost (trimmed), and tenants kept apart."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
from tokenmill.producers import waiter as waiter_mod
from tokenmill.producers.waiter import ResultWaiter
from tokenmill.workers import keys
from tokenmill.workers.results import ResultStore

from tokenmill.stack import processes
from tokenmill.stack.errors import ServiceUnavailable
from tokenmill.wire import EventKind, Result, ResultStatus, TokenEvent


def outcome(rid: str, tenant: str) -> tuple[Result, TokenEvent]:
    result = Result(request_id=rid, tenant=tenant, model="sim", status=ResultStatus.succeeded)
    event = TokenEvent(kind=EventKind.finished, request_id=rid, tenant=tenant, model="sim")
    return result, event


async def test_announced_results_reach_their_waiters(redis_url: str, unique: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    store, waiter = ResultStore(client), ResultWaiter(client, f"t-{unique}")
    ids = [f"{unique}-{i}" for i in range(300)]
    try:
        waits = [asyncio.create_task(waiter.wait(rid, timeout=10)) for rid in ids]
        await asyncio.sleep(0.05)  # all registered and the follower reading
        # Out of order and in a few batches, as workers commit them.
        for start in range(0, 300, 70):
            chunk = ids[start : start + 70][::-1]
            assert await store.commit_many([outcome(r, f"t-{unique}") for r in chunk]) == [
                True
            ] * len(chunk)
        got = await asyncio.gather(*waits)
        assert [r.request_id for r in got] == ids
        assert not waiter._pending
    finally:
        await waiter.close()
        await client.aclose()


async def test_a_result_stored_before_the_wait_is_found_at_once(
    redis_url: str, unique: str
) -> None:
    client = aredis.Redis.from_url(redis_url)
    store, waiter = ResultStore(client), ResultWaiter(client, f"t-{unique}")
    try:
        # The follower is running (for another request) and has read past the
        # announcement of `early` before anyone waits for it.
        other = asyncio.create_task(waiter.wait(f"{unique}-other", timeout=10))
        await store.commit(*outcome(f"{unique}-early", f"t-{unique}"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        got = await waiter.wait(f"{unique}-early", timeout=5)
        assert got is not None and got.request_id == f"{unique}-early"
        assert time.monotonic() - started < 0.5  # checked when registered, not left to the sweep
        await store.commit(*outcome(f"{unique}-other", f"t-{unique}"))
        assert (await other).request_id == f"{unique}-other"
    finally:
        await waiter.close()
        await client.aclose()


async def test_lost_announcements_are_covered_by_the_sweep(redis_url: str, unique: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    waiter = ResultWaiter(client, f"t-{unique}")
    try:
        waits = [asyncio.create_task(waiter.wait(f"{unique}-{i}", timeout=10)) for i in range(5)]
        await asyncio.sleep(0.05)
        # Results whose announcements never arrive (trimmed before they were read).
        for i in range(5):
            result, _ = outcome(f"{unique}-{i}", f"t-{unique}")
            await client.set(keys.result(result.request_id), result.to_bytes())
        got = await asyncio.wait_for(asyncio.gather(*waits), waiter_mod.SWEEP_S * 3)
        assert sorted(r.request_id for r in got) == sorted(f"{unique}-{i}" for i in range(5))
    finally:
        await waiter.close()
        await client.aclose()


async def test_announcements_are_per_tenant(redis_url: str, unique: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    store = ResultStore(client)
    try:
        await store.commit(*outcome(f"{unique}-a", f"a-{unique}"))
        await store.commit(*outcome(f"{unique}-b", f"b-{unique}"))
        entries = await client.xrange(keys.done(f"a-{unique}"))
        assert [fields[b"id"] for _, fields in entries] == [f"{unique}-a".encode()]
        # A second commit of the same request changes nothing and announces nothing.
        assert not await store.commit(*outcome(f"{unique}-a", f"a-{unique}"))
        assert await client.xlen(keys.done(f"a-{unique}")) == 1
    finally:
        await client.aclose()


# -- a lost Redis ---------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], tuple[str, subprocess.Popen[bytes]]]]:
    """Start Redis servers of this test's own (it kills them), each on a new port."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        port = processes.free_port()
        data = tmp_path / f"redis-{port}"
        data.mkdir()
        proc = processes.spawn(
            "redis",
            processes.redis_argv(port, data),
            data / "log",
            lambda: processes.redis_ready(port),
        )
        started.append(proc)
        return f"redis://{processes.LOOPBACK}:{port}/0", proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(5)


async def test_a_lost_redis_fails_every_wait_within_seconds_naming_it(
    own_redis: Callable[[], tuple[str, subprocess.Popen[bytes]]], unique: str
) -> None:
    url, server = own_redis()
    client = aredis.Redis.from_url(url, socket_connect_timeout=1)
    waiter = ResultWaiter(client, f"t-{unique}")
    try:
        waits = [asyncio.create_task(waiter.wait(f"{unique}-{i}", timeout=120)) for i in range(20)]
        await asyncio.sleep(0.3)  # registered, the follower blocked on the stream
        server.kill()
        killed = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 10)
        took = time.monotonic() - killed
        assert all(isinstance(o, ServiceUnavailable) and o.service == "Redis" for o in outcomes), (
            outcomes
        )
        assert "Redis is unreachable" in str(outcomes[0])
        assert waiter_mod.UNREACHABLE_S <= took < waiter_mod.UNREACHABLE_S + 2
        # While it stays away, a new wait fails at once instead of waiting its timeout.
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="Redis"):
            await waiter.wait(f"{unique}-late", timeout=120)
        assert time.monotonic() - started < 1.5
    finally:
        await waiter.close()
        await client.aclose()


async def test_the_waiter_reads_from_redis_again_at_its_new_address(
    own_redis: Callable[[], tuple[str, subprocess.Popen[bytes]]], unique: str
) -> None:
    url, server = own_redis()
    current = {"url": url}
    client = aredis.Redis.from_url(url, socket_connect_timeout=1)
    waiter = ResultWaiter(
        client, f"t-{unique}", reconnect=lambda: aredis.Redis.from_url(current["url"])
    )
    try:
        lost = asyncio.create_task(waiter.wait(f"{unique}-lost", timeout=120))
        await asyncio.sleep(0.3)
        server.kill()
        current["url"], _ = own_redis()  # the stack restarted it elsewhere
        with pytest.raises(ServiceUnavailable):
            await asyncio.wait_for(lost, 10)

        back = aredis.Redis.from_url(current["url"])
        try:
            found = asyncio.create_task(waiter.wait(f"{unique}-new", timeout=10))
            await asyncio.sleep(0.3)
            await ResultStore(back).commit(*outcome(f"{unique}-new", f"t-{unique}"))
            got = await asyncio.wait_for(found, 5)
            assert got is not None and got.request_id == f"{unique}-new"
        finally:
            await back.aclose()
    finally:
        await waiter.close()
        await client.aclose()

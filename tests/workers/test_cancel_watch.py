"""CancelWatch against a real Redis: cancels are found by the next poll whether they
came before or after a request started, and a poll with no cancel anywhere reads one
key instead of every running request's flag."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from tokenmill.workers import keys
from tokenmill.workers.cancel import CancelWatch, request_cancel, request_cancel_many_async

from tokenmill.redis_client import async_redis


class Counting:
    """An asyncio Redis client that counts the flags it is asked to MGET and can be
    made to fail its next MGET."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.mget_keys = 0
        self.fail_next = False

    async def get(self, key: str) -> Any:
        return await self.client.get(key)

    async def mget(self, names: Sequence[str]) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise redis.ConnectionError("injected")
        self.mget_keys += len(names)
        return await self.client.mget(names)


def ids(n: int) -> list[str]:
    return [f"req-{uuid.uuid4().hex[:8]}" for _ in range(n)]


def test_cancels_found_and_quiet_polls_cheap(redis_url: str, rclient: redis.Redis) -> None:
    async def main() -> None:
        client = Counting(async_redis(redis_url))
        watch = CancelWatch()
        running: set[str] = set()
        old = ids(50)
        early = old[0]
        request_cancel(rclient, early)  # cancelled before it started
        for rid in old:
            running.add(rid)
            watch.started(rid)
        assert await watch.poll(client, running) == {early}
        running.discard(early)

        before = client.mget_keys
        for _ in range(3):  # nobody cancels: one GET each, no flag read
            assert await watch.poll(client, running) == set()
        assert client.mget_keys == before

        late = ids(2)  # started after the epoch was read: checked once, then quiet
        for rid in late:
            running.add(rid)
            watch.started(rid)
        request_cancel(rclient, late[1])  # also bumps the epoch: every run is checked
        assert await watch.poll(client, running) == {late[1]}
        running.discard(late[1])

        await request_cancel_many_async(client.client, [old[3], old[7]])
        assert await watch.poll(client, running) == {old[3], old[7]}
        await client.client.aclose()

    asyncio.run(main())


def test_flag_without_epoch_is_found_only_for_new_requests(redis_url: str, rclient: redis.Redis) -> None:
    """The epoch is what makes running requests be re-read: a flag set behind its back
    (not through request_cancel) is seen for a request that started since the last
    poll, which is how a cancel racing a start is caught."""

    async def main() -> None:
        client = Counting(async_redis(redis_url))
        watch = CancelWatch()
        a, b = ids(2)
        watch.started(a)
        assert await watch.poll(client, {a}) == set()
        rclient.set(keys.cancel(a), b"1")
        rclient.set(keys.cancel(b), b"1")
        watch.started(b)
        assert await watch.poll(client, {a, b}) == {b}
        await client.client.aclose()

    asyncio.run(main())


def test_failed_poll_checks_again(redis_url: str, rclient: redis.Redis) -> None:
    async def main() -> None:
        client = Counting(async_redis(redis_url))
        watch = CancelWatch()
        quiet = ids(1)[0]
        watch.started(quiet)
        assert await watch.poll(client, {quiet}) == set()
        rid = ids(1)[0]
        rclient.set(keys.cancel(rid), b"1")  # no epoch bump: only the new-run check sees it
        watch.started(rid)
        client.fail_next = True
        with pytest.raises(redis.ConnectionError):
            await watch.poll(client, {quiet, rid})
        assert await watch.poll(client, {quiet, rid}) == {rid}
        await client.client.aclose()

    asyncio.run(main())

"""Service presence in a real Redis: copies announce, a dead one ages out, a stopped one
withdraws at once."""

from __future__ import annotations

import asyncio
import json
import time

import redis

from tokenmill import presence
from tokenmill.redis_client import async_redis


def test_copies_announce_and_a_stopped_copy_withdraws(redis_url: str, unique: str) -> None:
    service = f"svc-{unique}"

    async def main() -> None:
        client = async_redis(redis_url)
        stop = asyncio.Event()
        runs = [
            asyncio.create_task(
                presence.run_presence(
                    client, service, stop, lambda r=role: (r, {"lag": 3}), interval_s=0.05, instance=name
                )
            )
            for name, role in (("a", "active"), ("b", "standby"))
        ]
        deadline = time.monotonic() + 5
        seen: list[presence.Instance] = []
        while time.monotonic() < deadline:
            seen = [i for i in await presence.live_instances_async(client) if i.service == service]
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
        assert [(i.instance, i.role, dict(i.detail)) for i in seen] == [
            ("a", "active", {"lag": 3}),
            ("b", "standby", {"lag": 3}),
        ]
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert not [i for i in await presence.live_instances_async(client) if i.service == service]
        await client.aclose()

    asyncio.run(main())


def test_a_dead_copy_ages_out_and_is_pruned(redis_url: str, unique: str) -> None:
    client = redis.Redis.from_url(redis_url)
    old = presence.Instance(f"svc-{unique}", "dead:1", "copy", time.time() - 60)
    client.hset(presence.PRESENCE_KEY, old.field, json.dumps(presence.asdict(old)))
    assert old.field not in {i.field for i in presence.live_instances(client, timeout_s=5)}
    assert not client.hexists(presence.PRESENCE_KEY, old.field)

"""``tokenmill up`` → ``status`` → use (the services, and ``tokenmill submit`` through the
gateway) → ``up`` again → ``down`` through the real entry point, with real broker and
Redis processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from stack_helpers import all_dead, tokenmill, wait_for
from tokenmill.config.settings import load_settings

from tokenmill.stack import endpoints, processes, state


async def _kafka_round_trip(bootstrap: str) -> list[bytes]:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, b"m%d" % i, key=b"k")
    finally:
        await producer.stop()
    # No consumer group: joining one costs seconds and proves nothing more here.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(15):
            while len(got) < 3:
                batch = await consumer.getmany(timeout_ms=200)
                got += [m.value for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    return got


def test_up_status_use_down(home: Path) -> None:
    first = tokenmill("up")
    assert first.returncode == 0, first.stderr
    recorded = state.load(home)
    assert recorded is not None
    # Infrastructure first, then the services registered by the subsystems.
    names = [s.name for s in recorded.services]
    assert names[:2] == ["kafka", "redis"]
    assert {"worker-sim", "scheduler"} <= set(names[2:])
    pids = [s.pid for s in recorded.services]
    assert all(processes.pid_alive(pid) for pid in pids)  # they outlive `up`
    assert all(Path(s.log).parent == home / "logs" for s in recorded.services)

    status = tokenmill("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] is True
    assert {s["name"]: s["pid"] for s in report["services"]} == {
        **{svc.name: svc.pid for svc in recorded.services},
        "database": None,
    }

    ep = endpoints(load_settings())
    assert ep.kafka_bootstrap.startswith("127.0.0.1:")
    assert redis.Redis.from_url(ep.redis_url, socket_timeout=2).ping()
    assert asyncio.run(_kafka_round_trip(ep.kafka_bootstrap)) == [b"m0", b"m1", b"m2"]

    # The CLI goes through the gateway: --tenant is the local stack's demo key ...
    by_name = tokenmill("submit", "hello", "--tenant", "alpha", "--max-tokens", "3")
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert "3 completion tokens" in by_name.stdout
    # ... a key works as given, and a wrong one is refused by the gateway.
    by_key = tokenmill("submit", "hello", "--completion", "--api-key", "tm-beta-demo-key", "--max-tokens", "2")
    assert by_key.returncode == 0 and "2 completion tokens" in by_key.stdout, by_key.stdout + by_key.stderr
    wrong = tokenmill("submit", "hello", "--api-key", "tm-wrong-key")
    assert wrong.returncode == 1 and "Incorrect API key" in wrong.stderr, wrong.stdout + wrong.stderr

    again = tokenmill("up")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    after = state.load(home)
    assert after is not None and [s.pid for s in after.services] == pids

    down = tokenmill("down")
    assert down.returncode == 0, down.stderr
    assert wait_for(lambda: all_dead(pids), 5)
    assert not state.state_path(home).exists()

    assert tokenmill("status").returncode == 1
    nothing = tokenmill("down")
    assert nothing.returncode == 0 and "nothing was running" in nothing.stdout

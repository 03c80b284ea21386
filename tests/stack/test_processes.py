"""The broker and Redis fixtures start real servers that answer their protocols; a
service is awaited until ready."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tokenmill.errors import StackError
from tokenmill.stack import processes


def test_redis_answers(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set("k", "v")
    assert r.get("k") == b"v"


def test_kafka_round_trip(kafka_bootstrap: str, unique: str) -> None:
    topic = f"t-{unique}"

    async def run() -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, b"m%d" % i, key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
            group_id=f"g-{unique}", fetch_max_wait_ms=50,
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            async with asyncio.timeout(20):
                while len(got) < 5:
                    batch = await consumer.getmany(timeout_ms=200)
                    got += [m.value for msgs in batch.values() for m in msgs]
        finally:
            await consumer.stop()
        return got

    assert asyncio.run(run()) == [b"m%d" % i for i in range(5)]


def test_wait_ready_checks_once_even_with_no_time_left(tmp_path: Path) -> None:
    """A service launched with others is awaited after them: its start timeout may be
    spent by then, and a service that is ready must still count as ready."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        processes.wait_ready("ready", proc, tmp_path / "log", lambda: True, timeout_s=0.0)
        with pytest.raises(StackError, match="not ready after 0s"):
            processes.wait_ready("never", proc, tmp_path / "log", lambda: False, timeout_s=0.0)
    finally:
        proc.kill()
        proc.wait(5)

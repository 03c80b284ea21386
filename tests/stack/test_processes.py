"""The broker and Redis fixtures start real servers that answer their protocols."""

from __future__ import annotations

import asyncio

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


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

"""Helpers for the local-stack tests (imported by name: ``tests/`` is not a package)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tokenmill.stack import processes


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def all_dead(pids: list[int]) -> bool:
    return not any(processes.pid_alive(pid) for pid in pids)


def tokenmill(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI entry point, ``python -m tokenmill``, in this environment."""
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ),
    )


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(15):
            while len(got) < count:
                batch = await consumer.getmany(timeout_ms=200)
                got += [m.value for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    return got

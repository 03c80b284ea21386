"""A whole local stack per test module: `tokenmill up` in a temporary home, with a
test config that adds a slow simulated model (so backlogs form), torn down by
`tokenmill down`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tokenmill import wire
from tokenmill.config import EXAMPLE_CONFIG

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import SLOW_MODEL  # noqa: E402  (the slow model the batch tests use too)


@dataclass
class Stack:
    home: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenmill", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout,
        )

    def state(self) -> dict:
        return json.loads((self.home / "stack.json").read_text())

    def address(self, name: str) -> str:
        return next(s["address"] for s in self.state()["services"] if s["name"] == name)

    def pid(self, name: str) -> int:
        return next(int(s["pid"]) for s in self.state()["services"] if s["name"] == name)

    def client_env(self) -> dict[str, str]:
        """Point this process's clients at the stack."""
        return {
            "TOKENMILL_HOME": str(self.home),
            "TOKENMILL_CONFIG": self.env["TOKENMILL_CONFIG"],
            "TOKENMILL_KAFKA_URL": self.address("kafka"),
            "TOKENMILL_REDIS_URL": self.address("redis"),
        }

    def read_topic(self, topic: str, *, timeout_s: float = 10.0) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
        """Every message of ``topic`` so far (key, value, headers), read without a group."""

        async def run() -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.address("kafka"), enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_wait_ms=50,
            )
            await consumer.start()
            try:
                parts = consumer.partitions_for_topic(topic) or set()
                if not parts:
                    await consumer._client.force_metadata_update()  # noqa: SLF001
                    parts = consumer.partitions_for_topic(topic) or set()
                tps = [TopicPartition(topic, p) for p in parts]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                # Tansu's end offsets can be off, so read until a quiet period instead.
                out: list[tuple[bytes | None, bytes, dict[str, bytes]]] = []
                quiet = 0
                async with asyncio.timeout(timeout_s):
                    while quiet < 3:
                        got = await consumer.getmany(timeout_ms=200)
                        msgs = [m for ms in got.values() for m in ms]
                        quiet = 0 if msgs else quiet + 1
                        out += [(m.key, m.value, dict(m.headers or ())) for m in msgs]
                return out
            finally:
                await consumer.stop()

        return asyncio.run(run())

    def events(self) -> list[wire.TokenEvent]:
        return [wire.decode(wire.TokenEvent, v) for _, v, _ in self.read_topic(wire.TOKEN_EVENTS_TOPIC)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack") / "home"
    config = home.parent / "tokenmill.toml"
    config.write_text(EXAMPLE_CONFIG.read_text() + SLOW_MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(TOKENMILL_HOME=str(home), TOKENMILL_CONFIG=str(config))
    s = Stack(home, env)
    up = s.cli("up", "--model", "slowsim")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield s
    finally:
        down = s.cli("down")
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    for k in [k for k in os.environ if k.startswith("TOKENMILL_")]:
        monkeypatch.delenv(k)
    for k, v in stack.client_env().items():
        monkeypatch.setenv(k, v)
    return stack

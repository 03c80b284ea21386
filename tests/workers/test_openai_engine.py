"""The ``openai`` engine against real OpenAI-compatible servers: ``vllm serve`` on CPU
with the tiny model, and a small server of our own for the failure cases (late
start, dropped connection, refusals, missing usage)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from tokenmill.workers.cancel import request_cancel
from tokenmill.workers.engines.openai_remote import OpenAIRemoteEngine, RemoteArgs
from tokenmill.workers.events import MemorySink
from tokenmill.workers.host import EngineHost
from tokenmill.workers.results import wait_result
from workers_helpers import (
    VLLM_ENV,
    chat_request,
    completion_request,
    dispatches,
    kinds,
    require_vllm,
    wait_for,
)

from tokenmill.stack import processes
from tokenmill.wire import EventKind

HostFactory = Callable[..., tuple[EngineHost, MemorySink]]


def remote(base_url: str, **args: object) -> OpenAIRemoteEngine:
    return OpenAIRemoteEngine(RemoteArgs(base_url=base_url, **args), model="tiny", capacity=16)


# -- our own server: scripted behaviours ------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "tiny"}]})

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = type(self).mode
        if mode == "bad":
            return self._json(400, {"error": {"message": "max_tokens is too large"}})
        if mode == "busy" and type(self).calls < 3:
            return self._json(503, {"error": {"message": "overloaded"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            self._event({"choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]})
            if mode == "drop" and i == 2:
                self.wfile.flush()
                self.connection.shutdown(2)
                return None
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if mode != "no-usage":
            self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}})
        self.wfile.write(b"data: [DONE]\n\n")
        return None

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def stub() -> Iterator[Callable[..., str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(mode: str = "ok", *, port: int | None = None, delay_s: float = 0.0) -> str:
        port = port or processes.free_port()
        handler = type("Stub", (_Stub,), {"mode": mode, "calls": 0})

        def serve() -> None:
            time.sleep(delay_s)
            server = ThreadingHTTPServer(("127.0.0.1", port), handler)
            servers.append(server)
            server.serve_forever(poll_interval=0.05)

        threading.Thread(target=serve, daemon=True).start()
        start.handlers.append(handler)  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}/v1"

    start.handlers = []  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_streams_and_uses_the_servers_usage(make_host: HostFactory, stub, rclient: redis.Redis) -> None:
    host, sink = make_host(engine=remote(stub("ok")), progress_tokens=4, progress_interval_s=10)
    req = chat_request("tiny", max_tokens=12)
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "succeeded"
    fin = sink.events[-1]
    assert (fin.kind, fin.prompt_tokens, fin.completion_tokens) == (EventKind.finished, 7, 12)
    assert EventKind.progress in kinds(sink.events, req.id) and not fin.simulated
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.body is not None
    assert result.body["choices"][0]["message"]["content"] == "".join(f" t{i}" for i in range(12))


def test_retries_connect_errors_before_the_first_token(make_host: HostFactory, stub) -> None:
    port = processes.free_port()
    engine = remote(f"http://127.0.0.1:{port}/v1", start_timeout_s=0, retry_backoff_s=0.2, max_retries=4)
    host, _ = make_host(engine=engine)
    stub("ok", port=port, delay_s=0.5)  # the server comes up late
    [outcome] = host.run_slice(dispatches([completion_request("tiny", max_tokens=3)]))
    assert outcome.status == "succeeded"


def test_retries_503_then_succeeds(make_host: HostFactory, stub) -> None:
    host, _ = make_host(engine=remote(stub("busy"), retry_backoff_s=0.05))
    [outcome] = host.run_slice(dispatches([completion_request("tiny", max_tokens=3)]))
    assert outcome.status == "succeeded"


def test_gives_up_after_the_retries(make_host: HostFactory, rclient: redis.Redis) -> None:
    dead = f"http://127.0.0.1:{processes.free_port()}/v1"
    host, sink = make_host(engine=remote(dead, start_timeout_s=0, retry_backoff_s=0.01, max_retries=2))
    req = completion_request("tiny", max_tokens=3)
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "failed"
    assert "server unavailable after 3 tries" in (sink.events[-1].reason or "")


@pytest.mark.parametrize(
    ("mode", "code", "text"),
    [
        ("drop", "engine_error", "stream ended before"),  # no retry after tokens
        ("bad", "invalid_request", "HTTP 400"),
        ("no-usage", "engine_error", "no usage"),
    ],
)
def test_failures_are_reported_with_the_reason(
    make_host: HostFactory, stub, rclient: redis.Redis, mode: str, code: str, text: str
) -> None:
    host, sink = make_host(engine=remote(stub(mode), retry_backoff_s=0.01))
    req = chat_request("tiny", max_tokens=8)
    [outcome] = host.run_slice(dispatches([req]))
    assert outcome.status == "failed"
    result = wait_result(rclient, req.id, timeout_s=5)
    assert result is not None and result.error is not None
    assert result.error.code == code and text in result.error.message
    assert sink.events[-1].kind is EventKind.failed
    assert stub.handlers[0].calls == 1  # nothing retried once tokens flowed (or on a 4xx)


# -- vllm serve ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, vllm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_vllm()
    port = processes.free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--distributed-executor-backend", "uni", "--seed", "0",
    ]
    env = {**VLLM_ENV, "TMPDIR": str(vllm_state), "VLLM_CACHE_ROOT": str(vllm_state / "cache")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    proc = processes.spawn("vllm serve", argv, log, up, timeout_s=300, env=env)
    yield base
    processes.stop_pid(proc.pid, timeout_s=30)


def _running(base: str) -> float:
    metrics = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=5).text
    lines = [x for x in metrics.splitlines() if x.startswith("vllm:num_requests_running")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


@pytest.mark.vllm
@pytest.mark.slow
def test_against_vllm_serve(make_host: HostFactory, vllm_server: str, rclient: redis.Redis) -> None:
    host, sink = make_host(engine=remote(vllm_server))
    reqs = [
        chat_request("tiny", f"hello {i}", max_tokens=24, temperature=0, ignore_eos=True) for i in range(3)
    ] + [completion_request("tiny", "once upon a time", max_tokens=20, temperature=0, ignore_eos=True)]
    outcomes = host.run_slice(dispatches(reqs))
    assert {o.status for o in outcomes} == {"succeeded"}
    for req in reqs:
        # the same request, non-streaming, straight to the server: same text, same usage
        direct_body = {**req.body, "model": "tiny", "max_tokens": req.max_tokens}
        path = "/chat/completions" if "messages" in req.body else "/completions"
        direct = httpx.post(vllm_server + path, json=direct_body, timeout=60).json()
        result = wait_result(rclient, req.id, timeout_s=5)
        assert result is not None and result.usage is not None and result.body is not None
        assert result.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
        assert result.usage.completion_tokens == direct["usage"]["completion_tokens"] == req.max_tokens
        choice, direct_choice = result.body["choices"][0], direct["choices"][0]
        if "messages" in req.body:
            assert choice["message"]["content"] == direct_choice["message"]["content"]
        else:
            assert choice["text"] == direct_choice["text"]
        fin = [e for e in sink.events if e.request_id == req.id][-1]
        assert (fin.prompt_tokens, fin.completion_tokens) == (
            result.usage.prompt_tokens, result.usage.completion_tokens
        )

    # cancel: the stream is closed and the server aborts the generation
    long = completion_request("tiny", "x", max_tokens=480, temperature=0, ignore_eos=True)
    fut = host.submit_slice(dispatches([long]))
    wait_for(lambda: EventKind.first_token in kinds(sink.events, long.id), 30, "first token")
    request_cancel(rclient, long.id)
    [outcome] = fut.result(30)
    assert outcome.status == "cancelled"
    wait_for(lambda: _running(vllm_server) == 0, 10, "server aborted the request")

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, running_stack, stack_config, use_stack
from webhook_helpers import MAX_ATTEMPTS, TIMEOUT_S, Received, Receiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = stack_config(max_attempts=MAX_ATTEMPTS, backoff_base_s=0.1, timeout_s=TIMEOUT_S)
    with running_stack(tmp_path_factory.mktemp("webhook-stack"), config) as s:
        yield s


@pytest.fixture
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return use_stack(stack, monkeypatch)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            rec = state["r"]
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            parts = self.path.strip("/").split("/")
            with rec.lock:
                calls = sum(1 for r in rec.received if r.path == self.path)
            if parts[0] == "hang":
                with rec.lock:
                    rec.received.append(Received(self.path, dict(self.headers), body, None))
                rec.release.wait(60)
                return
            code = 500 if parts[0] == "flaky" and calls < int(parts[1]) else 200
            with rec.lock:
                rec.received.append(Received(self.path, dict(self.headers), body, code))
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["r"] = rec = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        server.shutdown()
        server.server_close()

"""Real HTTP receivers on loopback for webhook tests, each keeping its own log of what
it was sent and when; and the test stack's webhook settings."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The stack fixture's: quick retries, and a receiver that never answers times out after a second.
MAX_ATTEMPTS = 5
TIMEOUT_S = 1.0
#: the longest any receiver holds a request (so a test's threads always end)
HOLD_LIMIT_S = 60.0


@dataclass
class Received:
    """One POST as the receiver saw it: ``started`` when its body was read, ``ended``
    when the receiver answered or the sender hung up (``time.monotonic()``)."""

    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None
    started: float = 0.0
    ended: float | None = None
    #: the sender closed the connection before the receiver was done with it
    hung_up: bool = False
    #: bytes of response body written before the end
    sent: int = 0

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return {k.lower(): v for k, v in self.headers.items()}["webhook-id"]


@dataclass
class Receiver:
    """A real HTTP receiver on loopback. Behaviour by the path's first part:

    * ``/flaky/<n>/…``: 500 for the first n calls of that path, then 200;
    * ``/hang/…``: never answers (until the sender hangs up);
    * ``/sleep/<ms>/…``: answers 200 after ``ms`` milliseconds, unless the sender hangs up first;
    * ``/trickle/…``: starts a 200 answer and sends one more header byte every 50 ms,
      never finishing the headers;
    * ``/huge/…``: answers 200 and streams an endless body;
    * anything else: 200 at once.
    """

    url: str
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def containing(self, text: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if text in r.path]


def _hung_up(sock: socket.socket, wait_s: float) -> bool:
    """Wait up to ``wait_s`` for the sender to close its end; True if it did."""
    readable, _, _ = select.select([sock], [], [], max(0.0, wait_s))
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _handler(rec: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            parts = self.path.strip("/").split("/")
            got = Received(self.path, dict(self.headers), body, None, started=time.monotonic())
            with rec.lock:
                calls = sum(1 for r in rec.received if r.path == self.path)
                rec.received.append(got)
            try:
                self._behave(parts, calls, got)
            except OSError:  # a write into a closed connection
                got.hung_up = True
            finally:
                got.ended = time.monotonic()
                self.close_connection = True

        def _behave(self, parts: list[str], calls: int, got: Received) -> None:
            kind = parts[0]
            if kind in ("hang", "sleep"):
                hold = HOLD_LIMIT_S if kind == "hang" else int(parts[1]) / 1000
                deadline = got.started + hold
                while time.monotonic() < deadline and not rec.closing.is_set():
                    if _hung_up(self.connection, min(0.05, deadline - time.monotonic())):
                        got.hung_up = True
                        return
                if kind == "hang":
                    return
            elif kind == "trickle":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nx-drip: ")
                self.wfile.flush()
                until = got.started + HOLD_LIMIT_S
                while time.monotonic() < until and not rec.closing.is_set():
                    if _hung_up(self.connection, 0.05):
                        got.hung_up = True
                        return
                    self.wfile.write(b"x")
                    self.wfile.flush()
                return
            elif kind == "huge":
                self.send_response(200)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("connection", "close")
                self.end_headers()
                chunk = b"y" * 65536
                until = got.started + HOLD_LIMIT_S
                while time.monotonic() < until and not rec.closing.is_set():
                    self.wfile.write(chunk)
                    got.sent += len(chunk)
                return
            code = 500 if kind == "flaky" and calls < int(parts[1]) else 200
            got.answered = code
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

    return Handler


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of connections past it waits
    # for a SYN retransmit (1 s), which the receiver would not see and the sender would.
    request_queue_size = 128


@contextmanager
def serve_receiver() -> Iterator[Receiver]:
    """A receiver on a free loopback port, for the length of the block."""
    rec = Receiver("")
    server = _Server(("127.0.0.1", 0), _handler(rec))
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.closing.set()
        server.shutdown()
        server.server_close()

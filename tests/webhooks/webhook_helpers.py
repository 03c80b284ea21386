"""A real HTTP receiver on loopback for webhook tests, and the test stack's webhook
settings."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

# Quick retries, and a receiver that never answers times out after a second.
MAX_ATTEMPTS = 5
TIMEOUT_S = 1.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP receiver on loopback. ``/flaky/<n>/…`` fails the first n calls of its
    path with 500; ``/hang/…`` never answers (until the test ends); anything else is 200."""

    url: str
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

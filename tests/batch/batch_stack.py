"""A whole local stack for batch and webhook tests: ``tokenmill up`` in a temporary home,
with a test config (a slow simulated model, small batch limits, quick webhook retries).
Shared by tests/batch and tests/webhooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import EXAMPLE_CONFIG

# 4 sequences at a time, 20 ms a token: a request of N tokens takes about N*20 ms.
SLOW_MODEL = """
[models.slowsim]
engine = "sim"
max_in_flight = 4
engine_args = { decode_ms_per_step = 20.0 }

[[price_cards]]
model = "slowsim"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "1.00"
output_per_million = "2.00"
batch_discount = "0.5"
"""

WEBHOOKS = """
[batch]
max_line_bytes = 4096

[webhooks]
allow_loopback = true
max_attempts = {max_attempts}
backoff_base_s = {backoff_base_s}
timeout_s = {timeout_s}
"""


def stack_config(*, max_attempts: int = 8, backoff_base_s: float = 1.0, timeout_s: float = 10.0) -> str:
    base = EXAMPLE_CONFIG.read_text()
    head, sep, _ = base.partition("[webhooks]")
    assert sep, "example.toml has a [webhooks] section"
    hooks = WEBHOOKS.format(max_attempts=max_attempts, backoff_base_s=backoff_base_s, timeout_s=timeout_s)
    return head + SLOW_MODEL + hooks


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    #: with `tokenmill up`'s supervisor; a test that kills a part of the stack to see
    #: what callers hear goes without, or the supervisor would repair it first
    supervise: bool = True

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenmill", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )

    def up(self) -> None:
        up = self.cli("up", "--model", "slowsim", *(() if self.supervise else ("--no-supervise",)))
        assert up.returncode == 0, up.stdout + up.stderr

    def down(self) -> None:
        down = self.cli("down")
        assert down.returncode == 0, down.stdout + down.stderr

    def state(self) -> dict:
        return json.loads((self.home / "stack.json").read_text())

    def address(self, name: str) -> str:
        return next(s["address"] for s in self.state()["services"] if s["name"] == name)

    def client_env(self) -> dict[str, str]:
        return {
            "TOKENMILL_HOME": str(self.home),
            "TOKENMILL_CONFIG": self.env["TOKENMILL_CONFIG"],
            "TOKENMILL_KAFKA_URL": self.address("kafka"),
            "TOKENMILL_REDIS_URL": self.address("redis"),
        }


@contextmanager
def running_stack(root: Path, config: str, *, supervise: bool = True) -> Iterator[Stack]:
    home = root / "home"
    cfg = root / "tokenmill.toml"
    cfg.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(TOKENMILL_HOME=str(home), TOKENMILL_CONFIG=str(cfg))
    s = Stack(home, env, supervise)
    s.up()
    try:
        yield s
    finally:
        s.down()


def use_stack(stack: Stack, monkeypatch) -> Stack:
    """Point this process's clients (and settings) at ``stack``."""
    for k in [k for k in os.environ if k.startswith("TOKENMILL_")]:
        monkeypatch.delenv(k)
    for k, v in stack.client_env().items():
        monkeypatch.setenv(k, v)
    return stack


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0, every: float = 0.1) -> object:
    """Poll ``check`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)

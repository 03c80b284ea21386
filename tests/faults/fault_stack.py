"""The fault suite's local stack: ``tokenmill up`` as real processes in a home of its own,
the test config (``faults.toml`` plus the sized ``sim`` model), and the faults themselves —
SIGKILL of a service's whole process group — with the recoveries a user would reach for:
``tokenmill up``, or the service's own command started by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sizes import Size
from tokenmill.config.settings import Settings, load_settings

from tokenmill.stack import processes

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "faults.toml"
MODEL = "fault"

#: API keys of the config's tenants (their SHA-256 digests are in faults.toml)
KEYS = {
    "alpha": "tm-faults-alpha-key",
    "beta": "tm-faults-beta-key",
    "gamma": "tm-faults-gamma-key",
}

# The services of `tokenmill up`, by the names its state file records.
WORKER, SCHEDULER, STREAMS = f"worker-{MODEL}", "scheduler", "streams"
BATCH_RUNNER, WEBHOOKS, REDIS, BROKER, GATEWAY = (
    "batch-runner",
    "webhooks",
    "redis",
    "kafka",
    "gateway",
)

#: each killable service's documented command, as a user starts it alone in a terminal
ALONE_COMMANDS: dict[str, tuple[str, ...]] = {
    WORKER: ("worker", "--model", MODEL),
    SCHEDULER: ("scheduler",),
    STREAMS: ("streams", "--no-metrics"),
    BATCH_RUNNER: ("batch-runner",),
    WEBHOOKS: ("webhook-worker",),
}

#: the model's one price card (per million tokens); the invariants price from these, not
#: from the code under test
PRICES = {"input_per_million": "0.30", "output_per_million": "1.20", "batch_discount": "0.5"}

MODEL_SECTION = """
[models.{model}]
engine = "sim"
max_in_flight = {max_in_flight}
default_max_tokens = 8
engine_args = {{ decode_ms_per_step = {decode_ms_per_step} }}

[[price_cards]]
model = "{model}"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "{input_per_million}"
output_per_million = "{output_per_million}"
batch_discount = "{batch_discount}"

[gateway]
port = {port}
request_timeout_s = {request_timeout_s}
"""


def stack_config(size: Size, gateway_port: int) -> str:
    """faults.toml plus the model, its price card and the gateway, for ``size``.

    The gateway keeps one port across restarts, so clients outlive a recovery.
    """
    return BASE_CONFIG.read_text() + MODEL_SECTION.format(
        model=MODEL,
        max_in_flight=size.max_in_flight,
        decode_ms_per_step=size.decode_ms_per_step,
        port=gateway_port,
        request_timeout_s=size.request_timeout_s,
        **PRICES,
    )


def wait_until(
    what: str, check: Callable[[], object], timeout_s: float, every_s: float = 0.2
) -> object:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


@dataclass
class FaultStack:
    """One local stack, driven only through the CLI and signals, as a user drives it."""

    root: Path
    size: Size
    home: Path = field(init=False)
    config: Path = field(init=False)
    gateway_port: int = field(init=False)
    #: services started by hand (``start_alone``): the stack's state file does not know them
    alone: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: the last ``tokenmill reconcile`` report read (invariants.Reconciliation), reused as
    #: the next case's starting point
    last_reconciliation: Any = None

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.config = self.root / "tokenmill.toml"
        self.gateway_port = processes.free_port()
        self.config.write_text(stack_config(self.size, self.gateway_port))

    # -- the CLI -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """A user's shell: this home and config, no service URLs (the stack file has them)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENMILL_", "OPENAI_"))}
        env.update(TOKENMILL_HOME=str(self.home), TOKENMILL_CONFIG=str(self.config),
                   TOKENMILL_WORKER_VISIBILITY_TIMEOUT=str(self.size.visibility_timeout_s))
        return env

    def cli(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenmill", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def up(self) -> None:
        # Unsupervised: these drills test the documented recoveries themselves (`up`, a
        # service started alone); tests/stack/test_supervised_stack.py tests supervision.
        run = self.cli("up", "--no-supervise")
        assert run.returncode == 0, (
            f"tokenmill up failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        )
        wait_until("the gateway to be ready", self.gateway_ready, 60.0)

    def down(self) -> None:
        run = self.cli("down")
        assert run.returncode == 0, (
            f"tokenmill down failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        )

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def gateway_ready(self) -> bool:
        try:
            return httpx.get(self.gateway + "/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def settings(self) -> Settings:
        """The stack's settings, as its services load them."""
        with pytest.MonkeyPatch.context() as mp:
            for key in [k for k in os.environ if k.startswith("TOKENMILL_")]:
                mp.delenv(key)
            mp.setenv("TOKENMILL_HOME", str(self.home))
            mp.setenv("TOKENMILL_CONFIG", str(self.config))
            return load_settings()

    # -- processes -----------------------------------------------------------------------

    def state(self) -> dict:
        path = self.home / "stack.json"
        return json.loads(path.read_text()) if path.exists() else {"services": []}

    def pid(self, service: str) -> int:
        pids = [s["pid"] for s in self.state()["services"] if s["name"] == service]
        assert pids, f"{service} is not in the stack's state file"
        return int(pids[0])

    def healthy(self) -> bool:
        """Every recorded service runs, nothing runs by hand, and the gateway is ready."""
        services = self.state()["services"]
        names = {s["name"] for s in services}
        expected = {WORKER, SCHEDULER, STREAMS, BATCH_RUNNER, WEBHOOKS, REDIS, BROKER, GATEWAY}
        return (
            not self.alone
            and expected <= names
            and all(processes.pid_alive(int(s["pid"])) for s in services)
            and self.gateway_ready()
        )

    def kill(self, service: str) -> int:
        """SIGKILL ``service``'s whole process group (the process and any children), as a
        crash or the OOM killer would; returns the pid once it is gone."""
        pid = self.pid(service)
        assert processes.pid_alive(pid), f"{service} (pid {pid}) was already dead"
        os.killpg(pid, signal.SIGKILL)
        wait_until(
            f"{service} (pid {pid}) to die", lambda: not processes.group_pids(pid), 10.0, 0.05
        )
        return pid

    def start_alone(self, service: str) -> subprocess.Popen[bytes]:
        """Start ``service`` by its own command, detached, as a user would in a terminal."""
        argv = [sys.executable, "-m", "tokenmill", *ALONE_COMMANDS[service]]
        proc = processes.start(argv, self.home / "logs" / f"{service}-alone.log", env=self.env)
        self.alone[service] = proc
        return proc

    def stop_alone(self) -> None:
        """Stop what ``start_alone`` started (SIGTERM, then SIGKILL)."""
        for service, proc in list(self.alone.items()):
            processes.stop_pid(proc.pid, timeout_s=30.0)
            processes.stop_group(proc.pid)
            proc.wait(10)
            del self.alone[service]

    def restore(self) -> None:
        """Bring the stack back to every service of ``up`` running (after a case that left it
        otherwise), the way a user would: stop what runs by hand, then ``tokenmill up``;
        if that does not do it, ``down`` and ``up``."""
        self.stop_alone()
        if self.healthy():
            return
        self.up()
        if not self.healthy():
            self.down()
            self.up()
        assert self.healthy(), f"the stack did not come back: {self.cli('status').stdout}"

    def log_tail(self, service: str, lines: int = 30) -> str:
        path = self.home / "logs" / f"{service}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )


@contextmanager
def running(root: Path, size: Size) -> Iterator[FaultStack]:
    """A fault stack, up; always brought down (hand-started services included)."""
    stack = FaultStack(root, size)
    try:
        stack.up()
        yield stack
    finally:
        stack.stop_alone()
        stack.cli("down", timeout_s=300.0)

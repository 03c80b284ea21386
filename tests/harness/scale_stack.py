"""The process harness of ``bench/scale.py``: a stack whose services are real processes,
started by the commands a deployment runs (``python -m tokenmill <service>``), any number
of copies of each, on an embedded Kafka-protocol broker and Redis on loopback.

It does not use ``tokenmill up``: the benchmark adds and kills copies itself (a second
scheduler, SIGKILL of the active one), and ``up``'s own supervision restarting what it
started would race those kills. Like a deployment's restart policy
(compose ``restart: unless-stopped``), a copy that exits on its own — e.g. a scheduler
that lost its lease and exits to come back as a standby — is started again, and
counted in :attr:`ScaleStack.restarts`. Everything started here is stopped in
:meth:`close`, each process by its own process group.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import redis
from tokenmill.config import EXAMPLE_CONFIG

from tokenmill import presence
from tokenmill.errors import StackError
from tokenmill.stack import health, processes

#: the sim model the workload runs on (zero-cost engine: the figures are tokenmill's)
MODEL = "bench"
#: a sim model no real worker serves: the scheduler-ceiling phase offers its capacity
#: through a heartbeat of its own, so no worker can be the bottleneck
CEILING_MODEL = "ceiling"
#: the benchmark's tenants: no rate limit, a budget no run reaches
TENANTS = ("scale-a", "scale-b", "scale-c", "scale-d")
WEBHOOK_SECRET = "whsec_c2NhbGUtYmVuY2gtd2ViaG9vay1zZWNyZXQ="


def api_key(tenant: str) -> str:
    return f"tm-{tenant}-key"


def _config_text() -> str:
    lines = [EXAMPLE_CONFIG.read_text()]
    for name in TENANTS:
        digest = hashlib.sha256(api_key(name).encode()).hexdigest()
        lines.append(f"""
[tenants.{name}]
tier = "gold"
api_key_sha256 = ["{digest}"]
webhook_secret = "{WEBHOOK_SECRET}"
budget = {{ amount = "1000000.00", period = "month" }}
""")
    for model in (MODEL, CEILING_MODEL):
        lines.append(f"""
[models.{model}]
engine = "sim"
max_in_flight = 2048
engine_args = {{ prefill_ms_per_token = 0.0, decode_ms_per_step = 0.0, decode_ms_per_seq = 0.0 }}

[[price_cards]]
model = "{model}"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "0.10"
output_per_million = "0.40"
""")
    return "".join(lines)


@dataclass
class Copy:
    """One running copy of a service."""

    service: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ScaleStack:
    """Kafka + Redis + any number of copies of each tokenmill service, on loopback."""

    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tm-scale-")))
    copies: list[Copy] = field(default_factory=list)
    infra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kafka: str = ""
    redis_url: str = ""
    #: copies that exited on their own and were started again, by service
    restarts: dict[str, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _closing: threading.Event = field(default_factory=threading.Event)

    # -- life cycle -----------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._start_infrastructure()
            self._supervisor = threading.Thread(
                target=self._supervise, name="supervisor", daemon=True
            )
            self._supervisor.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_infrastructure(self) -> None:
        home = self.dir / "home"
        (home / "data" / "redis").mkdir(parents=True)
        config = self.dir / "tokenmill.toml"
        config.write_text(_config_text())
        kport, rport = processes.free_port(), processes.free_port()
        self.kafka = f"{processes.LOOPBACK}:{kport}"
        self.redis_url = f"redis://{processes.LOOPBACK}:{rport}/0"
        self.infra.append(
            processes.spawn(
                "kafka",
                processes.kafka_argv(kport),
                self.dir / "logs" / "kafka.log",
                lambda: health.check("kafka", self.kafka, timeout_s=1.0) is None,
                timeout_s=60,
            )
        )
        self.infra.append(
            processes.spawn(
                "redis",
                processes.redis_argv(rport, home / "data" / "redis"),
                self.dir / "logs" / "redis.log",
                lambda: processes.redis_ready(rport),
                timeout_s=60,
            )
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        self.env.update(
            TOKENMILL_HOME=str(home),
            TOKENMILL_CONFIG=str(config),
            TOKENMILL_KAFKA_URL=self.kafka,
            TOKENMILL_REDIS_URL=self.redis_url,
            TOKENMILL_DATABASE_URL=f"sqlite:///{home / 'ledger.db'}",
            TOKENMILL_LOG_LEVEL="WARNING",
        )
        # This process (producers, the openai SDK's settings) sees the same stack.
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("TOKENMILL_")})
        from tokenmill.ledger.db import migrate

        migrate(self.env["TOKENMILL_DATABASE_URL"])  # once, before any copy opens it
        self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)

    def close(self) -> None:
        self._closing.set()
        if hasattr(self, "_supervisor"):
            self._supervisor.join(10)
        for copy in reversed(self.copies):
            self.stop(copy, timeout_s=15.0)
        for proc in reversed(self.infra):
            processes.stop_group(proc.pid, timeout_s=10.0)
            proc.wait(5)

    # -- copies ---------------------------------------------------------------------

    def start(self, service: str, *, timeout_s: float = 90.0) -> Copy:
        """Start one more copy of ``service`` and wait until it is ready.

        Services: ``gateway``, ``scheduler``, ``streams``, ``batch-runner``,
        ``webhook-worker``, ``worker`` (of :data:`MODEL`).

        Raises:
            StackError: it exited or was not ready within ``timeout_s`` (log tail shown).
        """
        return self.start_many([service], timeout_s=timeout_s)[0]

    def start_many(self, services: list[str], *, timeout_s: float = 90.0) -> list[Copy]:
        """Start one copy of each of ``services`` at once, then wait until all are
        ready (starting them side by side halves the wait on two cores)."""
        workers_before = self.live_workers(MODEL)
        started = [self._launch(s) for s in services]
        added_workers = sum(1 for c in started if c.service == "worker")
        for copy in started:
            ready = self._ready_check(copy, workers_before + added_workers)
            processes.wait_ready(copy.service, copy.proc, copy.log, ready, timeout_s=timeout_s)
        return started

    def _launch(self, service: str) -> Copy:
        n = len(self.of(service))
        log = self.dir / "logs" / f"{service}-{n}-{time.time_ns()}.log"
        tm = [sys.executable, "-m", "tokenmill"]
        address = None
        if service == "gateway":
            port = processes.free_port()
            address = f"http://{processes.LOOPBACK}:{port}"
            argv = [*tm, "gateway", "--host", processes.LOOPBACK, "--port", str(port)]
        elif service == "streams":
            port = processes.free_port()
            address = f"http://{processes.LOOPBACK}:{port}/metrics"
            argv = [*tm, "streams", "--metrics-port", str(port)]
        elif service == "worker":
            argv = [sys.executable, "-m", "tokenmill.workers.commands", "worker", "--model", MODEL]
        elif service in ("scheduler", "batch-runner", "webhook-worker"):
            argv = [*tm, service]
        else:
            raise ValueError(f"service: no such service {service!r}")
        with self._lock:
            copy = Copy(service, processes.start(argv, log, env=self.env), log, address)
            self.copies.append(copy)
        return copy

    def _supervise(self) -> None:
        """Start again any copy that exited while nobody stopped it."""
        while not self._closing.wait(0.25):
            with self._lock:
                for copy in [c for c in self.copies if not c.alive()]:
                    self.copies.remove(copy)
                    self.restarts[copy.service] = self.restarts.get(copy.service, 0) + 1
                    print(
                        f"  ({copy.service} pid {copy.pid} exited with {copy.proc.returncode}: "
                        "started again)",
                        flush=True,
                    )
                    self._launch(copy.service)

    def _ready_check(self, copy: Copy, workers_wanted: int) -> Callable[[], bool]:
        started = time.monotonic()
        if copy.service == "gateway":
            return lambda: _http_ok(f"{copy.address}/readyz")
        if copy.service == "streams":
            return lambda: _http_ok(copy.address or "")
        if copy.service == "worker":
            return lambda: self.live_workers(MODEL) >= workers_wanted
        if copy.service == "scheduler":
            # A scheduler that consumes sets the alive key to its pid; a standby (which
            # does not consume) is ready once it announces itself.
            return lambda: self.announced(copy.pid) is not None or self.alive_key_is(copy.pid)

        # batch-runner, webhook-worker: ready once announced; until every service
        # announces itself (tokenmill/presence.py), alive for 3 s stands in for it.
        def announced_or_settled() -> bool:
            return self.announced(copy.pid) is not None or time.monotonic() - started > 3.0

        return announced_or_settled

    def stop(self, copy: Copy, *, timeout_s: float = 20.0) -> None:
        """Forget the copy; SIGTERM (then SIGKILL) its process group."""
        with self._lock:
            if copy in self.copies:
                self.copies.remove(copy)
        if copy.alive():
            processes.stop_group(copy.pid, timeout_s=timeout_s)
        try:
            copy.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self, copy: Copy) -> None:
        """SIGKILL the copy (no clean shutdown: its lease, partitions and presence are
        left to expire) and reap it."""
        with self._lock:
            self.copies.remove(copy)
            os.killpg(copy.pid, signal.SIGKILL)
        copy.proc.wait(10)

    def of(self, service: str) -> list[Copy]:
        with self._lock:
            return [c for c in self.copies if c.service == service]

    def scale_to(self, service: str, n: int) -> None:
        """Start or stop copies (newest first) until ``n`` run."""
        while len(self.of(service)) < n:
            self.start(service)
        while len(self.of(service)) > n:
            self.stop(self.of(service)[-1])

    # -- what Redis says ------------------------------------------------------------

    def live_workers(self, model: str) -> int:
        from tokenmill.workers.heartbeat import live_workers

        return sum(1 for b in live_workers(self.redis, model, timeout_s=3.0) if model in b.models)

    def announced(self, pid: int) -> presence.Instance | None:
        """This machine's copy with ``pid`` as it last announced itself, if it did."""
        for inst in presence.live_instances(self.redis, timeout_s=5.0):
            if inst.instance.rsplit(":", 1)[-1] == str(pid):
                return inst
        return None

    def alive_key_is(self, pid: int) -> bool:
        from tokenmill.scheduler.service import ALIVE_KEY

        return self.redis.get(ALIVE_KEY) == str(pid).encode()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(
    what: str, condition: Callable[[], bool], timeout_s: float, every_s: float = 0.05
) -> float:
    """Poll ``condition`` until it holds; the seconds it took.

    Raises:
        StackError: it did not hold within ``timeout_s``.
    """
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise StackError(f"{what}: not within {timeout_s:g}s")
        time.sleep(every_s)
    return time.monotonic() - t0

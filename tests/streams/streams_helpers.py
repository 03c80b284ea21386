"""Helpers of the stream-processor tests and ``bench/streams.py``: synthetic ``finished``
events, publishing them, ``tokenmill streams`` worker processes, and reading the ledger
back. Nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from tokenmill.config import EXAMPLE_CONFIG

from tokenmill import kafka
from tokenmill.stack import processes
from tokenmill.wire import SCHEMA_VERSION

TENANTS = ("alpha", "beta", "gamma")
MODELS = ("sim", "smollm2")


def finished_event(
    request_id: str,
    *,
    tenant: str = "alpha",
    model: str = "sim",
    priority: str = "standard",
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
    finished_at: float | None = None,
    queue_s: float = 0.01,
    ttft_s: float = 0.1,
    tpot_s: float = 0.01,
) -> dict[str, Any]:
    """A ``finished`` token event as a JSON-ready dict (the wire shape of
    :class:`~tokenmill.wire.TokenEvent`), timed backwards from ``finished_at``."""
    end = time.time() if finished_at is None else finished_at
    e2e = ttft_s + tpot_s * max(completion_tokens - 1, 0)
    start = end - e2e
    return {
        "schema_version": SCHEMA_VERSION, "kind": "finished", "request_id": request_id,
        "tenant": tenant, "model": model, "priority": priority, "worker": "bench",
        "attempt": 1, "seq": completion_tokens + 1, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "ts": end, "submitted_at": start,
        "dispatched_at": start + min(queue_s, ttft_s), "first_token_at": start + ttft_s,
        "finished_at": end, "simulated": True,
    }  # fmt: skip


def mixed_events(n: int, *, prefix: str = "req", seed: int = 7,
                 finished_at: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """``n`` varied finished events: every tenant, model and priority, one output token
    now and then (TPOT undefined), about 3% of them slow enough to miss an SLA target."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        slow = rng.random() < 0.03
        out.append(
            finished_event(
                f"{prefix}-{i:07d}", tenant=rng.choice(TENANTS), model=rng.choice(MODELS),
                priority=rng.choice(("interactive", "standard", "batch")),
                prompt_tokens=rng.randint(0, 4000),
                completion_tokens=1 if rng.random() < 0.05 else rng.randint(0, 800),
                finished_at=finished_at, queue_s=rng.uniform(0.001, 0.2),
                ttft_s=rng.uniform(2.0, 9.0) if slow else rng.uniform(0.02, 0.6),
                tpot_s=rng.uniform(0.005, 0.05),
            )
        )  # fmt: skip
    return out


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def publish(
    bootstrap: str,
    topic: str,
    payloads: Iterable[tuple[bytes | None, bytes]],
    *,
    partition: int | None = None,
    partitions: int = 8,
) -> int:
    """Send (key, value) pairs to ``topic`` (created if missing) and wait for every ack."""

    async def run() -> int:
        await kafka.ensure_topics(bootstrap, [topic], partitions=partitions)
        producer = kafka.producer(bootstrap, linger_ms=5, max_batch_size=1 << 20)
        await kafka.start(producer, "test producer")
        try:
            futures = [await producer.send(topic, value, key=key, partition=partition)
                       for key, value in payloads]  # fmt: skip
            await producer.flush()
            await asyncio.gather(*futures)
            return len(futures)
        finally:
            await producer.stop()

    return asyncio.run(run())


def publish_events(bootstrap: str, topic: str, events: Sequence[dict[str, Any]]) -> int:
    """Publish finished events keyed by tenant, as workers do."""
    return publish(bootstrap, topic, ((e["tenant"].encode(), encode(e)) for e in events))


def read_topic(bootstrap: str, topic: str, *, quiet_s: float = 0.6,
               timeout_s: float = 20.0) -> list[Any]:  # fmt: skip
    """Every record of ``topic`` so far, read without a group until it stays quiet
    (Tansu's end offsets cannot be trusted)."""
    from aiokafka import TopicPartition

    async def run() -> list[Any]:
        consumer = kafka.consumer(bootstrap, group_id=None)
        await kafka.start(consumer, "test reader")
        try:
            await consumer.topics()  # refreshes the metadata
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            out: list[Any] = []
            last = time.monotonic()
            async with asyncio.timeout(timeout_s):
                while time.monotonic() - last < quiet_s:
                    got = await consumer.getmany(timeout_ms=100)
                    for recs in got.values():
                        out += recs
                        last = time.monotonic()
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


@dataclass
class WorkerProcess:
    """A ``python -m tokenmill streams`` child process (its own session), logging to a file."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        self.proc = processes.start(
            [sys.executable, "-m", "tokenmill", "streams"], self.log_path, env=self.env
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no offset commit."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def batches(self) -> list[dict[str, Any]]:
        """The per-batch reports the worker logged."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{") and '"event": "batch"' in line:
                out.append(json.loads(line))
        return out


def worker_env(*, home: Path, bootstrap: str, database_url: str, app_id: str, topic: str,
               redis_url: str = "redis://127.0.0.1:9/0",
               extra: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Environment of a worker isolated by its home, group, topics and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(
        # named: with service URLs set, nothing falls back to the example config silently
        TOKENMILL_CONFIG=str(EXAMPLE_CONFIG),
        TOKENMILL_HOME=str(home), TOKENMILL_KAFKA_URL=bootstrap,
        # where each copy announces itself; without one (benchmarks) the announcements
        # fail and are logged, nothing else uses Redis
        TOKENMILL_REDIS_URL=redis_url,
        TOKENMILL_DATABASE_URL=database_url, TOKENMILL_STREAMS__APP_ID=app_id,
        TOKENMILL_STREAMS__TOPIC=topic, TOKENMILL_STREAMS__DEAD_LETTER_TOPIC=f"{topic}.dead",
        TOKENMILL_STREAMS__VIOLATIONS_TOPIC=f"{topic}.violations",
        TOKENMILL_STREAMS__METRICS_PORT="0", TOKENMILL_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class LedgerTotals:
    """What the ledger holds, summed (for exactness checks)."""

    usage_records: int
    input_tokens: int
    output_tokens: int
    minute_requests: int
    minute_input_tokens: int
    minute_output_tokens: int
    charges: int
    amount: Decimal
    sla_records: int
    sla_met: int


def ledger_totals(url: str) -> LedgerTotals:
    """Sums over the whole ledger (one short read transaction)."""
    from sqlalchemy import case, func, select
    from tokenmill.ledger.db import make_engine, session_factory, transaction
    from tokenmill.ledger.models import LedgerEntry, SlaRecord, UsageMinute, UsageRecord

    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as s:
            u = s.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                    func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
                )
            ).one()
            m = s.execute(
                select(
                    func.coalesce(func.sum(UsageMinute.requests), 0),
                    func.coalesce(func.sum(UsageMinute.input_tokens), 0),
                    func.coalesce(func.sum(UsageMinute.output_tokens), 0),
                )
            ).one()
            amounts = list(s.execute(select(LedgerEntry.amount)).scalars())
            sla = s.execute(
                select(func.count(), func.coalesce(func.sum(case((SlaRecord.met, 1), else_=0)), 0))
            ).one()
    finally:
        engine.dispose()
    return LedgerTotals(int(u[0]), int(u[1]), int(u[2]), int(m[0]), int(m[1]), int(m[2]),
                        len(amounts), sum(amounts, Decimal(0)), int(sla[0]), int(sla[1]))  # fmt: skip


def usage_count(url: str) -> int:
    from sqlalchemy import func, select
    from tokenmill.ledger.db import make_engine, session_factory, transaction
    from tokenmill.ledger.models import UsageRecord

    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as s:
            return int(s.execute(select(func.count()).select_from(UsageRecord)).scalar_one())
    finally:
        engine.dispose()


def wait_until(
    predicate: Any, *, timeout_s: float, interval_s: float = 0.2, what: str = ""
) -> None:
    """Poll ``predicate()`` until true.

    Raises:
        TimeoutError: still false after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"not {what or 'done'} within {timeout_s:.0f}s")


class Workers:
    """Starts stream-processor workers for one test and stops them at its end."""

    def __init__(
        self, tmp_path: Path, bootstrap: str, database_url: str, unique: str, redis_url: str
    ) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topic = f"t.{unique}.token-events"
        self.app_id = f"streams-{unique}"
        self.started: list[WorkerProcess] = []

    def start(self, **extra_env: str) -> WorkerProcess:
        n = len(self.started)
        env = worker_env(home=self.tmp_path / f"home{n}", bootstrap=self.bootstrap,
                         database_url=self.database_url, app_id=self.app_id,
                         topic=self.topic, redis_url=self.redis_url, extra=extra_env)  # fmt: skip
        worker = WorkerProcess(env, self.tmp_path / f"worker{n}.log").start()
        self.started.append(worker)
        return worker

    def publish(self, events: list[dict], *, spread: bool = False) -> None:
        """Publish keyed by tenant, as workers do, or with ``spread`` keyed by request id
        (three tenants hash to at most three of the eight partitions)."""
        if spread:
            publish(self.bootstrap, self.topic,
                    ((e["request_id"].encode(), encode(e)) for e in events))  # fmt: skip
        else:
            publish_events(self.bootstrap, self.topic, events)

    def wait_ready(self, worker: WorkerProcess, *, timeout_s: float = 60.0) -> None:
        """Until the worker has joined the group and got its partitions."""
        wait_until(lambda: '"event": "partitions assigned"' in worker.log(),
                   timeout_s=timeout_s, what="the worker ready")  # fmt: skip

    def wait_recorded(self, n: int, *, timeout_s: float = 90.0) -> None:
        def done() -> bool:
            for w in self.started:
                if w.proc is not None and w.proc.poll() not in (None, 0, -9):  # 0: stopped
                    raise AssertionError(f"worker exited {w.proc.returncode}:\n{w.log()[-4000:]}")
            return usage_count(self.database_url) >= n

        wait_until(done, timeout_s=timeout_s, interval_s=0.25, what=f"{n} usage records")

    def metrics(self, index: int = 0) -> dict[str, float]:
        """The worker's Prometheus samples (``name{labels}`` → value), from its endpoint."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        port_file = self.tmp_path / f"home{index}" / "streams" / f"{self.app_id}.metrics-port"
        text = httpx.get(f"http://127.0.0.1:{port_file.read_text()}/metrics", timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {i} ---\n{w.log()[-6000:]}" for i, w in enumerate(self.started)
        )

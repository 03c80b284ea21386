"""The webhook worker as a real process (``tokenmill webhook-worker``: Celery worker,
dispatcher and request watcher) on the test session's Redis and broker, with its own
SQLite ledger, config and Redis database; events are recorded the way the batch runner
records them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import redis
from batch_stack import stack_config, wait_for
from sqlalchemy import select
from tokenmill.ledger import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    shared_factory,
    transaction,
)
from tokenmill.workers.webhook_events import enqueue_event, webhook_id_for

from tokenmill.stack import processes

_next_db = iter(range(1, 16))


class Attempt(NamedTuple):
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: float


class WebhookProcess:
    def __init__(self, root: Path, *, redis_url: str, kafka_bootstrap: str, timeout_s: float,
                 max_attempts: int, backoff_base_s: float) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "webhook-worker.log"
        self.db_url = f"sqlite:///{root / 'ledger.db'}"
        # A Redis database of its own: no other test's queue or locks.
        self.redis_url = redis_url.rsplit("/", 1)[0] + f"/{next(_next_db)}"
        redis.Redis.from_url(self.redis_url).flushdb()
        config = root / "tokenmill.toml"
        config.write_text(stack_config(max_attempts=max_attempts, backoff_base_s=backoff_base_s,
                                       timeout_s=timeout_s))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        self.env.update(TOKENMILL_HOME=str(root / "home"), TOKENMILL_CONFIG=str(config),
                        TOKENMILL_DATABASE_URL=self.db_url, TOKENMILL_REDIS_URL=self.redis_url,
                        TOKENMILL_KAFKA_URL=kafka_bootstrap)
        self.factory = shared_factory(self.db_url)  # migrated here, before the worker opens it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc = processes.start([sys.executable, "-m", "tokenmill", "webhook-worker"], self.log, env=self.env)
        # Celery says "ready." once it consumes the queue.
        wait_for("webhook worker ready", lambda: self._ready(mark), timeout=60)

    def _ready(self, mark: int) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        return b" ready." in self.log.read_bytes()[mark:]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            processes.stop_pid(self.proc.pid)
            self.proc.wait(timeout=10)

    def enqueue(self, targets: Iterable[tuple[str, str]], tenant: str = "alpha") -> list[str]:
        """Record a webhook per ``(event key, url)``; their message ids."""
        ids = []
        with transaction(self.factory) as s:
            for key, url in targets:
                assert enqueue_event(s, key=key, tenant=tenant, url=url, event_type="batch.completed",
                                     data={"id": key})
                ids.append(webhook_id_for(key))
        return ids

    def statuses(self, ids: list[str]) -> dict[str, tuple[DeliveryStatus, int]]:
        with transaction(self.factory) as s:
            rows = s.execute(select(WebhookDelivery).where(WebhookDelivery.webhook_id.in_(ids))).scalars()
            return {d.webhook_id: (d.status, d.attempts) for d in rows}

    def attempts(self, webhook_id: str) -> list[Attempt]:
        """The attempts recorded for a delivery, in order."""
        with transaction(self.factory) as s:
            rows = s.execute(
                select(WebhookAttempt).join(WebhookDelivery, WebhookAttempt.delivery_id == WebhookDelivery.id)
                .where(WebhookDelivery.webhook_id == webhook_id).order_by(WebhookAttempt.attempt)
            ).scalars()
            return [Attempt(a.attempt, a.status_code, a.error, a.duration_ms) for a in rows]

    def wait_all(self, ids: list[str], done: set[DeliveryStatus], timeout: float) -> dict[str, tuple[DeliveryStatus, int]]:
        """Wait (bounded) until every delivery is in one of ``done``; their states."""

        def settled() -> dict[str, tuple[DeliveryStatus, int]] | None:
            st = self.statuses(ids)
            return st if len(st) == len(ids) and all(status in done for status, _ in st.values()) else None

        return wait_for(f"{len(ids)} deliveries {sorted(d.value for d in done)}", settled,
                        timeout=timeout, every=0.2)  # type: ignore[return-value]

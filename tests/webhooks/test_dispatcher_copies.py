"""Two webhook processes (each a dispatcher, request watcher and Celery worker) on one
ledger and one Redis: every message is delivered exactly once — one POST, one attempt.
Real processes, Redis, SQLite ledger, loopback receiver."""

from __future__ import annotations

import copy
import uuid

import redis
from batch_stack import wait_for
from tokenmill.ledger import DeliveryStatus
from webhook_helpers import Receiver
from webhook_process import WebhookProcess

from tokenmill.presence import live_instances

MESSAGES = 40
HOLD_MS = 200  # slow enough that both processes have POSTs in flight together


def test_two_dispatchers_deliver_each_webhook_once(tmp_path, redis_url: str, kafka_bootstrap: str,
                                                   receiver: Receiver) -> None:
    first = WebhookProcess(tmp_path / "first", redis_url=redis_url, kafka_bootstrap=kafka_bootstrap,
                           timeout_s=3.0, max_attempts=5, backoff_base_s=0.2)
    second = copy.copy(first)  # same ledger, Redis database and config; a log of its own
    second.log = tmp_path / "second.log"
    run = uuid.uuid4().hex
    paths = [f"/sleep/{HOLD_MS}/{run}/{i}" for i in range(MESSAGES)]
    first.start()
    second.start()
    client = redis.Redis.from_url(first.redis_url)
    try:
        pids = {f"{p.proc.pid}" for p in (first, second) if p.proc is not None}
        wait_for("both dispatchers announced", lambda: pids <= {
            i.instance.rsplit(":", 1)[1] for i in live_instances(client) if i.service == "webhooks"}, timeout=15)
        ids = first.enqueue((f"{run}:{i}", receiver.url + p) for i, p in enumerate(paths))
        states = first.wait_all(ids, {DeliveryStatus.delivered, DeliveryStatus.dead}, timeout=60)
        # Both dispatchers were up the whole time; let any duplicate that was sent arrive.
        wait_for("every POST answered", lambda: all(r.ended is not None for r in receiver.containing(run)),
                 timeout=10)
    finally:
        first.stop()
        second.stop()
        client.close()
    assert set(states.values()) == {(DeliveryStatus.delivered, 1)}
    for path, wid in zip(paths, ids):
        posts = receiver.on(path)
        assert [(p.webhook_id, p.answered) for p in posts] == [(wid, 200)], path
        assert [(a.attempt, a.status_code) for a in first.attempts(wid)] == [(1, 200)]
    # Both copies took part: each Celery worker logged attempts.
    for proc in (first, second):
        assert b"webhook attempt" in proc.log.read_bytes(), proc.log

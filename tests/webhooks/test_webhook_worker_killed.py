"""The webhook worker process (Celery worker and dispatcher) SIGKILLed while POSTs are in
flight, then started again: every message is delivered, under one webhook-id each, and
the ledger shows each delivered. Real process, Redis, SQLite ledger, loopback receivers."""

from __future__ import annotations

import uuid

from batch_stack import wait_for
from tokenmill.ledger import DeliveryStatus
from webhook_helpers import Receiver
from webhook_process import WebhookProcess

DEADLINE_S = 3.0
MESSAGES = 12
HOLD_MS = 1500  # answered well within the deadline, so POSTs are in flight when killed


def test_worker_killed_mid_delivery_loses_nothing(tmp_path, redis_url: str, kafka_bootstrap: str,
                                                   receiver: Receiver) -> None:
    worker = WebhookProcess(tmp_path / "worker", redis_url=redis_url, kafka_bootstrap=kafka_bootstrap,
                            timeout_s=DEADLINE_S, max_attempts=5, backoff_base_s=0.2)
    run = uuid.uuid4().hex
    paths = [f"/sleep/{HOLD_MS}/{run}/{i}" for i in range(MESSAGES)]
    worker.start()
    try:
        ids = worker.enqueue((f"{run}:{i}", receiver.url + p) for i, p in enumerate(paths))
        wait_for("POSTs in flight", lambda: sum(r.ended is None for r in receiver.containing(run)) >= 4, timeout=30)
        worker.kill()
        # The kill cut the POSTs in flight: their receivers saw the sender hang up.
        wait_for("a POST cut by the kill", lambda: [r for r in receiver.containing(run) if r.hung_up], timeout=10)
        before = worker.statuses(ids)
        assert any(status is DeliveryStatus.pending for status, _ in before.values()), before
        worker.start()
        # The dead dispatcher's leases end (lock life + one deadline) and all is sent again.
        states = worker.wait_all(ids, {DeliveryStatus.delivered, DeliveryStatus.dead}, timeout=90)
    finally:
        worker.stop()
    assert set(states.values()) == {(DeliveryStatus.delivered, 1)}
    for path, wid in zip(paths, ids):
        posts = receiver.on(path)
        assert {p.webhook_id for p in posts} == {wid}, path  # one id per message, on every POST
        assert any(p.answered == 200 for p in posts), path
        assert [(a.attempt, a.status_code) for a in worker.attempts(wid)] == [(1, 200)]
    assert len(set(ids)) == MESSAGES

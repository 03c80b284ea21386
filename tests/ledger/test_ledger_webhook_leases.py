"""Webhook dispatchers leasing due deliveries at the same time, on SQLite and PostgreSQL:
no delivery is ever leased by two of them while its lease lasts."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import enqueue_webhook, lease_due_webhooks, transaction

DELIVERIES = 240
COPIES = 4


def test_concurrent_leases_never_share_a_delivery(sessions: sessionmaker[Session]) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    with transaction(sessions) as s:
        for i in range(DELIVERIES):
            enqueue_webhook(s, webhook_id=f"msg_{i:04d}", tenant="alpha", url="https://example.com/hook",
                            event_type="batch.completed", payload={"i": i}, at=start)
    leased: list[list[str]] = [[] for _ in range(COPIES)]
    errors: list[BaseException] = []
    go = threading.Barrier(COPIES)

    def dispatcher(mine: list[str]) -> None:
        try:
            go.wait(timeout=10)
            while True:  # small leases, so the copies interleave many times
                with transaction(sessions) as s:
                    got = lease_due_webhooks(s, datetime.now(UTC), lease_s=300, limit=7)
                if not got:
                    return
                mine += [wid for wid, _ in got]
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=dispatcher, args=(m,)) for m in leased]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    counts = Counter(wid for mine in leased for wid in mine)
    assert len(counts) == DELIVERIES and set(counts.values()) == {1}, "a delivery leased twice"
    assert sum(1 for mine in leased if mine) >= 2, "the copies did not run side by side"

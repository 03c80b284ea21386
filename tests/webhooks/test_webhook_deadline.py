"""Each attempt has one total deadline and reads a capped response body, so a slow
receiver never gets a second POST of a message while one is still in flight. A real
webhook worker process (Celery, dispatcher) on real Redis, a SQLite ledger and real
receivers on loopback; the receivers' own logs say what they saw."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from itertools import pairwise

import pytest
from batch_stack import wait_for
from tokenmill.ledger import DeliveryStatus
from webhook_helpers import Received, Receiver
from webhook_process import WebhookProcess

DEADLINE_S = 2.0
MAX_ATTEMPTS = 3
MESSAGES = 12  # more than the worker's 8 threads: some wait in the queue


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[WebhookProcess]:
    w = WebhookProcess(tmp_path_factory.mktemp("webhook-deadline"), redis_url=redis_url,
                       kafka_bootstrap=kafka_bootstrap, timeout_s=DEADLINE_S, max_attempts=MAX_ATTEMPTS,
                       backoff_base_s=0.2)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def one_at_a_time(posts: list[Received]) -> None:
    ordered = sorted(posts, key=lambda r: r.started)
    for earlier, later in pairwise(ordered):
        assert earlier.ended is not None and later.started >= earlier.ended, (earlier, later)


def all_ended(receiver: Receiver, run: str) -> list[Received]:
    return wait_for("every POST ended", lambda: (got := receiver.containing(run))
                    and all(r.ended is not None for r in got) and got, timeout=10)  # type: ignore[return-value]


def test_receivers_slower_than_the_deadline_get_posts_one_at_a_time(worker: WebhookProcess, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    hold_ms = int(DEADLINE_S * 2500)
    # Half hold the request silently, half trickle header bytes (each read is quick:
    # only a total deadline ends those).
    paths = [f"/sleep/{hold_ms}/{run}/{i}" if i % 2 else f"/trickle/{run}/{i}" for i in range(MESSAGES)]
    ids = worker.enqueue((f"{run}:{i}", receiver.url + p) for i, p in enumerate(paths))
    assert len(set(ids)) == MESSAGES
    states = worker.wait_all(ids, {DeliveryStatus.dead}, timeout=120)
    assert set(states.values()) == {(DeliveryStatus.dead, MAX_ATTEMPTS)}
    all_ended(receiver, run)
    for path, wid in zip(paths, ids):
        posts = receiver.on(path)
        attempts = worker.attempts(wid)
        assert len(posts) == len(attempts) == MAX_ATTEMPTS, (path, posts, attempts)
        assert {p.webhook_id for p in posts} == {wid}
        one_at_a_time(posts)
        # Each ended at the sender's deadline: the sender hung up, the receiver never answered.
        assert all(p.hung_up and p.answered is None for p in posts)
        assert all(p.ended - p.started < DEADLINE_S + 1.0 for p in posts if p.ended is not None)
        for a in attempts:
            assert a.status_code is None and (a.error or "").startswith("Timeout"), a
            assert DEADLINE_S * 1000 - 50 <= a.duration_ms <= (DEADLINE_S + 0.5) * 1000, a


def test_receivers_a_bit_faster_than_the_deadline_get_exactly_one_post(worker: WebhookProcess, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    paths = [f"/sleep/{int(DEADLINE_S * 750)}/{run}/{i}" for i in range(MESSAGES)]
    ids = worker.enqueue((f"{run}:{i}", receiver.url + p) for i, p in enumerate(paths))
    states = worker.wait_all(ids, {DeliveryStatus.delivered, DeliveryStatus.dead}, timeout=60)
    assert set(states.values()) == {(DeliveryStatus.delivered, 1)}
    all_ended(receiver, run)
    for path, wid in zip(paths, ids):
        [post] = receiver.on(path)
        assert (post.webhook_id, post.answered, post.hung_up) == (wid, 200, False)
        assert [(a.attempt, a.status_code) for a in worker.attempts(wid)] == [(1, 200)]


def test_an_endless_response_body_ends_the_attempt_at_the_cap(worker: WebhookProcess, receiver: Receiver) -> None:
    run = uuid.uuid4().hex
    path = f"/huge/{run}"
    [wid] = worker.enqueue([(run, receiver.url + path)])
    assert worker.wait_all([wid], {DeliveryStatus.delivered, DeliveryStatus.dead}, timeout=30) == {
        wid: (DeliveryStatus.delivered, 1)}
    [post] = all_ended(receiver, run)
    # The sender read its cap and hung up, long before the deadline.
    assert post.hung_up and post.ended - post.started < DEADLINE_S / 2, post
    [a] = worker.attempts(wid)
    assert a.status_code == 200 and a.error is None and a.duration_ms < DEADLINE_S * 500, a

"""One delivery attempt at a time, against a real Redis and a SQLite ledger: refused
targets are dead at once, copies of a task never post twice, attempts are recorded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from batch_stack import wait_for
from tokenmill.config import EXAMPLE_CONFIG, load_settings
from tokenmill.config.models import WebhookSettings
from tokenmill.ledger import (
    DeliveryStatus,
    get_webhook,
    lease_due_webhooks,
    list_webhooks,
    shared_factory,
    transaction,
)
from tokenmill.workers.webhook_attempt import RECORD_RESERVE_S, Deliverer, lock_name
from tokenmill.workers.webhook_events import enqueue_event, webhook_id_for
from tokenmill.workers.webhook_post import Poster
from tokenmill.workers.webhook_signing import verify
from tokenmill.workers.webhook_targets import PinnedTarget, pin_target


@pytest.fixture
def hits() -> Iterator[tuple[str, list[dict[str, str]]]]:
    got: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append({**dict(self.headers), "body": body.decode()})
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def deliverer(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, *, allow: bool) -> Deliverer:
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        webhooks=WebhookSettings(allow_loopback=allow, max_attempts=3, backoff_base_s=0.01, timeout_s=2),
    )
    return Deliverer(settings, shared_factory(settings.ledger_url), redis.Redis.from_url(redis_url),
                     Poster(settings.webhooks))


def enqueue(d: Deliverer, url: str, key: str) -> str:
    with transaction(d.factory) as s:
        assert enqueue_event(s, key=key, tenant="alpha", url=url, event_type="batch.completed", data={"id": key})
        assert not enqueue_event(s, key=key, tenant="alpha", url=url, event_type="batch.completed", data={})
    return webhook_id_for(key)


def test_delivered_once_even_when_the_task_runs_twice(tmp_path, redis_url, monkeypatch, hits) -> None:
    url, got = hits
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=True)
    wid = enqueue(d, url, "k1")
    with transaction(d.factory) as s:
        leased = lease_due_webhooks(s, datetime.now(UTC), lease_s=60)
    assert leased == [(wid, 0)]
    # Another copy is attempting it right now: this one does nothing.
    d.redis.set(lock_name(wid), b"other", ex=30)
    assert d.deliver(wid, 1) is None and got == []
    d.redis.delete(lock_name(wid))
    assert d.deliver(wid, 1) == "delivered"
    assert d.deliver(wid, 1) is None  # a copy sent again after the attempt
    assert len(got) == 1
    secret = d.settings.tenants["alpha"].webhook_secret.get_secret_value()
    verify(secret, got[0], got[0]["body"].encode())
    with transaction(d.factory) as s:
        row = get_webhook(s, wid)
        assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.delivered, 1, 204)


def test_the_lock_outlives_a_hanging_post_and_is_released_after_it(tmp_path, redis_url, monkeypatch, receiver) -> None:
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=True)
    deadline_s = d.settings.webhooks.timeout_s
    wid = enqueue(d, receiver.url + "/hang/lock", "k7")
    outcome: list[str | None] = []
    first = threading.Thread(target=lambda: outcome.append(d.deliver(wid, 1)))
    first.start()
    [post] = wait_for("the POST in flight", lambda: receiver.on("/hang/lock"), timeout=10)
    # While it hangs, the lock outlives whatever is left of the POST's deadline by a
    # margin, and another copy of the task neither posts nor waits.
    left_ms = d.redis.pttl(lock_name(wid))
    in_flight_s = time.monotonic() - post.started
    assert left_ms > (deadline_s - in_flight_s + RECORD_RESERVE_S - 0.5) * 1000, left_ms
    assert d.deliver(wid, 1) is None
    first.join(timeout=deadline_s + 5)
    assert outcome == ["pending"] and len(receiver.on("/hang/lock")) == 1
    assert post.hung_up and post.ended is not None and post.ended - post.started < deadline_s + 0.5
    assert d.redis.exists(lock_name(wid)) == 0  # released, not left to expire
    with transaction(d.factory) as s:
        row = get_webhook(s, wid)
        assert (row.status, row.attempts) == (DeliveryStatus.pending, 1)
        assert (row.last_error or "").startswith("Timeout")


def test_loopback_target_refused_when_not_allowed(tmp_path, redis_url, monkeypatch, hits) -> None:
    url, got = hits
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=False)
    wid = enqueue(d, url, "k2")
    assert d.deliver(wid, 1) == "dead"
    assert got == []
    with transaction(d.factory) as s:
        [row] = list_webhooks(s, status=DeliveryStatus.dead, tenant="alpha")
        assert row.webhook_id == wid and "loopback address" in (row.last_error or "")


def test_retries_then_dead_after_max_attempts(tmp_path, redis_url, monkeypatch) -> None:
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=True)
    wid = enqueue(d, "http://127.0.0.1:9/nothing-listens", "k3")
    assert [d.deliver(wid, n) for n in (1, 2, 3)] == ["pending", "pending", "dead"]
    with transaction(d.factory) as s:
        row = get_webhook(s, wid)
        assert row.attempts == 3 and row.next_attempt_at is None and "ConnectError" in row.last_error


def answers(table: dict[str, list[str]], calls: list[str] | None = None):
    """A host name lookup with fixed answers, in ``socket.getaddrinfo``'s shape."""

    def resolve(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        if calls is not None:
            calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    return resolve


def test_posts_to_the_checked_address_with_the_name_as_host(tmp_path, redis_url, monkeypatch, hits) -> None:
    url, got = hits
    port = url.split(":")[2].split("/")[0]
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=True)
    d.poster.resolve = answers({"hooks.test": ["127.0.0.1"]})
    wid = enqueue(d, f"http://hooks.test:{port}/hook", "k4")
    assert d.deliver(wid, 1) == "delivered"
    assert [{k.lower(): v for k, v in h.items()}["host"] for h in got] == [f"hooks.test:{port}"]


def test_a_name_resolving_to_a_refused_address_is_dead_at_once(tmp_path, redis_url, monkeypatch, hits) -> None:
    url, got = hits
    port = url.split(":")[2].split("/")[0]
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=False)
    d.poster.resolve = answers({"hooks.test": ["93.184.216.34", "127.0.0.1"]})
    wid = enqueue(d, f"http://hooks.test:{port}/hook", "k5")
    assert d.deliver(wid, 1) == "dead" and got == []
    with transaction(d.factory) as s:
        assert "127.0.0.1" in (get_webhook(s, wid).last_error or "")


def test_a_name_that_does_not_resolve_is_retried(tmp_path, redis_url, monkeypatch) -> None:
    d = deliverer(tmp_path, redis_url, monkeypatch, allow=False)

    def unknown(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    d.poster.resolve = unknown
    wid = enqueue(d, "https://not-yet.test/hook", "k6")
    assert [d.deliver(wid, n) for n in (1, 2, 3)] == ["pending", "pending", "dead"]  # dead only at max_attempts
    with transaction(d.factory) as s:
        assert "cannot resolve 'not-yet.test'" in (get_webhook(s, wid).last_error or "")


def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    # A rebinding name: public on the first lookup, loopback on every later one.
    calls: list[str] = []
    first = answers({"hooks.test": ["93.184.216.34"]}, calls)
    later = answers({"hooks.test": ["127.0.0.1"]})
    resolve = lambda host, port, **kw: (first if not calls else later)(host, port, **kw)
    target = pin_target("https://user@hooks.test:8443/x?y=1", WebhookSettings(), resolve=resolve)
    assert calls == ["hooks.test"]  # one lookup: the checked answer is the one used
    assert target.url == "https://user@93.184.216.34:8443/x?y=1"
    assert target.headers == {"host": "hooks.test:8443"}
    assert target.extensions == {"sni_hostname": "hooks.test"}  # TLS checks the name
    literal = pin_target("http://93.184.216.34/x", WebhookSettings(), resolve=later)
    assert literal == PinnedTarget("http://93.184.216.34/x", {}, {})

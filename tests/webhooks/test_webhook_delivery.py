"""Webhook delivery on the whole local stack, to a real HTTP receiver on loopback:
retries until accepted (exactly one accepted delivery, signature verified), a dead
receiver dead-lettered without slowing inference, and request-level webhooks. Batches
and requests are submitted through the gateway (the HTTP client, demo keys)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from batch_stack import Stack, wait_for
from tokenmill.config import load_settings
from tokenmill.ledger import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    shared_factory,
    transaction,
)
from tokenmill.workers.webhook_signing import verify
from tokenmill.workers.webhooks import webhook_id_for
from webhook_helpers import MAX_ATTEMPTS, TIMEOUT_S, Receiver

from tokenmill import Client
from tokenmill.errors import ValidationError
from tokenmill.wire import BatchStatus, ResultStatus


def batch_file(n: int, model: str = "sim") -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"w{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}).encode()
        + b"\n"
        for i in range(n)
    )


def delivery(webhook_id: str) -> tuple[DeliveryStatus, int, list[int | None]] | None:
    with transaction(shared_factory(load_settings().ledger_url)) as s:
        d = s.query(WebhookDelivery).filter_by(webhook_id=webhook_id).one_or_none()
        if d is None:
            return None
        codes = [a.status_code for a in s.query(WebhookAttempt).filter_by(delivery_id=d.id).order_by(WebhookAttempt.attempt)]
        return d.status, d.attempts, codes


def secret(tenant: str) -> str:
    return load_settings().tenants[tenant].webhook_secret.get_secret_value()


def test_flaky_receiver_gets_exactly_one_accepted_signed_delivery(client_env: Stack, receiver: Receiver) -> None:
    path = f"/flaky/3/{uuid.uuid4().hex}"
    with Client(tenant="alpha") as c:
        b = c.batches.create(batch_file(3), webhook=receiver.url + path)
        done = c.batches.wait(b.id, timeout=30)
    assert done.status is BatchStatus.completed
    wid = webhook_id_for(f"{b.id}:completed")
    wait_for("delivered", lambda: (delivery(wid) or (None,))[0] is DeliveryStatus.delivered, timeout=30)
    # Delivered is final: no attempt is made after it, and each POST is logged before it is answered.
    calls = receiver.on(path)
    assert [r.answered for r in calls] == [500, 500, 500, 200]
    assert {r.headers["webhook-id"] for r in calls} == {wid}
    accepted = calls[-1]
    verify(secret("alpha"), accepted.headers, accepted.body)
    payload = accepted.json()
    assert payload["type"] == "batch.completed"
    assert payload["data"]["id"] == b.id and payload["data"]["status"] == "completed"
    assert payload["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    # OpenAI's batch object with file ids: no server path, tenant name or webhook URL.
    assert payload["data"]["output_file_id"].startswith("file-")
    assert not {"output_file", "error_file", "input_file", "tenant", "webhook_url"} & set(payload["data"])
    assert delivery(wid) == (DeliveryStatus.delivered, 4, [500, 500, 500, 200])


def test_dead_receiver_is_dead_lettered_and_workers_are_unaffected(client_env: Stack, receiver: Receiver) -> None:
    path = f"/hang/{uuid.uuid4().hex}"
    with Client(tenant="beta") as c:
        b = c.batches.create(batch_file(2), webhook=receiver.url + path)
        c.batches.wait(b.id, timeout=30)
        wid = webhook_id_for(f"{b.id}:completed")
        wait_for("first attempt hanging", lambda: receiver.on(path), timeout=20)
        # While the receiver hangs, inference goes on at full speed.
        started = time.monotonic()
        handles = c.submit_many([c.build("sim", prompt=f"p{i}", max_tokens=3) for i in range(100)])
        results = [c.result(h, timeout=30) for h in handles]
        assert all(r.status is ResultStatus.succeeded for r in results)
        assert time.monotonic() - started < 10
    wait_for("dead-lettered", lambda: (delivery(wid) or (None,))[0] is DeliveryStatus.dead,
             timeout=MAX_ATTEMPTS * (TIMEOUT_S + 2) + 20)
    _, attempts, codes = delivery(wid)
    assert attempts == MAX_ATTEMPTS and codes == [None] * MAX_ATTEMPTS
    assert len(receiver.on(path)) == MAX_ATTEMPTS
    failed = client_env.cli("webhooks", "--failed", "--tenant", "beta", "--json")
    assert failed.returncode == 0, failed.stderr
    listed = {d["webhook_id"]: d for d in json.loads(failed.stdout)}
    assert listed[wid]["status"] == "dead" and listed[wid]["attempts"] == MAX_ATTEMPTS
    assert "Timeout" in listed[wid]["last_error"]
    others = json.loads(client_env.cli("webhooks", "--failed", "--tenant", "alpha", "--json").stdout)
    assert wid not in {d["webhook_id"] for d in others}


def test_request_webhook_on_completion(client_env: Stack, receiver: Receiver) -> None:
    path = f"/ok/{uuid.uuid4().hex}"
    with Client(tenant="gamma") as c:
        h = c.submit("sim", prompt="tell me", max_tokens=4, webhook=receiver.url + path)
        assert c.result(h, timeout=30).status is ResultStatus.succeeded
        # The gateway applies the target policy: a metadata address is refused, naming the field.
        for submit in (lambda url: c.submit("sim", prompt="x", webhook=url),
                       lambda url: c.batches.create(batch_file(1), webhook=url)):
            with pytest.raises(ValidationError) as exc:
                submit("http://169.254.169.254/latest/meta-data")
            assert exc.value.field == "webhook"
    wid = webhook_id_for(f"{h.request_id}:request.completed")
    wait_for("request webhook delivered", lambda: (delivery(wid) or (None,))[0] is DeliveryStatus.delivered, timeout=30)
    [got] = receiver.on(path)
    assert got.webhook_id == wid
    verify(secret("gamma"), got.headers, got.body)
    payload = got.json()
    assert payload["type"] == "request.completed"
    assert payload["data"]["id"] == h.request_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["usage"]["completion_tokens"] == 4

"""SLA records (written by the ledger sink), webhook deliveries, the tenant mirror, the package's API and commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from ledger_events import event
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger import (
    DeliveryStatus,
    SlaRecord,
    TenantRow,
    WebhookAttempt,
    WebhookDelivery,
    enqueue_webhook,
    record_webhook_attempt,
    sync_tenants,
    transaction,
)
from tokenmill.ledger.streams import LedgerSink

from tokenmill import ledger
from tokenmill.errors import LedgerError, NotFound

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_sla_records_once_per_finished_request(
    sink: LedgerSink, sessions: sessionmaker[Session]
) -> None:
    first = event("req_1", T0, tenant="alpha", ttft_s=0.08, tpot_s=0.0095, completion_tokens=21)
    slow = event("req_1", T0, tenant="alpha", ttft_s=4.0, completion_tokens=21)  # would miss
    unknown = event("req_2", T0, tenant="nobody")  # no tier: billed, not measured
    assert len(sink.write([first, unknown]).new) == 2
    assert sink.write([slow]).duplicates == 1
    with transaction(sessions) as s:
        row = s.scalars(select(SlaRecord)).one()
    assert (row.request_id, row.tenant, row.tier, row.sla_class, row.met) == (
        "req_1", "alpha", "gold", "gold", True)  # fmt: skip
    assert row.ttft_ms == pytest.approx(80.0) and row.tpot_ms == pytest.approx(9.5)
    assert row.e2e_ms == pytest.approx(80.0 + 20 * 9.5) and row.finished_at == T0


def test_webhook_delivery_lifecycle(sessions: sessionmaker[Session]) -> None:
    hook = {
        "webhook_id": "msg_1", "tenant": "alpha", "url": "https://hooks.example/x",
        "event_type": "batch.completed", "payload": {"id": "batch_1", "n": [1, 2]}, "at": T0,
    }  # fmt: skip
    with transaction(sessions) as s:
        assert enqueue_webhook(s, **hook) is True
        assert enqueue_webhook(s, **hook) is False
    retry_at = T0 + timedelta(seconds=2)
    with transaction(sessions) as s:
        assert record_webhook_attempt(
            s, "msg_1", 1, status=DeliveryStatus.pending, status_code=503, error="unavailable",
            duration_ms=12.0, at=T0, next_attempt_at=retry_at,
        )  # fmt: skip
        assert not record_webhook_attempt(
            s, "msg_1", 1, status=DeliveryStatus.dead, status_code=503, error="replayed",
            duration_ms=12.0, at=T0,
        )  # fmt: skip
        d = s.scalars(select(WebhookDelivery)).one()
        assert (d.status, d.attempts, d.next_attempt_at, d.last_status_code) == (
            DeliveryStatus.pending, 1, retry_at, 503,
        )  # fmt: skip
    with transaction(sessions) as s:
        assert record_webhook_attempt(
            s, "msg_1", 2, status=DeliveryStatus.delivered, status_code=204, error=None,
            duration_ms=8.0, at=retry_at,
        )  # fmt: skip
        # A late attempt after delivery is kept as history but changes nothing.
        assert record_webhook_attempt(
            s, "msg_1", 3, status=DeliveryStatus.dead, status_code=500, error="late",
            duration_ms=8.0, at=retry_at,
        )  # fmt: skip
    with transaction(sessions) as s:
        d = s.scalars(select(WebhookDelivery)).one()
        assert (d.status, d.attempts, d.delivered_at, d.next_attempt_at) == (
            DeliveryStatus.delivered, 2, retry_at, None,
        )  # fmt: skip
        assert d.payload == {"id": "batch_1", "n": [1, 2]}
        assert s.scalars(select(WebhookAttempt.attempt).order_by("attempt")).all() == [1, 2, 3]
        with pytest.raises(NotFound):
            record_webhook_attempt(
                s, "msg_missing", 1, status=DeliveryStatus.dead, status_code=None,
                error="x", duration_ms=1.0, at=T0,
            )  # fmt: skip
        with pytest.raises(LedgerError, match="next_attempt_at"):
            record_webhook_attempt(
                s, "msg_1", 4, status=DeliveryStatus.pending, status_code=None,
                error="x", duration_ms=1.0, at=T0,
            )  # fmt: skip


def test_tenant_mirror_follows_the_config(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    settings = Settings()
    with transaction(sessions) as s:
        sync_tenants(s, settings)
        sync_tenants(s, settings)
    with transaction(sessions) as s:
        rows = {r.name: (r.tier, r.weight) for r in s.scalars(select(TenantRow))}
    assert rows == {"alpha": ("gold", 4.0), "beta": ("silver", 2.0), "gamma": ("bronze", 1.0)}


def test_exported_names_resolve() -> None:
    assert sorted(ledger.__all__) == sorted(set(ledger.__all__))
    for name in ledger.__all__:
        assert getattr(ledger, name) is not None, name

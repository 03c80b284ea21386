"""Webhook messages: recorded in the ledger in the transaction of the change they report,
with a message id (``webhook-id``) derived from the event, so recording one twice
records it once and every retry carries the same id."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from ..ledger import enqueue_webhook

__all__ = ["enqueue_event", "webhook_id_for"]


def webhook_id_for(key: str) -> str:
    """The stable message id of an event (``key``: e.g. ``batch_…:completed``)."""
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def enqueue_event(
    session: Session, *, key: str, tenant: str, url: str, event_type: str, data: dict[str, Any]
) -> bool:
    """Record a webhook message in the caller's transaction; True if it is new."""
    now = datetime.now(UTC)
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    return enqueue_webhook(
        session, webhook_id=webhook_id_for(key), tenant=tenant, url=url,
        event_type=event_type, payload=payload, at=now,
    )

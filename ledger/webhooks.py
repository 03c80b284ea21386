"""Webhook deliveries and their attempts, keyed so that retries and replays dedupe.

A delivery is keyed by its Standard Webhooks message id (``webhook-id``), an attempt
by (delivery, attempt number). Delivery policy (backoff, when to give up) belongs to
the webhook sender; this module only records what it decided.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmill.errors import LedgerError, NotFound

from .errors import translated
from .models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from .types import utc, utcnow
from .upsert import insert_ignore


@translated
def enqueue_webhook(
    session: Session,
    *,
    webhook_id: str,
    tenant: str,
    url: str,
    event_type: str,
    payload: dict[str, Any],
    at: datetime | None = None,
) -> bool:
    """Record a webhook message to deliver, once per ``webhook_id``.

    Raises:
        LedgerError: the database refused the write.

    Returns:
        True if the delivery is new (and pending, due at ``at``).
    """
    when = utc(at) if at is not None else utcnow()
    return insert_ignore(
        session,
        WebhookDelivery,
        {
            "webhook_id": webhook_id,
            "tenant": tenant,
            "url": url,
            "event_type": event_type,
            "payload": payload,
            "status": DeliveryStatus.pending,
            "attempts": 0,
            "next_attempt_at": when,
            "created_at": when,
        },
        ["webhook_id"],
    )


@translated
def record_webhook_attempt(
    session: Session,
    webhook_id: str,
    attempt: int,
    *,
    status: DeliveryStatus,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
    at: datetime,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Record one delivery attempt and the delivery's resulting status, once per attempt.

    Parameters:
        webhook_id: the delivery's message id.
        attempt: 1 for the first try.
        status: ``pending`` (retry at ``next_attempt_at``), ``delivered`` or ``dead``.
        status_code, error: what the receiver answered, or why it could not be reached.
        duration_ms: how long the attempt took.
        at: when the attempt was made.

    Raises:
        NotFound: no such delivery.
        LedgerError: ``pending`` without ``next_attempt_at``.

    Returns:
        True if the attempt is new; a replayed attempt changes nothing.
    """
    status = DeliveryStatus(status)
    if status is DeliveryStatus.pending and next_attempt_at is None:
        raise LedgerError(f"webhook {webhook_id}: a pending delivery needs next_attempt_at")
    delivery = session.execute(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if delivery is None:
        raise NotFound(f"webhook {webhook_id} not found")
    new = insert_ignore(
        session,
        WebhookAttempt,
        {
            "delivery_id": delivery.id,
            "attempt": attempt,
            "status_code": status_code,
            "error": error,
            "duration_ms": duration_ms,
            "at": utc(at),
        },
        ["delivery_id", "attempt"],
    )
    # Final states stay final: a late attempt of a delivered message changes nothing.
    if new and delivery.status is DeliveryStatus.pending:
        delivery.attempts = max(delivery.attempts, attempt)
        delivery.status = status
        delivery.last_status_code = status_code
        delivery.last_error = error
        delivery.next_attempt_at = None
        if status is DeliveryStatus.pending and next_attempt_at is not None:
            delivery.next_attempt_at = utc(next_attempt_at)
        if status is DeliveryStatus.delivered:
            delivery.delivered_at = utc(at)
        session.flush()
    return new


@translated
def get_webhook(session: Session, webhook_id: str) -> WebhookDelivery:
    """A delivery by its message id (services only: not tenant-scoped).

    Raises:
        NotFound: no such delivery.
    """
    delivery = session.execute(
        select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    ).scalar_one_or_none()
    if delivery is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return delivery


@translated
def lease_due_webhooks(
    session: Session, now: datetime, *, lease_s: float, limit: int = 100
) -> list[tuple[str, int]]:
    """Take pending deliveries that are due: push their ``next_attempt_at`` ``lease_s``
    into the future (so no other sender takes them meanwhile) and return
    ``(webhook_id, attempts so far)`` of each. A sender that dies before recording its
    attempt loses nothing: the delivery falls due again when the lease ends."""
    now = utc(now)
    query = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.status == DeliveryStatus.pending,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    due = list(session.execute(query).scalars())
    for delivery in due:
        delivery.next_attempt_at = now + timedelta(seconds=lease_s)
    session.flush()
    return [(d.webhook_id, d.attempts) for d in due]


@translated
def list_webhooks(
    session: Session,
    *,
    tenant: str | None = None,
    status: DeliveryStatus | None = None,
    limit: int = 50,
) -> list[WebhookDelivery]:
    """Deliveries, newest first, optionally one tenant's and in one status."""
    query = select(WebhookDelivery)
    if tenant is not None:
        query = query.where(WebhookDelivery.tenant == tenant)
    if status is not None:
        query = query.where(WebhookDelivery.status == DeliveryStatus(status))
    newest = query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
    return list(session.execute(newest.limit(limit)).scalars())

"""One delivery attempt: under a Redis lock per message, only if the ledger still waits
for that attempt, signed, posted under a total deadline, and recorded.

Why the timings are what they are (``timeout_s`` is the configured attempt deadline):

* the lock lives :func:`lock_ttl_s` = ``timeout_s`` + :data:`LOCK_MARGIN_S`, strictly
  longer than the POST, whose deadline is cut to end :data:`RECORD_RESERVE_S` before
  the lock does (measured from just before the lock was taken, so Redis's clock can
  only be later). So a second copy of the task cannot take the lock and post while
  this attempt's POST is in flight, and finds the attempt recorded once it can;
* the dispatcher's lease is :func:`lease_s`: the lock's life plus one deadline for the
  task's wait in the queue, so a delivery whose sender died is sent again only after
  any attempt of the dead sender is over and its lock has expired.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from redis.exceptions import LockNotOwnedError
from sqlalchemy.orm import Session, sessionmaker

from ..config.models import WebhookSettings
from ..config.settings import Settings
from ..ledger import (
    DeliveryStatus,
    get_webhook,
    record_webhook_attempt,
    shared_factory,
    transaction,
)
from ..logs import get_logger
from . import keys
from .webhook_post import Outcome, Poster
from .webhook_signing import signed_headers

__all__ = ["Deliverer", "backoff_s", "lease_s", "lock_name", "lock_ttl_s"]

log = get_logger(__name__)

USER_AGENT = "tokenmill-webhooks/1"
#: longest pause between two attempts
BACKOFF_CAP_S = 3600.0
#: how much longer than the POST deadline the lock lives: the ledger read before the
#: POST and the record after it
LOCK_MARGIN_S = 10.0
#: the part of the lock's life kept for recording the attempt once the POST has ended
RECORD_RESERVE_S = 5.0


def lock_name(webhook_id: str) -> str:
    """The Redis key of a message's attempt lock."""
    return keys.PREFIX + "webhook-lock:" + webhook_id


def lock_ttl_s(cfg: WebhookSettings) -> float:
    return cfg.timeout_s + LOCK_MARGIN_S


def lease_s(cfg: WebhookSettings) -> float:
    """How far the dispatcher pushes a delivery's due time when it sends it."""
    return lock_ttl_s(cfg) + cfg.timeout_s


def backoff_s(attempt: int, base_s: float, *, cap_s: float = BACKOFF_CAP_S, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff after failed attempt ``attempt`` (1-based)."""
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 60))
    return (rng or random).uniform(0, ceiling)


@dataclass
class Deliverer:
    """Makes attempts; shared by the webhook worker's task threads."""

    settings: Settings
    factory: sessionmaker[Session]
    redis: redis.Redis
    poster: Poster

    @classmethod
    def create(cls, settings: Settings, redis_url: str) -> Deliverer:
        return cls(settings=settings, factory=shared_factory(settings.ledger_url),
                   redis=redis.Redis.from_url(redis_url), poster=Poster(settings.webhooks))

    def deliver(self, webhook_id: str, attempt: int) -> str | None:
        """Make attempt ``attempt`` of a delivery; returns the delivery's status after
        it, or None when this copy of the task had nothing to do."""
        cfg = self.settings.webhooks
        ttl = lock_ttl_s(cfg)
        taken_at = time.monotonic()
        lock = self.redis.lock(lock_name(webhook_id), timeout=ttl, blocking=False)
        if not lock.acquire():
            return None  # another copy is attempting it right now
        try:
            with transaction(self.factory) as session:
                d = get_webhook(session, webhook_id)
                status, attempts, url, tenant, payload = d.status, d.attempts, d.url, d.tenant, d.payload
            if status is not DeliveryStatus.pending or attempts + 1 != attempt:
                return None
            deadline_s = min(cfg.timeout_s, taken_at + ttl - RECORD_RESERVE_S - time.monotonic())
            if deadline_s <= 0:  # the ledger read took the whole margin: the lease retries it
                log.warning("webhook attempt skipped: no time left on its lock", webhook_id=webhook_id)
                return None
            out = self._post(webhook_id, url, tenant, payload, deadline_s)
            now = datetime.now(UTC)
            next_at = None
            if out.accepted:
                new = DeliveryStatus.delivered
            elif out.permanent or attempt >= cfg.max_attempts:
                new = DeliveryStatus.dead
            else:
                new = DeliveryStatus.pending
                next_at = now + timedelta(seconds=backoff_s(attempt, cfg.backoff_base_s))
            with transaction(self.factory) as session:
                record_webhook_attempt(
                    session, webhook_id, attempt, status=new, status_code=out.status_code, error=out.error,
                    duration_ms=out.duration_ms, at=now, next_attempt_at=next_at,
                )
            log.info("webhook attempt", webhook_id=webhook_id, attempt=attempt, status=new.value,
                     status_code=out.status_code, error=out.error, duration_ms=round(out.duration_ms, 1))
            return new.value
        finally:
            try:
                lock.release()
            except LockNotOwnedError:  # only a ledger slower than RECORD_RESERVE_S gets here
                log.error("webhook lock expired before its attempt was recorded", webhook_id=webhook_id)

    def _post(self, webhook_id: str, url: str, tenant: str, payload: dict[str, Any], deadline_s: float) -> Outcome:
        t = self.settings.tenants.get(tenant)
        if t is None or t.webhook_secret is None:
            return Outcome(None, f"tenant {tenant!r} has no webhook_secret configured", True, 0.0)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = signed_headers(t.webhook_secret.get_secret_value(), webhook_id, body)
        headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
        return self.poster.post(url, headers, body, deadline_s=deadline_s)

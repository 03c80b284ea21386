"""Signing and verifying webhooks per the Standard Webhooks convention.

A message carries three headers:

* ``webhook-id``: the message id, the same on every retry (receivers dedupe on it);
* ``webhook-timestamp``: integer epoch seconds of this attempt;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` over ``{id}.{timestamp}.{body}``,
  keyed with the tenant's secret (``whsec_<base64 key>``; the part after ``whsec_`` is
  base64-decoded). Several space-separated signatures may be present (key rotation).

Only the standard library is used (the convention is a few lines of HMAC).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from ..errors import ValidationError

__all__ = [
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "secret_key",
    "sign",
    "signed_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
#: receivers refuse messages whose timestamp is further than this from their clock
TOLERANCE_S = 5 * 60


class WebhookVerificationError(ValidationError):
    """A webhook's signature or timestamp does not check out."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (a bare base64 key is accepted too).

    Raises:
        ValidationError: not base64.
    """
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise ValidationError("webhook_secret: must be whsec_ followed by base64", field="webhook_secret") from exc


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    """Check a received webhook (what a receiver does).

    Parameters:
        headers: the request headers (names in any case).

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is too far from
            ``now``, or no ``v1`` signature matches.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lower["webhook-id"]
        ts_text = lower["webhook-timestamp"]
        signatures = lower["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        ts = int(ts_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp: not an integer") from None
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp: too old or too new")
    expected = sign(secret, msg_id, ts, body).encode()
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return
    raise WebhookVerificationError("webhook-signature: no matching signature")

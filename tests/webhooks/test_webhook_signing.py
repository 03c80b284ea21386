"""Standard Webhooks signing and the backoff (no services needed; the target policy is
test_webhook_targets.py's)."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime

import pytest
from tokenmill.workers.webhook_attempt import backoff_s
from tokenmill.workers.webhook_events import webhook_id_for
from tokenmill.workers.webhook_signing import WebhookVerificationError, sign, signed_headers, verify

# The Standard Webhooks specification's published test vector.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TS = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_published_vector() -> None:
    assert sign(SECRET, MSG_ID, TS, BODY) == SIGNATURE
    headers = signed_headers(SECRET, MSG_ID, BODY, timestamp=TS)
    assert headers == {"webhook-id": MSG_ID, "webhook-timestamp": str(TS), "webhook-signature": SIGNATURE}
    verify(SECRET, headers, BODY, now=TS + 10)


def official_library():
    """The Standard Webhooks reference library (``standardwebhooks``, in the dev extra):
    what receivers are told to verify with. Missing: a skip locally, a failure in CI."""
    try:
        import standardwebhooks
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("standardwebhooks is not installed (the dev extra has it)")
    return standardwebhooks


def test_the_official_library_verifies_what_we_sign() -> None:
    lib = official_library()
    hook = lib.Webhook(SECRET)
    assert hook.sign(MSG_ID, datetime.fromtimestamp(TS, UTC), BODY.decode()) == SIGNATURE
    body = b'{"type":"batch.completed","data":{"id":"batch_1","note":"caf\xc3\xa9"}}'
    headers = signed_headers(SECRET, MSG_ID, body)  # now: within the library's tolerance
    assert hook.verify(body, headers) == {"type": "batch.completed", "data": {"id": "batch_1", "note": "caf\u00e9"}}
    with pytest.raises(lib.WebhookVerificationError):
        hook.verify(body + b" ", headers)
    with pytest.raises(lib.WebhookVerificationError):
        lib.Webhook("whsec_" + "QUJD" * 8).verify(body, headers)


def test_verify_refuses_tampering_old_messages_and_missing_headers() -> None:
    headers = signed_headers(SECRET, MSG_ID, BODY, timestamp=TS)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SECRET, headers, BODY + b" ", now=TS)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SECRET, {**headers, "webhook-id": "msg_other"}, BODY, now=TS)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify("whsec_" + "QUJD" * 8, headers, BODY, now=TS)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, BODY, now=TS + 3600)
    with pytest.raises(WebhookVerificationError, match="missing header webhook-signature"):
        verify(SECRET, {"webhook-id": MSG_ID, "webhook-timestamp": str(TS)}, BODY, now=TS)
    # Several signatures (key rotation): any one matching is enough; header names in any case.
    rotated = {"Webhook-Id": MSG_ID, "Webhook-Timestamp": str(TS), "Webhook-Signature": f"v1,bm9wZQ== {SIGNATURE}"}
    verify(SECRET, rotated, BODY, now=TS)


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        draws = [backoff_s(attempt, 0.5, cap_s=60.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # full jitter spreads over the whole range


def test_webhook_ids_are_stable_per_event() -> None:
    assert webhook_id_for("batch_1:completed") == webhook_id_for("batch_1:completed")
    assert webhook_id_for("batch_1:completed") != webhook_id_for("batch_1:cancelled")
    assert webhook_id_for("x").startswith("msg_")

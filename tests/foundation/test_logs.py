"""Secrets never reach the logs."""

from __future__ import annotations

from tokenmill.logs import MASK, _redact, mask_url


def test_url_passwords_are_masked() -> None:
    assert mask_url("postgresql://tm:hunter2@127.0.0.1:5432/tm") == f"postgresql://tm:{MASK}@127.0.0.1:5432/tm"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_secret_keys_are_redacted() -> None:
    event = {"event": "x", "webhook_secret": "whsec_abc", "api_key": "tm-1", "url": "redis://:pw@h:1/0", "n": 3}
    out = _redact(None, "info", dict(event))
    assert out["webhook_secret"] == MASK and out["api_key"] == MASK
    assert "pw" not in out["url"] and out["n"] == 3

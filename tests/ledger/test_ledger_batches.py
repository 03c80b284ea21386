"""Batches: round trip through the wire model, updates, and tenant isolation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import get_batch, list_batches, transaction, upsert_batch

from tokenmill.errors import LedgerError, NotFound
from tokenmill.wire import Batch, BatchStatus, Endpoint, RequestCounts

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()


def _batch(batch_id: str = "batch_1", tenant: str = "alpha", **kw: object) -> Batch:
    fields: dict[str, object] = {
        "id": batch_id, "tenant": tenant, "endpoint": Endpoint.chat_completions,
        "status": BatchStatus.validating, "input_file": f"/data/{batch_id}.jsonl",
        "created_at": T0, "expires_at": T0 + 86400, "webhook_url": "https://hooks.example/x",
        "metadata": {"project": "p1"},
    }  # fmt: skip
    fields.update(kw)
    return Batch(**fields)  # type: ignore[arg-type]


def test_round_trip_and_update(sessions: sessionmaker[Session]) -> None:
    batch = _batch()
    with transaction(sessions) as s:
        assert upsert_batch(s, batch) is True
    with transaction(sessions) as s:
        assert get_batch(s, "alpha", "batch_1") == batch
    done = batch.model_copy(
        update={
            "status": BatchStatus.completed,
            "in_progress_at": T0 + 1.5,
            "finalizing_at": T0 + 60.25,
            "completed_at": T0 + 61.125,
            "output_file": "/data/out.jsonl",
            "error_file": "/data/err.jsonl",
            "request_counts": RequestCounts(total=10, completed=9, failed=1),
        }
    )
    with transaction(sessions) as s:
        assert upsert_batch(s, done) is False
        assert upsert_batch(s, done) is False  # replayed snapshot: no-op
    with transaction(sessions) as s:
        assert get_batch(s, "alpha", "batch_1") == done


def test_terminal_status_is_final(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        upsert_batch(s, _batch(status=BatchStatus.cancelled, cancelled_at=T0 + 5))
    with pytest.raises(LedgerError, match="cancelled"), transaction(sessions) as s:
        upsert_batch(s, _batch(status=BatchStatus.in_progress))


def test_a_tenant_never_sees_another_tenants_batch(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        upsert_batch(s, _batch("batch_a", "alpha"))
        upsert_batch(s, _batch("batch_b", "beta"))
    with transaction(sessions) as s:
        assert get_batch(s, "beta", "batch_b").tenant == "beta"
        with pytest.raises(NotFound, match="batch_a"):
            get_batch(s, "beta", "batch_a")
        assert [b.id for b in list_batches(s, "beta")] == ["batch_b"]
        with pytest.raises(NotFound):
            list_batches(s, "beta", after="batch_a")
    # Nor overwrite it by reusing its id.
    with pytest.raises(NotFound), transaction(sessions) as s:
        upsert_batch(s, _batch("batch_a", "beta", status=BatchStatus.cancelled))
    with transaction(sessions) as s:
        assert get_batch(s, "alpha", "batch_a").status is BatchStatus.validating


def test_listing_pages_newest_first(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        for i in range(5):
            upsert_batch(s, _batch(f"batch_{i}", created_at=T0 + i))
        upsert_batch(s, _batch("batch_x", created_at=T0 + 4))  # same time as batch_4
    with transaction(sessions) as s:
        first = list_batches(s, "alpha", limit=3)
        assert [b.id for b in first] == ["batch_x", "batch_4", "batch_3"]
        rest = list_batches(s, "alpha", limit=10, after=first[-1].id)
        assert [b.id for b in rest] == ["batch_2", "batch_1", "batch_0"]
        assert [b.id for b in list_batches(s, "alpha", limit=1, after="batch_x")] == ["batch_4"]
        assert timedelta(seconds=first[0].created_at - T0) == timedelta(seconds=4)

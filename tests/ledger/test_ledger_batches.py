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


def test_batches_are_counted_against_their_completion_windows(
    sessions: sessionmaker[Session],
) -> None:
    from tokenmill.ledger.reports import sla_report
    from tokenmill.ledger.sla import batch_windows

    end = T0 + 100  # every batch below expires then
    with transaction(sessions) as s:
        for bid, tenant, status, at in (
            ("b_in", "alpha", BatchStatus.completed, T0 + 50),
            ("b_edge", "alpha", BatchStatus.completed, end),  # at the window's end: met
            ("b_late", "alpha", BatchStatus.completed, end + 1),  # finalized after it
            ("b_exp", "alpha", BatchStatus.expired, end),
            ("b_cancel", "alpha", BatchStatus.cancelled, T0 + 10),  # the tenant's choice
            ("b_beta", "beta", BatchStatus.failed, T0 + 20),
            ("b_old", "beta", BatchStatus.completed, T0 - 3600),  # ended before the span
            ("b_run", "beta", BatchStatus.in_progress, None),
        ):
            times = {} if at is None else {f"{status.value}_at": at}
            upsert_batch(s, _batch(bid, tenant, status=status, expires_at=end, **times))
    since = datetime.fromtimestamp(T0 - 60, UTC)
    with transaction(sessions) as s:
        got = {w.tenant: w for w in batch_windows(s, since)}
        assert (got["alpha"].ended, got["alpha"].within_window, got["alpha"].expired) == (4, 2, 1)
        assert got["alpha"].rate == 0.5
        assert (got["beta"].ended, got["beta"].within_window) == (1, 0)
        assert [w.tenant for w in batch_windows(s, since, tenant="beta")] == ["beta"]
        now = datetime.fromtimestamp(T0 + 200, UTC)
        report = sla_report(s, since, targets={}, now=now, at_risk={"gamma": 2, "beta": 1})
        own = sla_report(s, since, targets={}, now=now, at_risk={"gamma": 2}, tenant="beta")
    assert report["tenants"]["alpha"]["batches"]["within_window_rate"] == 0.5
    assert report["tenants"]["beta"]["batches"]["ended"] == 1
    assert report["tenants"]["beta"]["attainment"] is None  # no request finished in the span
    # batches at risk now: every tenant's for the operator, only its own for a tenant
    assert [report["tenants"][t]["batches"]["at_risk_now"] for t in ("alpha", "beta", "gamma")] == [
        0,
        1,
        2,
    ]
    assert set(own["tenants"]) == {"beta"} and own["tenants"]["beta"]["batches"]["at_risk_now"] == 0


def test_at_risk_batches_are_counted_per_tenant_from_the_published_forecasts() -> None:
    import json

    from tokenmill.scheduler.deadlines import at_risk_by_tenant

    def fc(tenant: str, at_risk: bool) -> bytes:
        return json.dumps({"tenant": tenant, "at_risk": at_risk, "deadline": 1.0}).encode()

    published = {
        b"b1": fc("a", True),
        b"b2": fc("a", True),
        b"b3": fc("b", False),
        b"b4": fc("c", True),
    }
    assert at_risk_by_tenant(published) == {"a": 2, "c": 1}


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_every_endpoint_is_a_batch_endpoint(sessions: sessionmaker[Session], endpoint: Endpoint) -> None:
    # The migrated schema's CHECK constraint takes each endpoint the wire names (0006).
    with transaction(sessions) as s:
        upsert_batch(s, _batch(f"batch_{endpoint.name}", endpoint=endpoint))
    with transaction(sessions) as s:
        assert get_batch(s, "alpha", f"batch_{endpoint.name}").endpoint is endpoint

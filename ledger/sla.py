"""SLA measurements, one record per finished request."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from .errors import translated
from .models import SlaRecord
from .types import utc
from .upsert import insert_ignore


@translated
def record_sla(
    session: Session,
    *,
    request_id: str,
    tenant: str,
    tier: str,
    model: str,
    sla_class: str,
    queue_ms: float | None,
    ttft_ms: float | None,
    tpot_ms: float | None,
    e2e_ms: float | None,
    met: bool,
    finished_at: datetime,
) -> bool:
    """Record a request's SLA figures once; a replay is a no-op.

    Parameters:
        session: the caller's transaction.
        request_id: the request; at most one record per id.
        tenant, tier, model, sla_class: what the figures are measured against.
        queue_ms, ttft_ms, tpot_ms, e2e_ms: the measurements (None where not applicable,
            e.g. no first token on a failure).
        met: whether every target of the SLA class was met.
        finished_at: when the request finished.

    Raises:
        LedgerError: the database refused the write.

    Returns:
        True if the record is new.
    """
    return insert_ignore(
        session,
        SlaRecord,
        {
            "request_id": request_id,
            "tenant": tenant,
            "tier": tier,
            "model": model,
            "sla_class": sla_class,
            "queue_ms": queue_ms,
            "ttft_ms": ttft_ms,
            "tpot_ms": tpot_ms,
            "e2e_ms": e2e_ms,
            "met": met,
            "finished_at": utc(finished_at),
        },
        ["request_id"],
    )

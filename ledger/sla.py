"""SLA measurements, one record per finished request (written by the ledger sink,
:mod:`.streams.sink`): the report queries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from ..wire import BatchStatus, Priority
from .errors import translated
from .fairness import Served, percentile
from .models import BatchRow, SlaRecord, UsageRecord
from .types import utc

# -- reports -------------------------------------------------------------------------


#: the figures an SLA report summarizes, in order
FIGURES = ("queue_ms", "ttft_ms", "tpot_ms", "e2e_ms")
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class SlaGroup:
    """SLA figures of one tenant × tier × model × priority class over a span of time."""

    tenant: str
    tier: str
    model: str
    sla_class: str
    #: the requests' priority class (batch requests have no latency targets: see
    #: :mod:`.streams.measure`)
    priority: str
    requests: int
    #: requests that met every target of their class (goodput)
    met: int
    #: figure name → (p50, p95, p99) in ms; None where no request defines the figure
    quantiles: dict[str, tuple[float | None, float | None, float | None]]
    #: target name (ttft, tpot, e2e) → requests meeting it (an undefined figure meets it)
    target_met: dict[str, int]

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0


@translated
def sla_groups(
    session: Session,
    since: datetime,
    until: datetime | None = None,
    *,
    tenant: str | None = None,
    targets: Mapping[str, Any] | None = None,
) -> list[SlaGroup]:
    """Per tenant × tier × model × priority class: p50/p95/p99 of queue wait, TTFT, TPOT
    and end-to-end latency, and how many requests met their targets, over
    ``since <= finished_at < until``.

    Parameters:
        targets: SLA class name → its targets (objects with ``ttft_ms``, ``tpot_ms``,
            ``e2e_ms``), for per-target counts; a class not given counts as met.
    """
    query = select(
        SlaRecord.tenant, SlaRecord.tier, SlaRecord.model, SlaRecord.sla_class,
        func.coalesce(UsageRecord.priority, Priority.standard),
        SlaRecord.queue_ms, SlaRecord.ttft_ms, SlaRecord.tpot_ms, SlaRecord.e2e_ms, SlaRecord.met,
    ).outerjoin(UsageRecord, UsageRecord.request_id == SlaRecord.request_id).where(
        SlaRecord.finished_at >= utc(since))  # fmt: skip
    if until is not None:
        query = query.where(SlaRecord.finished_at < utc(until))
    if tenant is not None:
        query = query.where(SlaRecord.tenant == tenant)
    groups: dict[tuple[str, str, str, str, str], list[Any]] = {}
    for row in session.execute(query):
        priority = Priority(row[4]).value
        groups.setdefault((*row[:4], priority), []).append(row)  # type: ignore[arg-type]
    out = []
    for (ten, tier, model, cls, priority), rows in sorted(groups.items()):
        quantiles = {}
        for i, fig in enumerate(FIGURES):
            values = sorted(r[5 + i] for r in rows if r[5 + i] is not None)
            quantiles[fig] = tuple(percentile(values, q) for q in QUANTILES)
        target = None if priority == Priority.batch.value else (targets or {}).get(cls)
        target_met = {}
        for name, col in (("ttft", 6), ("tpot", 7), ("e2e", 8)):
            limit = getattr(target, f"{name}_ms", None)
            target_met[name] = sum(
                1 for r in rows if limit is None or r[col] is None or r[col] <= limit
            )
        out.append(SlaGroup(ten, tier, model, cls, priority, len(rows),
                            sum(1 for r in rows if r[9]), quantiles, target_met))  # type: ignore[arg-type]  # fmt: skip
    return out


@dataclass(frozen=True)
class Attainment:
    """A tenant's SLA attainment over a window (counts, for the gauges)."""

    tenant: str
    requests: int
    #: met every target (goodput)
    met: int
    #: target name (ttft, tpot, e2e) → requests meeting it
    target_met: dict[str, int]


@translated
def sla_attainment(
    session: Session, since: datetime, targets: Mapping[str, Any], until: datetime | None = None
) -> list[Attainment]:
    """Per tenant: requests, those meeting every target, and those meeting each target,
    over ``since <= finished_at < until`` (aggregated in the database: cheap enough to
    run every few seconds)."""
    totals: dict[str, list[int]] = {}
    per_target: dict[str, dict[str, int]] = {}
    for cls, target in sorted(targets.items()):
        cols = []
        for name in ("ttft", "tpot", "e2e"):
            col = getattr(SlaRecord, f"{name}_ms")
            ok = or_(col.is_(None), col <= float(getattr(target, f"{name}_ms")))
            cols.append(func.coalesce(func.sum(case((ok, 1), else_=0)), 0))
        query = select(
            SlaRecord.tenant, func.count(),
            func.coalesce(func.sum(case((SlaRecord.met, 1), else_=0)), 0), *cols,
        ).where(SlaRecord.sla_class == cls, SlaRecord.finished_at >= utc(since))  # fmt: skip
        if until is not None:
            query = query.where(SlaRecord.finished_at < utc(until))
        for tenant, n, met, ttft, tpot, e2e in session.execute(query.group_by(SlaRecord.tenant)):
            t = totals.setdefault(tenant, [0, 0])
            t[0] += int(n)
            t[1] += int(met)
            pt = per_target.setdefault(tenant, {"ttft": 0, "tpot": 0, "e2e": 0})
            pt["ttft"] += int(ttft)
            pt["tpot"] += int(tpot)
            pt["e2e"] += int(e2e)
    return [Attainment(t, n, met, per_target[t]) for t, (n, met) in sorted(totals.items())]


@translated
def served_requests(
    session: Session, since: datetime, until: datetime | None = None
) -> list[Served]:
    """The requests that finished in ``since <= finished_at < until`` with an SLA record
    (those of configured tenants), with their priority and tokens from the usage record:
    the input of :func:`.fairness.fairness`."""
    s, u = SlaRecord, UsageRecord
    query = (
        select(s.tenant, u.priority, s.model, s.finished_at, s.e2e_ms, s.queue_ms, s.ttft_ms,
               s.tpot_ms, u.prompt_tokens, u.completion_tokens, s.met)
        .join(u, u.request_id == s.request_id)
        .where(s.finished_at >= utc(since))
    )  # fmt: skip
    if until is not None:
        query = query.where(s.finished_at < utc(until))
    out = []
    for row in session.execute(query):
        tenant, prio, model, finished, e2e, queue, ttft, tpot, pt, ct, met = row
        if e2e is None:  # nullable in the schema, always written by the sink: no times
            continue
        out.append(Served(tenant, str(prio), model, finished.timestamp(), e2e / 1000.0,
                          _s(queue), _s(ttft), _s(tpot), pt, ct, bool(met)))  # fmt: skip
    return out


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


@dataclass(frozen=True, slots=True)
class BatchWindows:
    """A tenant's batches that ended in a span, against their completion windows."""

    tenant: str
    #: completed, expired or failed (a cancelled batch is the tenant's choice: not counted)
    ended: int
    #: completed no later than its window's end
    within_window: int
    expired: int

    @property
    def rate(self) -> float:
        return self.within_window / self.ended if self.ended else 1.0


@translated
def batch_windows(
    session: Session, since: datetime, until: datetime | None = None, *, tenant: str | None = None
) -> list[BatchWindows]:
    """Per tenant, the batches that ended in [since, until) and how many met their window."""
    ended_at = func.coalesce(BatchRow.completed_at, BatchRow.expired_at, BatchRow.failed_at)
    met = case(
        (
            (BatchRow.status == BatchStatus.completed) & (BatchRow.completed_at <= BatchRow.expires_at),
            1,
        ),
        else_=0,
    )
    expired = case((BatchRow.status == BatchStatus.expired, 1), else_=0)
    query = (
        select(BatchRow.tenant, func.count(), func.sum(met), func.sum(expired))
        .where(
            BatchRow.status.in_((BatchStatus.completed, BatchStatus.expired, BatchStatus.failed)),
            ended_at >= utc(since),
        )
        .group_by(BatchRow.tenant)
        .order_by(BatchRow.tenant)
    )
    if until is not None:
        query = query.where(ended_at < utc(until))
    if tenant is not None:
        query = query.where(BatchRow.tenant == tenant)
    return [BatchWindows(t, n, int(m or 0), int(e or 0)) for t, n, m, e in session.execute(query)]

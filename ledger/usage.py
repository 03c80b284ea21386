"""Metered usage: one record per request, rolled up per tenant, model and minute.

The ledger sink (:mod:`.streams.sink`) writes the records and adds to the roll-up
(``usage_minutes``) in the same transaction, only for records newly inserted, so a
replayed event changes neither: counts are exact under at-least-once delivery. This
module holds the roll-up's upsert and the queries that read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from .bulk import upsert_add
from .errors import translated
from .models import UsageMinute
from .types import utc


@dataclass(frozen=True)
class UsageTotals:
    """Usage of one model over a span of time."""

    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


#: the key and the counters of a ``usage_minutes`` row
MINUTE_KEYS = ("tenant", "model", "minute")
MINUTE_COUNTERS = ("requests", "input_tokens", "output_tokens")


def add_to_minutes(conn: Connection, sums: Mapping[tuple[str, str, Any], Sequence[int]]) -> None:
    """Add (requests, input tokens, output tokens) to per-minute roll-up rows, keyed by
    (tenant, model, driver-ready minute), in one statement, in key order (no deadlock
    between concurrent writers)."""
    rows = [(*key, *counts) for key, counts in sorted(sums.items())]
    upsert_add(conn, UsageMinute, MINUTE_KEYS, MINUTE_COUNTERS, rows)


@translated
def usage_minutes(
    session: Session,
    tenant: str,
    since: datetime,
    until: datetime | None = None,
    *,
    model: str | None = None,
) -> list[UsageMinute]:
    """A tenant's per-minute usage rows with ``since <= minute < until``, oldest first."""
    query = select(UsageMinute).where(UsageMinute.tenant == tenant, UsageMinute.minute >= since)
    if until is not None:
        query = query.where(UsageMinute.minute < until)
    if model is not None:
        query = query.where(UsageMinute.model == model)
    return list(session.execute(query.order_by(UsageMinute.minute, UsageMinute.model)).scalars())


@translated
def usage_totals(
    session: Session, tenant: str, since: datetime, until: datetime | None = None
) -> dict[str, UsageTotals]:
    """A tenant's usage per model over minute buckets with ``since <= minute < until``."""
    query = select(
        UsageMinute.model,
        func.sum(UsageMinute.requests),
        func.sum(UsageMinute.input_tokens),
        func.sum(UsageMinute.output_tokens),
    ).where(UsageMinute.tenant == tenant, UsageMinute.minute >= since)
    if until is not None:
        query = query.where(UsageMinute.minute < until)
    rows = session.execute(query.group_by(UsageMinute.model).order_by(UsageMinute.model))
    return {model: UsageTotals(int(r), int(i), int(o)) for model, r, i, o in rows}


@dataclass(frozen=True)
class UsageRow:
    """Usage of one tenant and model, in one minute window or over the whole span."""

    tenant: str
    model: str
    #: the minute window's start (UTC); None for a total over the span
    minute: datetime | None
    requests: int
    input_tokens: int
    output_tokens: int


@translated
def usage_rows(
    session: Session,
    since: datetime,
    until: datetime | None = None,
    *,
    tenant: str | None = None,
    per_minute: bool = False,
) -> list[UsageRow]:
    """Usage per tenant × model (× minute window if ``per_minute``) over minute windows
    with ``since <= minute < until``, ordered by tenant, model (and minute)."""
    keys = [UsageMinute.tenant, UsageMinute.model] + ([UsageMinute.minute] if per_minute else [])
    query = select(
        *keys,
        func.sum(UsageMinute.requests),
        func.sum(UsageMinute.input_tokens),
        func.sum(UsageMinute.output_tokens),
    ).where(UsageMinute.minute >= utc(since))
    if until is not None:
        query = query.where(UsageMinute.minute < utc(until))
    if tenant is not None:
        query = query.where(UsageMinute.tenant == tenant)
    out = []
    for row in session.execute(query.group_by(*keys).order_by(*keys)):
        values: tuple[Any, ...] = tuple(row)
        minute = values[2] if per_minute else None
        if minute is not None and minute.tzinfo is None:
            minute = minute.replace(tzinfo=UTC)
        r, i, o = values[-3:]
        out.append(UsageRow(values[0], values[1], minute, int(r), int(i), int(o)))
    return out

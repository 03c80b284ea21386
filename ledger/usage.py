"""Metered usage: one record per request, rolled up per tenant, model and minute.

The roll-up (``usage_minutes``) is updated in the same transaction as the usage
record, and only when that record was newly inserted, so a replayed ``finished``
event changes neither: counts are exact under at-least-once delivery.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from tokenmill.wire import Priority

from .bulk import bind_processor, upsert_add
from .errors import translated
from .models import UsageMinute, UsageRecord
from .types import utc, utcnow
from .upsert import insert_ignore_many


@dataclass(frozen=True)
class UsageTotals:
    """Usage of one model over a span of time."""

    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def minute_of(at: datetime | float) -> datetime:
    """The UTC minute bucket holding ``at``."""
    return utc(at).replace(second=0, microsecond=0)


@dataclass(frozen=True)
class UsageItem:
    """The metered usage of one finished request, as :func:`record_usage_many` takes it."""

    request_id: str
    tenant: str
    model: str
    priority: Priority
    prompt_tokens: int
    completion_tokens: int
    #: when the request finished; picks the minute bucket
    at: datetime


@translated
def record_usage(
    session: Session,
    *,
    request_id: str,
    tenant: str,
    model: str,
    priority: Priority,
    prompt_tokens: int,
    completion_tokens: int,
    at: datetime,
) -> bool:
    """Record a finished request's usage once; a replay is a no-op.

    Parameters:
        session: the caller's transaction; commit it before acknowledging the event.
        request_id: the request; at most one usage record exists per id.
        tenant, model, priority: what to attribute the usage to.
        prompt_tokens, completion_tokens: the engine's final counts.
        at: when the request finished; picks the minute bucket.

    Raises:
        LedgerError: the database refused the write (e.g. negative counts).

    Returns:
        True if this was new (and was added to the per-minute roll-up).
    """
    item = UsageItem(request_id, tenant, model, priority, prompt_tokens, completion_tokens, at)
    return record_usage_many(session, [item]) == 1


@translated
def record_usage_many(session: Session, items: Iterable[UsageItem]) -> int:
    """Record many requests' usage in one go; replays (and repeats within ``items``) are
    no-ops. See :func:`record_usage_new`.

    Returns:
        How many items were new.
    """
    return len(record_usage_new(session, items))


@translated
def record_usage_new(session: Session, items: Iterable[UsageItem]) -> set[str]:
    """Record many requests' usage with multi-row inserts; replays (and repeats within
    ``items``: the first wins) are no-ops.

    Rows are locked in one global order (usage records by request id, then roll-up
    rows by key), so concurrent consumers replaying overlapping sets cannot deadlock
    on PostgreSQL, and the roll-up takes one statement, counting only the records this
    call inserted.

    Parameters:
        session: the caller's transaction; commit it before acknowledging the events.
        items: the usage to record.

    Raises:
        LedgerError: the database refused a write (e.g. negative counts).

    Returns:
        The request ids whose usage was new.
    """
    rollup: dict[tuple[str, str, datetime], list[int]] = defaultdict(lambda: [0, 0, 0])
    now = utcnow()
    unique: dict[str, UsageItem] = {}
    for item in items:
        unique.setdefault(item.request_id, item)  # a repeat within ``items``: first wins
    ordered = [unique[rid] for rid in sorted(unique)]
    rows: list[dict[str, Any]] = [
        {
            "request_id": item.request_id,
            "tenant": item.tenant,
            "model": item.model,
            "priority": Priority(item.priority),
            "minute": minute_of(item.at),
            "prompt_tokens": item.prompt_tokens,
            "completion_tokens": item.completion_tokens,
            "recorded_at": now,
        }
        for item in ordered
    ]
    inserted = insert_ignore_many(session, UsageRecord, rows, ["request_id"], "request_id")
    for row in rows:
        if row["request_id"] in inserted:
            sums = rollup[(row["tenant"], row["model"], row["minute"])]
            sums[0] += 1
            sums[1] += row["prompt_tokens"]
            sums[2] += row["completion_tokens"]
    conn = session.connection()
    encode = bind_processor(UsageMinute.__table__.c.minute.type, conn.dialect)
    add_to_minutes(conn, {(t, m, encode(minute)): sums for (t, m, minute), sums in rollup.items()})
    return inserted


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

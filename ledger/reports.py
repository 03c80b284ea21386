"""The account reports — usage, invoice, SLA figures, webhook deliveries — as plain,
JSON-ready dicts: one function per report (the query and its shape), shared by the
gateway's ``/v1/tokenmill/…`` routes (the caller's tenant only) and the CLI's operator
path (``--all-tenants``), so both show the same numbers. Money is a decimal string
(never a float); times are ISO 8601 in UTC (``…Z``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from tokenmill.errors import ValidationError

from .billing import Period, invoice
from .models import DeliveryStatus
from .sla import FIGURES, QUANTILES, BatchWindows, batch_windows, sla_groups
from .usage import usage_rows
from .webhooks import list_webhooks

__all__ = [
    "invoice_report",
    "parse_period",
    "parse_span",
    "parse_time",
    "sla_report",
    "this_month",
    "usage_report",
    "webhooks_report",
]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime | None = None, field: str | None = None) -> datetime:
    """``2026-11-03``, ``2026-11-03T12:00`` (UTC unless it says otherwise), or a span back
    from now: ``90s``, ``15m``, ``2h``, ``7d``, ``1w``.

    Raises:
        ValidationError: none of those (naming ``field``).
    """
    now = now or datetime.now(UTC)
    where = f"{field}: " if field else ""
    m = _DURATION.match(text.strip())
    try:
        if m:
            return now - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
        at = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise ValidationError(
            f"{where}{text!r} is not a time: give ISO 8601 (2026-11-03T12:00) or a span like 2h, 7d",
            field=field,
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def parse_span(
    since: str, until: str | None, *, now: datetime | None = None
) -> tuple[datetime, datetime | None]:
    """``since`` and ``until`` (None: now) as :func:`parse_time` reads them.

    Raises:
        ValidationError: either is no time, or ``until`` is not after ``since``.
    """
    now = now or datetime.now(UTC)
    start = parse_time(since, now=now, field="since")
    end = parse_time(until, now=now, field="until") if until is not None else None
    if end is not None and end <= start:
        raise ValidationError(f"until: {until!r} is not after since ({since!r})", field="until")
    return start, end


def this_month(now: datetime | None = None) -> str:
    """The current UTC month as a period (``YYYY-MM``)."""
    return (now or datetime.now(UTC)).strftime("%Y-%m")


def parse_period(text: str) -> Period:
    """``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day), UTC.

    Raises:
        ValidationError: neither (``field="period"``).
    """
    try:
        if re.fullmatch(r"\d{4}-\d{2}", text):
            year, month = map(int, text.split("-"))
            return Period.month(year, month)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return Period.day(date.fromisoformat(text))
    except (ValueError, OverflowError):
        pass
    raise ValidationError(f"period {text!r}: give YYYY-MM or YYYY-MM-DD", field="period")


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z") if at else None


def _money(amount: Decimal) -> str:
    return f"{amount:f}"  # plain notation: str() would give "0E-10" for a zero at scale


def usage_report(
    session: Session,
    since: datetime,
    until: datetime | None = None,
    *,
    tenant: str | None = None,
    per_minute: bool = False,
) -> dict[str, Any]:
    """Requests and tokens per tenant and model (and minute window), ``since`` ≤ minute
    < ``until``; ``tenant`` None: every tenant's."""
    rows = usage_rows(session, since, until, tenant=tenant, per_minute=per_minute)
    return {
        "object": "tokenmill.usage", "since": _iso(since), "until": _iso(until),
        "rows": [{"tenant": r.tenant, "model": r.model, **({"minute": _iso(r.minute)} if per_minute else {}),
                  "requests": r.requests, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens}
                 for r in rows],
    }  # fmt: skip


def invoice_report(session: Session, tenant: str, period: Period) -> dict[str, Any]:
    """A tenant's invoice for ``period``, one line per model and entry kind (``charge``:
    finished requests; ``partial``: work done on requests cancelled, expired or failed
    after the engine started them; ``refund``, ``adjustment``).

    The total is the exact sum of the ledger entries, rounded once (half-even) to the
    currency's minor unit; the rounding adjustment reconciles it with the rounded lines.
    """
    inv = invoice(session, tenant, period)
    return {
        "object": "tokenmill.invoice", "tenant": inv.tenant,
        "period": {"start": _iso(inv.period.start), "end": _iso(inv.period.end)},
        "currency": inv.currency,
        "lines": [{"model": ln.model, "kind": ln.kind.value, "requests": ln.requests,
                   "input_tokens": ln.prompt_tokens,
                   "output_tokens": ln.completion_tokens, "amount": _money(ln.amount),
                   "amount_rounded": _money(ln.amount_rounded)} for ln in inv.lines],
        "total": _money(inv.total), "total_rounded": _money(inv.total_rounded),
        "rounding_adjustment": _money(inv.rounding_adjustment),
    }  # fmt: skip


def sla_report(
    session: Session,
    since: datetime,
    until: datetime | None = None,
    *,
    targets: Mapping[str, Any],
    tenant: str | None = None,
    now: datetime | None = None,
    at_risk: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """p50/p95/p99 of queue wait, TTFT, TPOT and end-to-end latency per tenant × tier ×
    model (exact, from the per-request records), and per tenant the attainment of all
    targets and of each, goodput (requests meeting every target per second of the
    span, which ends at ``until`` or ``now``), the batches that ended in the span
    against their completion windows, and ``at_risk``: per tenant, its running batches
    the scheduler forecasts to miss their windows now (None: not known)."""
    groups = sla_groups(session, since, until, tenant=tenant, targets=targets)
    windows = {w.tenant: w for w in batch_windows(session, since, until, tenant=tenant)}
    span_s = ((until or now or datetime.now(UTC)) - since).total_seconds()
    totals: dict[str, dict[str, Any]] = {}
    for g in groups:
        t = totals.setdefault(g.tenant, {"requests": 0, "met": 0, "target_met": dict.fromkeys(g.target_met, 0)})
        t["requests"] += g.requests
        t["met"] += g.met
        for k, v in g.target_met.items():
            t["target_met"][k] += v
    at_risk = {t: n for t, n in (at_risk or {}).items() if tenant is None or t == tenant}
    for name in (windows.keys() | at_risk.keys()) - totals.keys():  # no request finished
        totals[name] = {"requests": 0, "met": 0, "target_met": dict.fromkeys(("ttft", "tpot", "e2e"), 0)}
    return {
        "object": "tokenmill.sla", "since": _iso(since), "until": _iso(until),
        "tenants": {
            name: {"requests": t["requests"], "met": t["met"],
                   "attainment": t["met"] / t["requests"] if t["requests"] else None,
                   "target_attainment": {k: v / t["requests"] if t["requests"] else None
                                         for k, v in t["target_met"].items()},
                   "goodput_rps": t["met"] / span_s if span_s > 0 else None,
                   "batches": {**_windows_json(windows.get(name)),
                               "at_risk_now": at_risk.get(name, 0)}}
            for name, t in sorted(totals.items())
        },
        "groups": [{"tenant": g.tenant, "tier": g.tier, "model": g.model, "priority": g.priority,
                    "sla_class": g.sla_class,
                    "requests": g.requests, "met": g.met, "attainment": g.attainment,
                    **{f"{fig}_p{round(q * 100)}": g.quantiles[fig][i]
                       for fig in FIGURES for i, q in enumerate(QUANTILES)}}
                   for g in groups],
    }  # fmt: skip


def _windows_json(w: BatchWindows | None) -> dict[str, Any]:
    if w is None:
        return {"ended": 0, "within_window": 0, "expired": 0, "within_window_rate": None}
    return {"ended": w.ended, "within_window": w.within_window, "expired": w.expired,
            "within_window_rate": w.rate}  # fmt: skip


def webhooks_report(
    session: Session, *, tenant: str | None = None, failed: bool = False, limit: int = 50
) -> list[dict[str, Any]]:
    """Webhook deliveries, newest first (``failed``: only the dead-lettered ones);
    ``tenant`` None: every tenant's."""
    rows = list_webhooks(session, tenant=tenant, status=DeliveryStatus.dead if failed else None, limit=limit)
    return [
        {"object": "tokenmill.webhook_delivery", "webhook_id": r.webhook_id, "tenant": r.tenant,
         "event_type": r.event_type, "url": r.url, "status": r.status.value, "attempts": r.attempts,
         "last_status_code": r.last_status_code, "last_error": r.last_error,
         "created_at": _iso(r.created_at), "delivered_at": _iso(r.delivered_at)}
        for r in rows
    ]  # fmt: skip

"""tokenmill's account API: the caller's own usage, invoices, SLA figures and webhook
deliveries — what ``tokenmill usage | invoice | sla | webhooks`` print, made by the same
functions (:mod:`tokenmill.ledger.reports`):

* ``GET /v1/tokenmill/usage?since=24h&until=&by_minute=false``
* ``GET /v1/tokenmill/invoices/{period}`` — ``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day), UTC
* ``GET /v1/tokenmill/sla?since=1h&until=``
* ``GET /v1/tokenmill/webhooks?failed=false&limit=50``

Every report is the caller's tenant's and no one else's: there is no tenant parameter
(one in the query is ignored, as any unknown one). ``since`` and ``until`` are ISO 8601
times or spans back from now (``90s``, ``2h``, ``7d``); money is decimal strings. The
reports whose size grows with their span (usage per minute, and SLA figures, which read
one record per request) cover at most :data:`MAX_DETAIL_SPAN`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from ..ledger import transaction
from ..ledger.reports import (
    invoice_report,
    parse_period,
    parse_span,
    sla_report,
    usage_report,
    webhooks_report,
)
from ..scheduler.deadlines import FORECASTS_KEY, at_risk_by_tenant
from .auth import tenant_of
from .backend import Backend
from .errors import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/tokenmill")

T = TypeVar("T")

MAX_DETAIL_SPAN = timedelta(days=31)
#: most webhook deliveries one call lists
MAX_WEBHOOKS = 1000
#: longest ``since``/``until``/period text taken (any valid one is far shorter)
_MAX_TIME_TEXT = 64


def _span(since: str, until: str | None, *, detail: bool) -> tuple[datetime, datetime | None, datetime]:
    """``(start, end, now)``; 400 naming the parameter for a bad one or a detail span too long."""
    now = datetime.now(UTC)
    start, end = parse_span(since, until, now=now)
    if detail and (end or now) - start > MAX_DETAIL_SPAN:
        raise ApiError(400, f"since: this report spans at most {MAX_DETAIL_SPAN.days} days; ask for "
                            "several shorter spans", param="since", code="invalid_value")
    return start, end, now


async def _read(request: Request, work: Callable[[Session], T]) -> T:
    """``work`` in one ledger transaction, off the event loop (the ledger code is sync)."""
    backend: Backend = request.app.state.backend

    def run() -> T:
        with transaction(backend.ledger) as session:
            return work(session)

    return await asyncio.to_thread(run)


@router.get("/usage")
async def usage(
    request: Request,
    since: str = Query(default="24h", max_length=_MAX_TIME_TEXT),
    until: str | None = Query(default=None, max_length=_MAX_TIME_TEXT),
    by_minute: bool = False,
    tenant: str = Depends(tenant_of),
) -> Response:
    start, end, _ = _span(since, until, detail=by_minute)
    doc = await _read(request, lambda s: usage_report(s, start, end, tenant=tenant, per_minute=by_minute))
    return JSONResponse(doc)


@router.get("/invoices/{period}")
async def invoice(request: Request, period: str, tenant: str = Depends(tenant_of)) -> Response:
    span = parse_period(period[:_MAX_TIME_TEXT])
    return JSONResponse(await _read(request, lambda s: invoice_report(s, tenant, span)))


@router.get("/sla")
async def sla(
    request: Request,
    since: str = Query(default="1h", max_length=_MAX_TIME_TEXT),
    until: str | None = Query(default=None, max_length=_MAX_TIME_TEXT),
    tenant: str = Depends(tenant_of),
) -> Response:
    start, end, now = _span(since, until, detail=True)
    targets = request.app.state.settings.sla
    at_risk = await _at_risk(request)
    doc = await _read(request, lambda s: sla_report(s, start, end, targets=targets, tenant=tenant,
                                                    now=now, at_risk=at_risk))  # fmt: skip
    return JSONResponse(doc)


async def _at_risk(request: Request) -> dict[str, int] | None:
    """Batches forecast to miss their windows now, per tenant (None: Redis unreachable;
    the report is the ledger's and goes out without them)."""
    try:
        return at_risk_by_tenant(await request.app.state.backend.redis.hgetall(FORECASTS_KEY))
    except RedisError:
        return None


@router.get("/webhooks")
async def webhooks(
    request: Request,
    failed: bool = False,
    limit: int = Query(default=50, ge=1, le=MAX_WEBHOOKS),
    tenant: str = Depends(tenant_of),
) -> Response:
    items = await _read(request, lambda s: webhooks_report(s, tenant=tenant, failed=failed, limit=limit))
    return JSONResponse({"object": "list", "data": items})

"""The Batches API, OpenAI's shapes: ``POST /v1/batches``, ``GET /v1/batches/{id}``,
``GET /v1/batches`` and ``POST /v1/batches/{id}/cancel``; and tokenmill's extension
``GET /v1/batches/{id}/output``, the progressive output.

A batch is made from a file the tenant uploaded (purpose ``batch``) by the server-side
:class:`~tokenmill.producers.batches.Batches`; the batch runner does the rest. The
batch object has every field of ``openai.types.Batch``: the invalid lines found at
creation as ``errors``, the output and error files as file ids once it ends, and the
ledger's token counts of its requests as ``usage``. Its extensions: ``forecast``
(while it runs), ``output_expires_after`` (as asked for at creation),
``output_expires_at`` (when the output and error files expire: their creation plus
``output_expires_after.seconds``) and ``output_expired_at`` (when they were removed).
tokenmill's extensions in the create body: ``model`` (for lines whose body names
none) and ``webhook``.

``GET /v1/batches/{id}/output?after=N&limit=M`` answers the rows of the output and
error files recorded so far (``application/jsonl``, each row's bytes as in the final
file), from the ``N``-th (a cursor: rows already read) on, at most ``M`` (default
1,000, at most 10,000): first the lines refused at validation, then the lines in the
order they finished, each once. A row belongs to the output file when its ``error``
is ``null``, else to the error file. Headers: ``X-Tokenmill-Next-After`` (the cursor
to pass next), ``X-Tokenmill-Has-More`` (more rows are recorded already),
``X-Tokenmill-Batch-Status`` and ``X-Tokenmill-Batch-Ended`` (the batch had ended
before the rows were read: with no more rows, the reader has every row of both files),
``X-Tokenmill-Output-Rows`` / ``X-Tokenmill-Error-Rows`` (this page's rows of each).
A batch whose output expired answers 404 ``batch_output_expired``.

Every id is scoped to the caller's tenant; another tenant's answers 404 exactly as an
unknown one does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from ..errors import NotFound, ValidationError
from ..ledger import FilePurpose, batch_file_id, get_file, transaction
from ..producers.batches import (
    Batches,
    BatchView,
    OutputExpired,
    PartialOutput,
    check_expires_after,
    check_metadata,
    parse_window,
    usage_json,
)
from ..scheduler.deadlines import FORECASTS_KEY, forecast_json
from ..wire import Endpoint
from ..workers import keys
from .auth import tenant_of
from .errors import ApiError
from .http import read_json

__all__ = ["batch_json", "router"]

router = APIRouter(prefix="/v1/batches")

_ENDPOINTS = tuple(e.value for e in Endpoint)
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_json(view: BatchView) -> dict[str, Any]:
    """OpenAI's ``batch`` object."""
    b, s = view.batch, view.summary
    counts = b.request_counts
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint.value,
        "errors": {"object": "list", "data": view.errors} if view.errors else None,
        # "" only for batches made before the ledger recorded files
        "input_file_id": s.input_file_id or "",
        "completion_window": b.completion_window,
        "status": b.status.value,
        "output_file_id": batch_file_id(b.id, "output") if b.output_file else None,
        "error_file_id": batch_file_id(b.id, "error") if b.error_file else None,
        "created_at": int(b.created_at),
        "expires_at": int(b.expires_at),
        **{name: _ts(getattr(b, name)) for name in _TIMES},
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": b.metadata,
        "model": s.model,
        "usage": usage_json(s),
        # tokenmill's extensions
        "output_expires_after": s.output_expires_after,
        "output_expires_at": _ts(s.output_expires_at),
        "output_expired_at": _ts(s.output_expired_at),
    }


def _invalid(exc: ValidationError) -> ApiError:
    # The service names the file "file"; this API's caller knows it by its id.
    param = "input_file_id" if exc.field == "file" else exc.field
    return ApiError(400, str(exc), param=param, code="invalid_value")


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: required, a string", param=name, code="missing_required_parameter")
    return value


def _read_input(request: Request, tenant: str, file_id: str) -> bytes:
    """The bytes of the tenant's batch input file ``file_id``."""
    with transaction(request.app.state.backend.ledger) as session:
        found = get_file(session, tenant, file_id)
    if found.purpose is not FilePurpose.batch:
        raise ApiError(400, f"input_file_id: {file_id} is not a file uploaded with purpose 'batch'",
                       param="input_file_id", code="invalid_value")
    try:
        return Path(found.path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"file {file_id} not found") from None


@router.post("")
async def create_batch(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    settings = request.app.state.settings
    body = await read_json(request, settings.gateway.max_body_bytes)
    input_file_id = _required(body, "input_file_id")
    # OpenAI requires it (its SDK always sends it); left out, a tokenmill extension:
    # lines may mix endpoints, as `vllm run-batch` files may.
    endpoint = body.get("endpoint")
    if endpoint is not None and endpoint not in _ENDPOINTS:
        raise ApiError(400, f"endpoint: must be one of {', '.join(_ENDPOINTS)}, got {endpoint!r}",
                       param="endpoint", code="invalid_value")
    window = _required(body, "completion_window")
    model, webhook = body.get("model"), body.get("webhook")
    if model is not None and (not isinstance(model, str) or model not in settings.models):
        raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    if webhook is not None and not isinstance(webhook, str):
        raise ApiError(400, "webhook: must be a URL string", param="webhook", code="invalid_value")
    try:  # before the file is read: a bad argument costs nothing
        parse_window(window)
        metadata = check_metadata(body.get("metadata"))
        expires_after = check_expires_after(body.get("output_expires_after"))
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        data = await asyncio.to_thread(_read_input, request, tenant, input_file_id)
    except NotFound:
        raise ApiError.not_found("file", input_file_id, param="input_file_id") from None
    batches = Batches(settings, tenant)

    def create() -> BatchView:
        batch = batches.create(
            data, completion_window=window, endpoint=endpoint, metadata=metadata, model=model,
            webhook=webhook, input_file_id=input_file_id, output_expires_after=expires_after,
        )  # fmt: skip
        return batches.view(batch.id)

    try:
        view = await asyncio.to_thread(create)
    except ValidationError as exc:
        raise _invalid(exc) from None
    await _wake_runner(request, view.batch.id)
    return JSONResponse(batch_json(view))


async def _wake_runner(request: Request, batch_id: str) -> None:
    """Start the batch now rather than at the runner's next idle poll (up to a second)."""
    redis = request.app.state.backend.redis
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.lpush(keys.BATCH_WAKE, batch_id)
        pipe.ltrim(keys.BATCH_WAKE, 0, 99)  # nobody listening: keep it small
        await pipe.execute()
    except RedisError:
        pass  # the batch is durable in the ledger: the next poll starts it anyway


@router.get("")
async def list_tenant_batches(
    request: Request,
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
    tenant: str = Depends(tenant_of),
) -> Response:
    batches = Batches(request.app.state.settings, tenant)
    try:
        found = await asyncio.to_thread(batches.list_views, limit=limit + 1, after=after)
    except NotFound:
        raise ApiError.not_found("batch", after or "", param="after") from None
    page = found[:limit]
    return JSONResponse({
        "object": "list", "data": [batch_json(v) for v in page],
        "first_id": page[0].batch.id if page else None, "last_id": page[-1].batch.id if page else None,
        "has_more": len(found) > limit,
    })  # fmt: skip


@router.get("/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str, tenant: str = Depends(tenant_of)) -> Response:
    batches = Batches(request.app.state.settings, tenant)
    try:
        view = await asyncio.to_thread(batches.view, batch_id)
    except NotFound:
        raise ApiError.not_found("batch", batch_id, param="batch_id") from None
    body = batch_json(view)
    if not view.batch.status.is_terminal:
        body["forecast"] = await _forecast(request, batch_id)
    return JSONResponse(body)


async def _forecast(request: Request, batch_id: str) -> dict[str, Any] | None:
    """The scheduler's forecast for a batch with queued lines (an extension of the batch
    object: when it should finish, and whether its window is at risk)."""
    try:
        raw = await request.app.state.backend.redis.hget(FORECASTS_KEY, batch_id)
    except RedisError:
        return None  # a status without its forecast beats no status
    return forecast_json(raw)


#: rows of one progressive-output page: by default, and at most
PARTIAL_LIMIT, MAX_PARTIAL_LIMIT = 1000, 10_000


@router.get("/{batch_id}/output")
async def batch_output(
    request: Request,
    batch_id: str,
    after: int = Query(default=0, ge=0),
    limit: int = Query(default=PARTIAL_LIMIT, ge=1, le=MAX_PARTIAL_LIMIT),
    tenant: str = Depends(tenant_of),
) -> Response:
    """tokenmill's extension: the batch's output and error rows recorded so far."""
    batches = Batches(request.app.state.settings, tenant)
    try:
        page: PartialOutput = await asyncio.to_thread(batches.partial, batch_id, after=after, limit=limit)
    except OutputExpired as exc:
        raise ApiError(404, f"{exc}.", param="batch_id", code="batch_output_expired") from None
    except NotFound:
        raise ApiError.not_found("batch", batch_id, param="batch_id") from None
    outputs = sum(1 for r in page.rows if r.kind == "output")
    headers = {
        "X-Tokenmill-Next-After": str(page.next_after),
        "X-Tokenmill-Has-More": "true" if page.has_more else "false",
        "X-Tokenmill-Batch-Status": page.status.value,
        "X-Tokenmill-Batch-Ended": "true" if page.ended else "false",
        "X-Tokenmill-Output-Rows": str(outputs),
        "X-Tokenmill-Error-Rows": str(len(page.rows) - outputs),
    }
    return Response(b"".join(r.data for r in page.rows), media_type="application/jsonl", headers=headers)


@router.post("/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str, tenant: str = Depends(tenant_of)) -> Response:
    batches = Batches(request.app.state.settings, tenant)

    def cancel() -> BatchView:
        batches.cancel(batch_id)
        return batches.view(batch_id)

    try:
        view = await asyncio.to_thread(cancel)
    except NotFound:
        raise ApiError.not_found("batch", batch_id, param="batch_id") from None
    return JSONResponse(batch_json(view))

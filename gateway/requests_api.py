"""tokenmill's own request API, for callers that submit now and collect later (the
Python client's ``submit`` / ``result`` / ``stream`` / ``cancel`` / ``map``):

* ``POST /v1/tokenmill/requests`` — ``{"endpoint", "body"}`` or ``{"requests": [...]}``
  (each with optional ``priority``, ``deadline`` seconds, ``webhook``); answers 202 with
  the ids the server made, once Kafka has every request;
* ``GET /v1/tokenmill/requests/{id}?wait=S`` — the result (``status: pending`` while
  there is none after waiting up to ``S`` seconds);
* ``GET /v1/tokenmill/requests/{id}/events`` — SSE of text deltas, then the result;
* ``POST /v1/tokenmill/requests/{id}/cancel``.

Every id is checked against the caller's tenant; another tenant's id is a 404. A lost
Redis or broker answers 503 ``service_unavailable`` naming it (mid-stream: an ``error``
event), within seconds rather than at the wait's end. A request the embedded broker
took with it before dispatch has a terminal ``failed`` result (``broker_lost``), on
every gateway and after a restart; one dispatched before the loss may still finish, and
the 503 says to poll again later.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ValidationError
from ..producers.requests import build_request
from ..stack.errors import ServiceUnavailable
from ..wire import Endpoint, InferenceRequest, Priority, Result
from .auth import tenant_of
from .backend import Backend
from .errors import ApiError
from .http import read_json

__all__ = ["result_json", "router"]

router = APIRouter(prefix="/v1/tokenmill/requests")

#: most requests one submission may carry
MAX_PER_CALL = 1000
#: the longest one GET may wait for a result
MAX_WAIT_S = 60.0


def result_json(result: Result) -> dict[str, Any]:
    data = result.model_dump(mode="json", exclude_none=True, exclude={"schema_version": True})
    data["object"] = "tokenmill.result"
    if result.usage is not None:
        data["usage"] = {"prompt_tokens": result.usage.prompt_tokens,
                         "completion_tokens": result.usage.completion_tokens}
    return data


def _one(request: Request, tenant: str, item: Any, where: str) -> InferenceRequest:
    if not isinstance(item, dict):
        raise ApiError(400, f"{where or 'body'}: must be an object", param=where or None, code="invalid_value")
    settings = request.app.state.settings
    body = item.get("body")
    if not isinstance(body, dict):
        raise ApiError(400, f"{where}body: must be an object", param=f"{where}body", code="invalid_value")
    raw_endpoint = item.get("endpoint", "/v1/chat/completions")
    try:
        endpoint = Endpoint(raw_endpoint)
    except ValueError:
        raise ApiError(400, f"{where}endpoint: must be one of {', '.join(Endpoint)}, got {raw_endpoint!r}",
                       param=f"{where}endpoint", code="invalid_value") from None
    model = body.get("model")
    if not isinstance(model, str) or model not in settings.models:
        raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       param=f"{where}body.model", code="model_not_found")
    try:
        return build_request(
            settings, tenant=tenant, model=model, body=body, endpoint=endpoint,
            priority=item.get("priority", Priority.standard), deadline=item.get("deadline"),
            webhook=item.get("webhook"),
        )
    except ValidationError as exc:
        top = exc.field in ("priority", "deadline", "webhook")
        field = exc.field if top else ("body." + exc.field if exc.field else "body")
        raise ApiError(400, f"{where}{'' if top else 'body.'}{exc}", param=f"{where}{field}",
                       code="invalid_value") from None


@router.post("", status_code=202)
async def submit(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    backend: Backend = request.app.state.backend
    data = await read_json(request, request.app.state.settings.gateway.max_body_bytes)
    many = "requests" in data
    items = data["requests"] if many else [data]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_PER_CALL:
        raise ApiError(400, f"requests: must be a list of 1 to {MAX_PER_CALL} requests",
                       param="requests", code="invalid_value")
    reqs = [_one(request, tenant, item, f"requests[{i}]." if many else "") for i, item in enumerate(items)]
    await backend.submit(reqs)
    out = [{"id": r.id, "object": "tokenmill.request", "model": r.model, "priority": r.priority.value,
            "status": "queued"} for r in reqs]
    return JSONResponse({"object": "list", "data": out} if many else out[0], status_code=202)


async def _owned(backend: Backend, tenant: str, request_id: str) -> None:
    if not await backend.owns(tenant, request_id):
        raise ApiError.not_found("request", request_id, param="request_id")


@router.get("/{request_id}")
async def get_result(
    request: Request,
    request_id: str,
    wait: float = Query(default=0.0, ge=0.0, le=MAX_WAIT_S),
    tenant: str = Depends(tenant_of),
) -> Response:
    backend: Backend = request.app.state.backend
    await _owned(backend, tenant, request_id)
    found = await (backend.wait(tenant, request_id, wait) if wait > 0 else backend.result(tenant, request_id))
    if found is None:
        return JSONResponse({"object": "tokenmill.result", "request_id": request_id, "status": "pending"})
    return JSONResponse(result_json(found))


@router.get("/{request_id}/events")
async def events(
    request: Request,
    request_id: str,
    timeout: float = Query(default=600.0, gt=0.0, le=3600.0),
    tenant: str = Depends(tenant_of),
) -> Response:
    backend: Backend = request.app.state.backend
    await _owned(backend, tenant, request_id)

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for item in backend.events(request_id, timeout):
                if item.kind == "delta":
                    payload = {"type": "delta", "text": item.text, "completion_tokens": item.completion_tokens}
                    yield b"data: " + json.dumps(payload).encode() + b"\n\n"
                    continue
                found = await backend.result(tenant, request_id)
                payload = {"type": "end", "result": result_json(found) if found else None}
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
                break
        except ServiceUnavailable as exc:  # mid-stream: the status line is already sent
            err = ApiError.unavailable(exc)
            payload = {"type": "error", "error": {"message": err.message, "type": err.type, "code": err.code}}
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/{request_id}/cancel")
async def cancel(request: Request, request_id: str, tenant: str = Depends(tenant_of)) -> Response:
    backend: Backend = request.app.state.backend
    await _owned(backend, tenant, request_id)
    await backend.cancel(tenant, request_id)
    return JSONResponse({"id": request_id, "object": "tokenmill.request", "status": "cancelling"})

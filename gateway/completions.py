"""``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses`` and
``/v1/embeddings``: through the queue, the fair-share scheduler and the workers like
every request, answered in OpenAI's shapes; chat and completions plain or streamed (SSE
chunks, ``data: [DONE]``, ``stream_options.include_usage``).

A caller that goes away (mid-stream, or while waiting for a plain answer) cancels its
request: the worker stops generating, and what it generated is what the ledger sees.
So does one whose request was dispatched when the embedded broker was lost (its worker
cannot finish reporting without Kafka, and the caller is told at once): 503
``service_unavailable`` naming Kafka, saying it was cancelled. One lost before dispatch
ends with the ``broker_lost`` result, answered the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ValidationError
from ..producers.requests import build_request
from ..stack.errors import ServiceUnavailable
from ..wire import Endpoint, InferenceRequest, Priority, Result, ResultStatus
from .auth import tenant_of
from .backend import BROKER_LOST_CODE, Backend, BrokerLost, GatewayStopping
from .errors import ApiError
from .http import deadline_header, priority_of, read_json

__all__ = ["result_error", "router"]

router = APIRouter()

#: the ``service_tier`` an answer reports, as OpenAI names the class that served it
SERVICE_TIER = {Priority.interactive: "priority", Priority.standard: "default", Priority.batch: "flex"}
_CHUNK_OBJECT = {Endpoint.chat_completions: "chat.completion.chunk", Endpoint.completions: "text_completion"}


# The hot routes call tenant_of themselves: FastAPI's dependency solving cost ~8 % of the
# gateway's CPU per request.
@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _complete(request, await tenant_of(request), Endpoint.chat_completions)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _complete(request, await tenant_of(request), Endpoint.completions)


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    return await _complete(request, await tenant_of(request), Endpoint.responses)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await _complete(request, await tenant_of(request), Endpoint.embeddings)


def accept(request: Request, tenant: str, body: dict[str, Any], endpoint: Endpoint) -> InferenceRequest:
    """Validate an OpenAI body for ``tenant`` into a request with a fresh server id.

    Raises:
        ApiError: 404 ``model_not_found``, 400 naming the field.
    """
    settings = request.app.state.settings
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model: you must provide a model parameter", param="model", code="invalid_value")
    if model not in settings.models:
        raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    priority = priority_of(request, body.get("service_tier"))
    try:
        return build_request(settings, tenant=tenant, model=model, body=body, priority=priority,
                             deadline=deadline_header(request), endpoint=endpoint)
    except ValidationError as exc:
        raise ApiError.invalid(exc) from None


async def _complete(request: Request, tenant: str, endpoint: Endpoint) -> Response:
    backend: Backend = request.app.state.backend
    body = await read_json(request, request.app.state.settings.gateway.max_body_bytes)
    req = accept(request, tenant, body, endpoint)
    await backend.submit([req])
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _sse(backend, req, include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": req.id},
        )
    result = await _wait_or_leave(request, backend, req)
    if result.status is not ResultStatus.succeeded:
        raise result_error(result)
    body = result.body or {}
    if endpoint is not Endpoint.embeddings:  # OpenAI's embeddings object has no service tier
        body = {**body, "service_tier": SERVICE_TIER[req.priority]}
    return JSONResponse(body, headers={"X-Request-Id": req.id})


async def _wait_or_leave(request: Request, backend: Backend, req: InferenceRequest) -> Result:
    """The result; a caller that disconnects first cancels the request."""
    timeout = request.app.state.settings.gateway.request_timeout_s
    waiting = asyncio.ensure_future(backend.wait(req.tenant, req.id, timeout))
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiting, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
    if not waiting.done():
        waiting.cancel()
        backend.cancel_soon(req.tenant, req.id)
        raise ApiError(499, "The client closed the request.", code="client_closed")
    try:
        result = waiting.result()
    except BrokerLost as exc:
        raise _lost_with_broker(backend, req, exc) from None
    except GatewayStopping as exc:
        backend.cancel_soon(req.tenant, req.id, control=False)
        raise exc.cancelled() from None
    if result is None:
        backend.cancel_soon(req.tenant, req.id)
        raise ApiError(504, f"No result within {timeout:g}s; the request was cancelled.", code="timeout")
    return result


def _lost_with_broker(backend: Backend, req: InferenceRequest, exc: BrokerLost) -> ServiceUnavailable:
    """The error for a caller whose request the broker's loss left without an answer; a
    dispatched one is cancelled (its flag reaches the worker through Redis): nobody will
    read its answer. One not dispatched already has its ``broker_lost`` result."""
    if not exc.dispatched:
        return exc
    backend.cancel_soon(req.tenant, req.id, control=False)
    return exc.cancelled()


async def _disconnected(request: Request) -> None:
    # After the body is read, the next message from the server is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


_STATUS_OF_CODE = {
    "budget_exceeded": (429, "insufficient_quota", "insufficient_quota"),
    "deadline_expired": (408, "deadline_expired", "timeout_error"),
    "invalid_request": (400, "invalid_request", "invalid_request_error"),
    "cancelled": (499, "cancelled", "invalid_request_error"),
    BROKER_LOST_CODE: (503, "service_unavailable", "server_error"),
}


def result_error(result: Result) -> ApiError:
    """The HTTP error of a request that did not succeed."""
    code = result.error.code if result.error else result.status.value
    message = result.error.message if result.error else result.status.value
    if result.status is ResultStatus.expired:
        code = "deadline_expired"
    status, code_out, kind = _STATUS_OF_CODE.get(code, (500, code, "server_error"))
    if code == "budget_exceeded":
        message = f"You exceeded your current quota: {message}"
    return ApiError(status, message, code=code_out, type=kind)


def _sse_data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse(backend: Backend, req: InferenceRequest, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks as the engine produces text; a caller that leaves cancels the request."""
    chat = req.endpoint is Endpoint.chat_completions
    rid = ("chatcmpl-" if chat else "cmpl-") + req.id
    head = {"id": rid, "object": _CHUNK_OBJECT[req.endpoint], "created": int(time.time()), "model": req.model,
            "service_tier": SERVICE_TIER[req.priority], "system_fingerprint": None}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**head, "choices": [choice]}

    finished = False
    try:
        if chat:
            yield _sse_data(chunk("", None, first=True))
        timeout = backend.settings.gateway.request_timeout_s
        try:
            async for item in backend.events(req.id, timeout):
                if item.kind == "delta":
                    if item.text:
                        yield _sse_data(chunk(item.text, None))
                    continue
                finished = True
                result = await backend.result(req.tenant, req.id)
                if result is None or result.status is not ResultStatus.succeeded:
                    err = result_error(result) if result else ApiError(500, "the request ended without a result")
                    yield _sse_data({"error": {"message": err.message, "type": err.type, "param": None,
                                               "code": err.code}})
                    break
                choice = ((result.body or {}).get("choices") or [{}])[0]
                yield _sse_data(chunk(None, choice.get("finish_reason") or "stop"))
                if include_usage and result.usage is not None:
                    u = result.usage
                    yield _sse_data({**head, "choices": [], "usage": {
                        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                        "total_tokens": u.total_tokens}})
                break
        except ServiceUnavailable as exc:  # Redis, or the broker with the request, is gone
            finished = True  # without Redis a cancel cannot reach the request either
            if isinstance(exc, BrokerLost):
                exc = _lost_with_broker(backend, req, exc)
            err = ApiError.unavailable(exc)
            yield _sse_data({"error": {"message": err.message, "type": err.type, "param": None,
                                       "code": err.code}})
        if not finished:
            finished = True  # timed out: stop the work nobody will read
            backend.cancel_soon(req.tenant, req.id)
            yield _sse_data({"error": {"message": "no output within the request timeout; cancelled",
                                       "type": "timeout_error", "param": None, "code": "timeout"}})
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the caller went away mid-stream
            backend.cancel_soon(req.tenant, req.id)

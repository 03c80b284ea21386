"""OpenAI-compatible response bodies, by endpoint: ``chat.completion``,
``text_completion``, the Responses API's ``response`` and the embeddings ``list``.

The simulated engine's bodies say so: a top-level ``"simulated": true`` is added
(OpenAI clients ignore unknown fields) and, where the shape has one,
``system_fingerprint`` is ``"simulated"``.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from typing import Any

from ..wire import Endpoint, InferenceRequest, Usage

__all__ = ["completion_body", "embeddings_body", "response_body", "response_id", "responses_body"]

_ID_PREFIX = {
    Endpoint.chat_completions: "chatcmpl-", Endpoint.completions: "cmpl-", Endpoint.responses: "resp_",
    Endpoint.embeddings: "emb-",
}


def response_id(request: InferenceRequest) -> str:
    return _ID_PREFIX[request.endpoint] + request.id


def response_body(
    request: InferenceRequest,
    text: str,
    finish_reason: str,
    usage: Usage,
    *,
    embeddings: Sequence[list[float]] | None = None,
    simulated: bool = False,
    created: float | None = None,
) -> dict[str, Any]:
    """The body a client of ``request.endpoint`` expects for a finished request."""
    if request.endpoint is Endpoint.embeddings:
        return embeddings_body(request, embeddings or (), usage, simulated=simulated)
    if request.endpoint is Endpoint.responses:
        return responses_body(request, text, finish_reason, usage, simulated=simulated, created=created)
    return completion_body(request, text, finish_reason, usage, simulated=simulated, created=created)


def _base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: the little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embeddings_body(
    request: InferenceRequest, vectors: Sequence[list[float]], usage: Usage, *, simulated: bool = False
) -> dict[str, Any]:
    """OpenAI's ``CreateEmbeddingResponse``: one ``embedding`` per input, in order."""
    as_base64 = request.body.get("encoding_format") == "base64"
    body: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v}
            for i, v in enumerate(vectors)
        ],
        "model": request.model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }
    if simulated:
        body["simulated"] = True
    return body


def responses_body(
    request: InferenceRequest,
    text: str,
    finish_reason: str,
    usage: Usage,
    *,
    simulated: bool = False,
    created: float | None = None,
) -> dict[str, Any]:
    """The Responses API's ``response`` object: one assistant message with the text;
    ``incomplete`` (``max_output_tokens``) when the token limit ended it."""
    b = request.body
    complete = finish_reason != "length"
    status = "completed" if complete else "incomplete"
    body: dict[str, Any] = {
        "id": response_id(request),
        "object": "response",
        "created_at": int(created if created is not None else time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": b.get("instructions"),
        "max_output_tokens": b.get("max_output_tokens"),
        "model": request.model,
        "output": [{
            "type": "message", "id": "msg_" + request.id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "parallel_tool_calls": False,
        "temperature": b.get("temperature", 1.0),
        "top_p": b.get("top_p", 1.0),
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": b.get("metadata") or {},
        "user": b.get("user"),
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        },
    }
    if simulated:
        body["simulated"] = True
    return body


def completion_body(
    request: InferenceRequest,
    text: str,
    finish_reason: str,
    usage: Usage,
    *,
    simulated: bool = False,
    created: float | None = None,
) -> dict[str, Any]:
    """The response body a client of ``request.endpoint`` expects."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if request.endpoint is Endpoint.chat_completions:
        obj = "chat.completion"
        choice["message"] = {"role": "assistant", "content": text}
    else:
        obj = "text_completion"
        choice["text"] = text
    body: dict[str, Any] = {
        "id": response_id(request),
        "object": obj,
        "created": int(created if created is not None else time.time()),
        "model": request.model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "system_fingerprint": "simulated" if simulated else None,
    }
    if simulated:
        body["simulated"] = True
    return body

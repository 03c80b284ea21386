"""OpenAI-compatible response bodies (``chat.completion`` / ``text_completion``).

The simulated engine's bodies say so: ``system_fingerprint`` is ``"simulated"`` and
a top-level ``"simulated": true`` is added (OpenAI clients ignore unknown fields).
"""

from __future__ import annotations

import time
from typing import Any

from ..wire import Endpoint, InferenceRequest, Usage

__all__ = ["completion_body", "response_id"]


def response_id(request: InferenceRequest) -> str:
    prefix = "chatcmpl-" if request.endpoint is Endpoint.chat_completions else "cmpl-"
    return prefix + request.id


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

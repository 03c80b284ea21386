"""Reading what callers send: JSON bodies under a size limit, and tokenmill's headers."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from ..wire import Priority
from .errors import ApiError

__all__ = ["deadline_header", "priority_of", "read_json"]

PRIORITY_HEADER = "x-tokenmill-priority"
DEADLINE_HEADER = "x-tokenmill-deadline"
#: OpenAI's ``service_tier`` → our priority classes
_TIER = {"priority": Priority.interactive, "default": Priority.standard, "auto": Priority.standard,
         "flex": Priority.batch}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body, read with ``limit`` enforced while reading.

    Raises:
        ApiError: 413 over the limit; 400 not UTF-8, not JSON or not an object.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes is over the limit of {limit} bytes.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body is over the limit of {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The request body is not UTF-8 (byte {exc.start}).", code="invalid_encoding") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def priority_of(request: Request, service_tier: Any) -> Priority:
    """``X-Tokenmill-Priority`` if given, else OpenAI's ``service_tier``, else standard."""
    header = request.headers.get(PRIORITY_HEADER)
    if header is not None:
        try:
            return Priority(header.strip().lower())
        except ValueError:
            raise ApiError(400, f"{PRIORITY_HEADER}: must be one of {', '.join(Priority)}, got {header!r}",
                           param=PRIORITY_HEADER, code="invalid_value") from None
    if service_tier is None:
        return Priority.standard
    found = _TIER.get(service_tier) if isinstance(service_tier, str) else None
    if found is None:
        raise ApiError(400, f"service_tier: must be one of {', '.join(_TIER)}, got {service_tier!r}",
                       param="service_tier", code="invalid_value")
    return found


def deadline_header(request: Request) -> float | None:
    """``X-Tokenmill-Deadline``: seconds from now the request may wait in the queue."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds < 1e9:
        raise ApiError(400, f"{DEADLINE_HEADER}: must be a positive number of seconds, got {raw!r}",
                       param=DEADLINE_HEADER, code="invalid_value")
    return seconds

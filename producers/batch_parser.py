"""Reading a batch file in the OpenAI Batch JSONL format, line by line.

Each non-blank line must be a JSON object ``{"custom_id", "method", "url", "body"}``:
``custom_id`` a unique string, ``method`` POST, ``url`` one of ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses`` and ``/v1/embeddings``, ``body`` a valid request
for a configured model that serves that endpoint. Blank lines are skipped, as vLLM's
``run_batch`` skips them, so a file ``run_batch`` accepts is accepted unchanged (a body
without ``model`` takes the batch's default model; one file may mix endpoints unless
the batch names one). Endpoints other batch APIs take and tokenmill does not run yet
(vLLM's score and rerank, OpenAI's moderations) fail their line as
``unsupported_endpoint``, naming it.

One bad line never fails a batch: it becomes a :class:`LineError` naming the line,
the reason and (where it has one) its ``custom_id``, and the valid lines run. Only
the file as a whole can be refused (:class:`~tokenmill.errors.ValidationError`):
more bytes or more lines than :class:`~tokenmill.config.models.BatchSettings` allow.

Every non-blank line ends up exactly once in :attr:`ParsedBatch.accepted` or
:attr:`ParsedBatch.errors`; a ``custom_id`` belongs to its first line, so a later
duplicate is reported without one (each ``custom_id`` appears exactly once across
the output and error files). Parsing is pure and deterministic: no I/O, no clock
except the ``now`` given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..config import Settings
from ..config.models import BatchSettings
from ..errors import ValidationError
from ..wire import Endpoint, InferenceRequest, Priority, batch_request_id
from .requests import build_request

__all__ = [
    "AcceptedLine",
    "LineError",
    "LineErrorCode",
    "ParsedBatch",
    "entry_id",
    "iter_lines",
    "parse_batch",
]

#: ``method`` values accepted (OpenAI and vLLM take POST only)
METHOD = "POST"
URLS = {e.value: e for e in Endpoint}
#: endpoints `vllm run-batch` or OpenAI's Batch API take that tokenmill does not run
UNSUPPORTED_URLS = frozenset({"/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/moderations"})


class LineErrorCode(StrEnum):
    """Why a line was not run; the ``error.code`` of its error-file entry."""

    #: longer than ``batch.max_line_bytes``
    line_too_large = "line_too_large"
    #: not UTF-8
    invalid_encoding = "invalid_encoding"
    #: not JSON (or JSON with NaN/Infinity)
    invalid_json = "invalid_json"
    #: JSON, but not an object
    invalid_line = "invalid_line"
    missing_custom_id = "missing_custom_id"
    #: not a non-empty string, or too long
    invalid_custom_id = "invalid_custom_id"
    #: the custom_id of an earlier line
    duplicate_custom_id = "duplicate_custom_id"
    invalid_method = "invalid_method"
    invalid_url = "invalid_url"
    #: an endpoint of OpenAI's or vLLM's batch APIs that tokenmill does not run (yet)
    unsupported_endpoint = "unsupported_endpoint"
    missing_body = "missing_body"
    invalid_body = "invalid_body"
    model_not_found = "model_not_found"


@dataclass(frozen=True, slots=True)
class AcceptedLine:
    """A valid line and the request it becomes."""

    line: int  #: 1-based line number in the file
    custom_id: str
    request: InferenceRequest


@dataclass(frozen=True, slots=True)
class LineError:
    """An invalid line: where, why, and its custom_id if it owns one."""

    line: int
    code: LineErrorCode
    message: str
    custom_id: str | None = None
    #: the offending field (``body.max_tokens``), where one is to blame
    param: str | None = None

    def entry(self, batch_id: str) -> dict[str, Any]:
        """The error-file entry (OpenAI's output shape; ``error`` as OpenAI's BatchError).
        A line without a custom_id of its own gets ``""`` (never a valid one, so no clash):
        vLLM's ``BatchRequestOutput`` needs a string, and ``error.line`` says which line."""
        return {
            "id": entry_id(batch_id, self.line),
            "custom_id": self.custom_id or "",
            "response": None,
            "error": {
                "code": self.code.value,
                "message": f"line {self.line}: {self.message}",
                "param": self.param,
                "line": self.line,
            },
        }


@dataclass
class ParsedBatch:
    accepted: list[AcceptedLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    #: non-blank lines (= len(accepted) + len(errors))
    lines: int = 0
    #: the batch's endpoint: the one asked for, else the first valid line's
    endpoint: Endpoint = Endpoint.chat_completions


def entry_id(batch_id: str, line: int) -> str:
    """The stable ``id`` of a line's output or error entry."""
    digest = hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]
    return f"batch_req_{digest}"


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of every non-blank line (``\\n`` separated;
    surrounding whitespace, ``\\r`` included, stripped)."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        stripped = raw.strip()
        if stripped:
            yield number, stripped


class _LineInvalid(Exception):
    def __init__(self, code: LineErrorCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_batch(
    data: bytes,
    settings: Settings,
    *,
    tenant: str,
    batch_id: str,
    priority: Priority | str = Priority.batch,
    default_model: str | None = None,
    endpoint: Endpoint | str | None = None,
    deadline: float | None = None,
    limits: BatchSettings | None = None,
) -> ParsedBatch:
    """Validate a batch file and build a request for every valid line.

    Parameters:
        data: the file's bytes.
        settings: models and tenants to validate against.
        tenant: whose batch (every request is this tenant's).
        batch_id: the batch's id; request ids are ``batch_request_id(batch_id, custom_id)``.
        priority: the priority class of every request.
        default_model: the model of lines whose body names none (vLLM serves one model).
        endpoint: every line's ``url`` must be this one; None accepts both.
        deadline: epoch seconds after which queued requests expire (the batch's window).
        limits: size limits (default ``settings.batch``).

    Raises:
        ValidationError: the file as a whole is refused (too large, too many lines);
            nothing of it is accepted.

    Returns:
        The accepted lines and the line errors, in file order.
    """
    limits = limits or settings.batch
    if len(data) > limits.max_bytes:
        raise ValidationError(
            f"file: {len(data)} bytes is over the limit of {limits.max_bytes} bytes",
            field="file",
        )
    lines = list(iter_lines(data))
    if len(lines) > limits.max_lines:
        raise ValidationError(
            f"file: {len(lines)} requests is over the limit of {limits.max_lines}", field="file"
        )
    only = Endpoint(endpoint) if endpoint is not None else None
    parsed = ParsedBatch(lines=len(lines), endpoint=only or Endpoint.chat_completions)
    owners: dict[str, int] = {}  # custom_id -> the line that owns it
    max_cid = 512 - len(batch_id) - 1  # request ids are at most 512 characters
    for number, raw in lines:
        custom_id: str | None = None
        try:
            obj = _decode(raw, limits.max_line_bytes)
            custom_id = _custom_id(obj, max_cid)
            if custom_id in owners:
                first, custom_id = owners[custom_id], None
                raise _LineInvalid(
                    LineErrorCode.duplicate_custom_id,
                    f"custom_id {obj['custom_id']!r} is already used on line {first}",
                    "custom_id",
                )
            owners[custom_id] = number
            request = _request(
                obj, settings, tenant=tenant, batch_id=batch_id, custom_id=custom_id,
                priority=priority, default_model=default_model, only=only, deadline=deadline,
            )
        except _LineInvalid as exc:
            parsed.errors.append(LineError(number, exc.code, exc.message, custom_id, exc.param))
            continue
        if only is None and not parsed.accepted:
            parsed.endpoint = request.endpoint
        parsed.accepted.append(AcceptedLine(number, custom_id, request))
    return parsed


def _decode(raw: bytes, max_line_bytes: int) -> Mapping[str, Any]:
    if len(raw) > max_line_bytes:
        raise _LineInvalid(
            LineErrorCode.line_too_large,
            f"{len(raw)} bytes is over the limit of {max_line_bytes} bytes a line",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineInvalid(LineErrorCode.invalid_encoding, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _LineInvalid(LineErrorCode.invalid_json, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _LineInvalid(LineErrorCode.invalid_line, f"a line must be a JSON object, not {_kind(obj)}")
    return obj


def _custom_id(obj: Mapping[str, Any], max_chars: int) -> str:
    if "custom_id" not in obj or obj["custom_id"] is None:
        raise _LineInvalid(LineErrorCode.missing_custom_id, "custom_id is required", "custom_id")
    cid = obj["custom_id"]
    if not isinstance(cid, str) or not cid:
        raise _LineInvalid(
            LineErrorCode.invalid_custom_id, f"custom_id must be a non-empty string, not {_kind(cid)}", "custom_id"
        )
    if len(cid) > max_chars:
        raise _LineInvalid(
            LineErrorCode.invalid_custom_id, f"custom_id is longer than {max_chars} characters", "custom_id"
        )
    return cid


def _request(
    obj: Mapping[str, Any],
    settings: Settings,
    *,
    tenant: str,
    batch_id: str,
    custom_id: str,
    priority: Priority | str,
    default_model: str | None,
    only: Endpoint | None,
    deadline: float | None,
) -> InferenceRequest:
    method = obj.get("method")
    if not isinstance(method, str) or method.upper() != METHOD:
        raise _LineInvalid(LineErrorCode.invalid_method, f"method must be POST, not {method!r}", "method")
    url = obj.get("url")
    endpoint = URLS.get(url) if isinstance(url, str) else None
    if endpoint is None and url in UNSUPPORTED_URLS:
        raise _LineInvalid(
            LineErrorCode.unsupported_endpoint,
            f"unsupported endpoint {url!r}: batch lines may use {', '.join(URLS)}",
            "url",
        )
    if endpoint is None:
        raise _LineInvalid(
            LineErrorCode.invalid_url,
            f"url must be one of {', '.join(URLS)}, not {url!r}",
            "url",
        )
    if only is not None and endpoint is not only:
        raise _LineInvalid(LineErrorCode.invalid_url, f"url must be {only.value} in this batch, not {url!r}", "url")
    body = obj.get("body")
    if body is None:
        raise _LineInvalid(LineErrorCode.missing_body, "body is required", "body")
    if not isinstance(body, dict):
        raise _LineInvalid(LineErrorCode.invalid_body, f"body must be a JSON object, not {_kind(body)}", "body")
    body = dict(body)
    model = body.get("model", default_model)
    if model is None:
        raise _LineInvalid(LineErrorCode.model_not_found, "body.model is required", "body.model")
    if not isinstance(model, str) or model not in settings.models:
        known = ", ".join(sorted(settings.models))
        raise _LineInvalid(
            LineErrorCode.model_not_found, f"unknown model {model!r} (known: {known})", "body.model"
        )
    body["model"] = model
    _check_body(body, endpoint)
    try:
        request = build_request(
            settings, tenant=tenant, model=model, body=body, priority=priority,
            request_id=batch_request_id(batch_id, custom_id), batch_id=batch_id,
            custom_id=custom_id, deadline=deadline, endpoint=endpoint,
        )
    except ValidationError as exc:
        param = f"body.{exc.field}" if exc.field else None
        raise _LineInvalid(LineErrorCode.invalid_body, f"body: {exc}", param) from None
    return request


_INPUT_KINDS = {Endpoint.responses: "a string or a list of input items",
                Endpoint.embeddings: "a string, strings, token ids or lists of token ids"}


def _check_body(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    if body.get("stream"):
        raise _LineInvalid(LineErrorCode.invalid_body, "body.stream is not supported in a batch", "body.stream")
    if endpoint is Endpoint.chat_completions:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _LineInvalid(
                LineErrorCode.invalid_body,
                "body.messages must be a non-empty list for /v1/chat/completions",
                "body.messages",
            )
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise _LineInvalid(
                    LineErrorCode.invalid_body,
                    f"body.messages[{i}] must be an object with a string role",
                    f"body.messages.{i}",
                )
    elif endpoint in _INPUT_KINDS:
        if not isinstance(body.get("input"), (str, list)) or not body["input"]:
            raise _LineInvalid(
                LineErrorCode.invalid_body,
                f"body.input must be {_INPUT_KINDS[endpoint]} for {endpoint.value}",
                "body.input",
            )
    else:
        if "messages" in body:
            raise _LineInvalid(
                LineErrorCode.invalid_body, "body.messages is not allowed for /v1/completions", "body.messages"
            )
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise _LineInvalid(
                LineErrorCode.invalid_body,
                "body.prompt must be a string or a list for /v1/completions",
                "body.prompt",
            )


def _kind(value: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)

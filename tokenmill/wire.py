"""Wire schemas: every message that crosses a process boundary, in one module.

Messages are frozen pydantic models carrying ``schema_version`` ("MAJOR.MINOR").
A reader accepts any minor version of its major (unknown fields are ignored, so a
newer minor may add fields) and rejects a newer major with
:class:`~tokenmill.errors.UnsupportedSchemaVersion`. Mutable state (scheduler
queues, ledger rows) is built *from* these messages, never stored in them.
"""

from __future__ import annotations

import functools
import time
import uuid
from enum import IntEnum, StrEnum
from typing import Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import SchemaError, UnsupportedSchemaVersion

SCHEMA_VERSION = "1.2"
SCHEMA_MAJOR = 1

# Kafka topics.
REQUEST_TOPIC_PREFIX = "tokenmill.requests."
TOKEN_EVENTS_TOPIC = "tokenmill.token-events"
CONTROL_TOPIC = "tokenmill.control"
DEAD_LETTER_TOPIC = "tokenmill.dead-letter"
SLA_VIOLATIONS_TOPIC = "tokenmill.sla-violations"


class Priority(StrEnum):
    """Priority classes, highest first."""

    interactive = "interactive"
    standard = "standard"
    batch = "batch"

    @property
    def rank(self) -> int:
        """0 for the highest class."""
        return _PRIORITY_RANK[self]

    @property
    def topic(self) -> str:
        return REQUEST_TOPIC_PREFIX + self.value


_PRIORITY_RANK = {Priority.interactive: 0, Priority.standard: 1, Priority.batch: 2}
REQUEST_TOPICS: tuple[str, ...] = tuple(p.topic for p in Priority)


class Endpoint(StrEnum):
    chat_completions = "/v1/chat/completions"
    completions = "/v1/completions"
    #: OpenAI's Responses API, run on chat models (since 1.2)
    responses = "/v1/responses"
    #: vectors from an embedding model: no output tokens (since 1.2)
    embeddings = "/v1/embeddings"

    @property
    def generates(self) -> bool:
        """True for the endpoints that generate text (and output tokens)."""
        return self is not Endpoint.embeddings


class EventKind(StrEnum):
    queued = "queued"
    dispatched = "dispatched"
    first_token = "first_token"
    progress = "progress"
    finished = "finished"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (EventKind.finished, EventKind.failed, EventKind.cancelled)


class RequestState(IntEnum):
    """Lifecycle of a request. Everything from ``FINISHED`` on is terminal."""

    #: accepted and published, not yet handed to a worker
    QUEUED = 0
    #: sent to a worker pool
    DISPATCHED = 1
    #: the engine produced its first token
    RUNNING = 2
    #: completed with a result
    FINISHED = 3
    #: the engine or the request failed; the reason is recorded
    FAILED = 4
    #: cancelled by the tenant
    CANCELLED = 5
    #: its deadline passed before it ran
    EXPIRED = 6

    @property
    def is_terminal(self) -> bool:
        return self >= RequestState.FINISHED


class BatchStatus(StrEnum):
    """OpenAI Batch statuses."""

    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (
            BatchStatus.completed,
            BatchStatus.failed,
            BatchStatus.expired,
            BatchStatus.cancelled,
        )


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def batch_request_id(batch_id: str, custom_id: str) -> str:
    """Stable id of a batch line, so redelivery and resubmission dedupe."""
    return f"{batch_id}:{custom_id}"


class WireModel(BaseModel):
    """Base of every wire message: frozen, versioned, tolerant of newer minors."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_enum_values=False)

    schema_version: str = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, v: str) -> str:
        try:
            major = int(v.split(".", 1)[0])
        except ValueError as exc:
            raise ValueError(f"schema_version {v!r} is not MAJOR.MINOR") from exc
        if major > SCHEMA_MAJOR:
            # Raised as a plain ValueError inside pydantic; decode() maps it back.
            raise ValueError(f"{_NEWER_MAJOR}: message has {v}, this build reads {SCHEMA_MAJOR}.x")
        return v

    def to_bytes(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)


_NEWER_MAJOR = "unsupported schema version"


class InferenceRequest(WireModel):
    """One inference request, as published to ``tokenmill.requests.<priority>``."""

    kind: Literal["request"] = "request"
    id: str = Field(default_factory=new_request_id, min_length=1, max_length=512)
    tenant: str = Field(min_length=1, max_length=128)
    priority: Priority = Priority.standard
    model: str = Field(min_length=1, max_length=256)
    endpoint: Endpoint = Endpoint.chat_completions
    #: the OpenAI-compatible request body (``messages``, ``prompt`` or ``input``, and
    #: sampling params)
    body: dict[str, Any]
    #: output tokens the request may generate: >= 1, except 0 for embeddings
    max_tokens: int = Field(ge=0, le=1_000_000)
    #: prompt tokens as :mod:`tokenmill.tokens` counts them: exact for sim and vLLM
    #: models, an upper bound for remote ones; budgets reserve it + ``max_tokens``
    #: (billing uses the engine's count, which never exceeds it)
    prompt_tokens_estimate: int = Field(ge=0)
    submitted_at: float = Field(default_factory=time.time)
    #: absolute epoch seconds after which a queued request expires
    deadline: float | None = None
    webhook_url: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None

    @model_validator(mode="after")
    def _body_matches_endpoint(self) -> InferenceRequest:
        if self.endpoint is Endpoint.chat_completions:
            msgs = self.body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ValueError("body.messages must be a non-empty list for /v1/chat/completions")
        elif self.endpoint is Endpoint.completions:
            if not isinstance(self.body.get("prompt"), (str, list)):
                raise ValueError("body.prompt must be a string or list for /v1/completions")
        elif not isinstance(self.body.get("input"), (str, list)):
            raise ValueError(f"body.input must be a string or list for {self.endpoint.value}")
        if self.endpoint.generates and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 for {self.endpoint.value}")
        if not self.endpoint.generates and self.max_tokens != 0:
            raise ValueError(f"max_tokens must be 0 for {self.endpoint.value} (it generates no tokens)")
        if (self.batch_id is None) != (self.custom_id is None):
            raise ValueError("batch_id and custom_id go together")
        return self


class Usage(WireModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenEvent(WireModel):
    """A step in a request's life, published to ``tokenmill.token-events`` keyed by tenant.

    ``finished`` carries the engine's own token counts and every timestamp the SLA
    processor needs, so it can be priced and measured on its own.
    """

    kind: EventKind
    request_id: str
    tenant: str
    model: str
    priority: Priority = Priority.standard
    worker: str | None = None
    #: 1 for the first delivery to a worker, 2 after a redelivery, ...
    attempt: int = Field(default=1, ge=1)
    #: orders progress events of one attempt
    seq: int = Field(default=0, ge=0)
    #: cumulative token counts so far (final on ``finished``)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    #: tokens generated since the previous progress event
    delta_tokens: int = Field(default=0, ge=0)
    ts: float = Field(default_factory=time.time)
    submitted_at: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    simulated: bool = False
    #: times the engine preempted the request (evicted it to run a more urgent one and
    #: recomputed it later); on terminal events
    preemptions: int = Field(default=0, ge=0)

    @functools.cached_property
    def wire_bytes(self) -> bytes:
        """:meth:`to_bytes`, computed once: a terminal event is stored beside its result
        and sent to Kafka (every field is an immutable scalar, so it cannot go stale)."""
        return super().to_bytes()

    def to_bytes(self) -> bytes:
        return self.wire_bytes

    @property
    def event_id(self) -> str:
        """Stable id: a replayed event has the same one."""
        return f"{self.request_id}:{self.kind.value}:{self.attempt}:{self.seq}"


class ResultStatus(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"


class ErrorInfo(WireModel):
    code: str
    message: str


class Result(WireModel):
    """The outcome of a request, stored in the result store keyed by request id."""

    request_id: str
    tenant: str
    model: str
    status: ResultStatus
    #: an OpenAI-compatible response body (chat.completion or text_completion)
    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
    worker: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    finished_at: float = Field(default_factory=time.time)


class Dispatch(WireModel):
    """A request handed to a worker pool by the scheduler."""

    request: InferenceRequest
    dispatched_at: float = Field(default_factory=time.time)
    attempt: int = Field(default=1, ge=1)
    #: a batch line whose completion window is at risk: the engine runs it ahead of
    #: other batch work (still behind interactive and standard requests)
    urgent: bool = False


class WorkerHeartbeat(WireModel):
    """Published by every worker about once a second; stale ones drop out."""

    worker: str
    pool: str
    models: tuple[str, ...]
    engine: str
    simulated: bool = False
    capacity: int = Field(ge=0)
    in_flight: int = Field(ge=0)
    ts: float = Field(default_factory=time.time)
    #: slots of ``capacity`` that only interactive requests may take (the model's
    #: ``interactive_headroom``)
    reserved: int = Field(default=0, ge=0)
    #: the engine's own saturation signals (None: the engine does not report them):
    #: sequences running, requests waiting inside the engine, KV-cache use (0-1) and
    #: preemptions since it started
    engine_running: int | None = Field(default=None, ge=0)
    engine_waiting: int | None = Field(default=None, ge=0)
    kv_cache_usage: float | None = Field(default=None, ge=0, le=1)
    preemptions: int = Field(default=0, ge=0)

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.in_flight)


class ControlKind(StrEnum):
    cancel = "cancel"


class ControlMessage(WireModel):
    """A command to the scheduler, published to ``tokenmill.control``."""

    kind: ControlKind
    request_id: str
    tenant: str
    ts: float = Field(default_factory=time.time)


class RequestCounts(WireModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(WireModel):
    """A batch in the OpenAI Batch shape (the ``object: batch`` resource)."""

    id: str
    tenant: str
    endpoint: Endpoint
    status: BatchStatus
    input_file: str
    completion_window: str = "24h"
    created_at: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    request_counts: RequestCounts = RequestCounts()
    output_file: str | None = None
    error_file: str | None = None
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None


M = TypeVar("M", bound=WireModel)


def decode(model: type[M], raw: bytes | str) -> M:
    """Parse a wire message, translating pydantic errors into :class:`SchemaError`.

    Raises:
        UnsupportedSchemaVersion: the message has a newer major version.
        SchemaError: anything else wrong, with the field path and reason.
    """
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        reason = describe_validation_error(exc)
        if _NEWER_MAJOR in reason:
            raise UnsupportedSchemaVersion(f"{model.__name__}: {reason}") from exc
        raise SchemaError(f"{model.__name__}: {reason}") from exc


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<message>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)

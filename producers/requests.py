"""Building and validating inference requests before anything is sent.

Every problem is a :class:`~tokenmill.errors.ValidationError` naming the field, so a
bad request never reaches a topic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pydantic

from ..config import Settings
from ..errors import ValidationError
from ..tokens import prompt_tokens
from ..wire import Endpoint, InferenceRequest, Priority, describe_validation_error, new_request_id
from ..workers.webhook_targets import check_target
from .bodies import SAMPLING_PARAMS, validate_body


def max_tokens_of(body: Mapping[str, Any], default: int, endpoint: Endpoint = Endpoint.chat_completions) -> int:
    """The most output tokens ``body`` may generate: 0 for embeddings; the Responses
    API's ``max_output_tokens``; else ``max_completion_tokens`` or ``max_tokens``."""
    if not endpoint.generates:
        return 0
    if endpoint is Endpoint.responses:
        name, value = "max_output_tokens", body.get("max_output_tokens", default)
    else:
        name, value = "max_tokens", body.get("max_completion_tokens", body.get("max_tokens", default))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(f"{name}: must be a positive integer, got {value!r}", field=name)
    return value


def check_serves(settings: Settings, model: str, endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    """``model`` answers ``endpoint`` (an embedding model embeds only, a vLLM generation
    model does not embed), and an embeddings ``dimensions`` is one it allows.

    Raises:
        ValidationError: naming ``model`` or ``dimensions``.
    """
    cfg = settings.models[model]
    if not (cfg.embeds if endpoint is Endpoint.embeddings else cfg.generates):
        does = "an embedding model" if cfg.embeds else "a text generation model"
        raise ValidationError(f"model: {model!r} is {does}: it does not serve {endpoint.value}", field="model")
    dims = body.get("dimensions") if endpoint is Endpoint.embeddings else None
    if dims is not None and dims not in cfg.embedding_dimensions:
        allowed = ", ".join(map(str, cfg.embedding_dimensions))
        raise ValidationError(
            f"dimensions: {model!r} " + (f"gives {allowed} dimensions, not {dims}" if allowed
                                         else "has one size: leave dimensions out"),
            field="dimensions",
        )


def check_webhook_url(url: str, settings: Settings, tenant: str) -> str:
    """A tenant's webhook at submission: the target policy
    (:mod:`tokenmill.workers.webhook_targets`; the delivery checks the address again),
    and a secret to sign with — an unsigned delivery would be refused at every attempt."""
    if not isinstance(url, str):
        raise ValidationError(f"webhook: must be a URL string, got {type(url).__name__}", field="webhook")
    check_target(url, settings.webhooks)
    if settings.tenants[tenant].webhook_secret is None:
        raise ValidationError(f"webhook: tenant {tenant!r} has no webhook_secret to sign with", field="webhook")
    return url


def deadline_of(deadline: float | datetime | None, now: float) -> float | None:
    """Seconds from now (a number below 10⁹), an epoch time, or a datetime → epoch seconds."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        return deadline.timestamp()
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise ValidationError(
            f"deadline: must be seconds from now, epoch seconds or a datetime, got {deadline!r}",
            field="deadline",
        )
    if deadline <= 0:
        raise ValidationError("deadline: must be positive", field="deadline")
    return now + deadline if deadline < 1e9 else float(deadline)


def build_request(
    settings: Settings,
    *,
    tenant: str,
    model: str,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: str | list[str] | None = None,
    max_tokens: int | None = None,
    priority: Priority | str = Priority.standard,
    deadline: float | datetime | None = None,
    webhook: str | None = None,
    request_id: str | None = None,
    batch_id: str | None = None,
    custom_id: str | None = None,
    body: Mapping[str, Any] | None = None,
    stream: bool = False,
    endpoint: Endpoint | None = None,
    **sampling: Any,
) -> InferenceRequest:
    """Validate the arguments of ``submit`` and build the wire request.

    Raises:
        ValidationError: naming the offending field.
    """
    if tenant not in settings.tenants:
        raise ValidationError(f"tenant: unknown tenant {tenant!r}", field="tenant")
    model_cfg = settings.models.get(model)
    if model_cfg is None:
        known = ", ".join(sorted(settings.models))
        raise ValidationError(f"model: unknown model {model!r} (known: {known})", field="model")
    try:
        prio = Priority(priority)
    except ValueError:
        raise ValidationError(
            f"priority: must be one of {', '.join(p.value for p in Priority)}, got {priority!r}",
            field="priority",
        ) from None
    unknown = set(sampling) - SAMPLING_PARAMS
    if unknown:
        raise ValidationError(f"{min(unknown)}: unknown parameter", field=min(unknown))

    if body is None:
        if (messages is None) == (prompt is None):
            raise ValidationError("messages/prompt: give exactly one of them", field="messages")
        body = {"model": model, **sampling}
        if messages is not None:
            # Copied as given: validate_body says what is wrong with a bad one.
            body["messages"] = [dict(m) if isinstance(m, Mapping) else m for m in messages] \
                if isinstance(messages, (list, tuple)) else messages
        else:
            body["prompt"] = prompt
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            # Workers publish text deltas for streaming requests (Client.stream).
            body["stream"] = True
    if endpoint is None:
        endpoint = Endpoint.chat_completions if "messages" in body else Endpoint.completions
    validate_body(body, endpoint)
    check_serves(settings, model, endpoint, body)
    now = time.time()
    try:
        return InferenceRequest(
            id=request_id or new_request_id(),
            tenant=tenant,
            priority=prio,
            model=model,
            endpoint=endpoint,
            body=dict(body),
            max_tokens=max_tokens_of(body, model_cfg.default_max_tokens, endpoint),
            # Exact for sim and vLLM models, an upper bound otherwise: budgets reserve
            # it with max_tokens, so the reservation bounds what the engine bills.
            prompt_tokens_estimate=prompt_tokens(settings, model, body, endpoint),
            submitted_at=now,
            deadline=deadline_of(deadline, now),
            webhook_url=check_webhook_url(webhook, settings, tenant) if webhook else None,
            batch_id=batch_id,
            custom_id=custom_id,
        )
    except pydantic.ValidationError as exc:
        raise ValidationError(describe_validation_error(exc)) from None

"""Typed configuration sections: tiers, tenants, models, price cards, SLA classes.

Money is :class:`~decimal.Decimal` everywhere; a float in a price is refused so
that no binary rounding reaches a bill.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetPeriod(StrEnum):
    day = "day"
    month = "month"


class Budget(Section):
    amount: Decimal = Field(gt=0)
    period: BudgetPeriod = BudgetPeriod.month
    #: what happens to a request that would overshoot: held until the next period, or rejected
    on_exceed: str = Field(default="reject", pattern="^(reject|hold)$")


class RateLimit(Section):
    requests_per_min: int | None = Field(default=None, gt=0)
    tokens_per_min: int | None = Field(default=None, gt=0)


class Tier(Section):
    weight: float = Field(gt=0)
    sla: str


class Tenant(Section):
    tier: str
    #: overrides the tier's weight
    weight: float | None = Field(default=None, gt=0)
    #: SHA-256 hex digests of the tenant's API keys (keys themselves are never stored)
    api_key_sha256: tuple[str, ...] = ()
    #: secret for signing this tenant's webhooks (Standard Webhooks)
    webhook_secret: SecretStr | None = None
    budget: Budget | None = None
    rate_limit: RateLimit | None = None

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError("must be lowercase SHA-256 hex digests (64 chars)")
        return v

    def key_matches(self, api_key: str) -> bool:
        digest = hash_api_key(api_key)
        return any(hmac.compare_digest(digest, d) for d in self.api_key_sha256)


def hash_api_key(api_key: str) -> str:
    """API keys are high-entropy random strings, so a plain SHA-256 suffices."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class EngineKind(StrEnum):
    vllm = "vllm"
    openai = "openai"
    sim = "sim"


class ModelConfig(Section):
    engine: EngineKind
    #: the worker pool (Celery queue) that serves this model; defaults to the model name
    pool: str | None = None
    #: requests in flight per worker process
    max_in_flight: int = Field(default=64, gt=0)
    #: engine slots per worker on top of ``max_in_flight`` that only interactive
    #: requests take: an interactive request never waits for a batch sequence to end
    interactive_headroom: int = Field(default=0, ge=0)
    #: passed to the engine (vLLM engine args, the remote server URL, the sim timing model)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    #: scheduling estimate of output tokens when a request gives no max_tokens
    default_max_tokens: int = Field(default=256, gt=0)
    #: the sizes an embeddings request's ``dimensions`` may ask for (a Matryoshka
    #: model's); empty: the model's own size only, and ``dimensions`` is refused
    embedding_dimensions: tuple[int, ...] = ()

    @property
    def embeds(self) -> bool:
        """Serves ``/v1/embeddings``: a vLLM model on the pooling runner, or the sim engine
        (which answers both kinds)."""
        return self.engine is EngineKind.sim or (
            self.engine is EngineKind.vllm and self.engine_args.get("runner") == "pooling"
        )

    @property
    def generates(self) -> bool:
        """Serves the text endpoints (chat, completions, responses)."""
        return not (self.engine is EngineKind.vllm and self.engine_args.get("runner") == "pooling")


class PriceCard(Section):
    """Prices per million tokens, in force from ``effective_from`` until the next card."""

    model: str
    effective_from: datetime
    currency: str = "USD"
    input_per_million: Decimal = Field(ge=0)
    #: required for a model that generates text; an embedding model's card may leave it
    #: out (it bills input tokens only)
    output_per_million: Decimal = Field(default=Decimal(0), ge=0)
    #: fraction taken off batch-priority requests (0.5 = half price)
    batch_discount: Decimal = Field(default=Decimal(0), ge=0, le=1)

    @field_validator("input_per_million", "output_per_million", "batch_discount", mode="before")
    @classmethod
    def _no_float(cls, v: Any) -> Any:
        if isinstance(v, float):
            raise ValueError("give money as a string (\"0.15\"), not a float")
        return v

    @model_validator(mode="after")
    def _exact_costs(self) -> PriceCard:
        # Every price, discounted or not, has at most 4 decimal places per million
        # tokens, so every cost is exact at 10^-10 (see tokenmill.pricing).
        for name in ("input_per_million", "output_per_million"):
            price: Decimal = getattr(self, name)
            _max_places(price, 4, name)
            _max_places(price * (1 - self.batch_discount), 4, f"{name} after batch_discount")
        return self

    @field_validator("effective_from")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=UTC)


def _max_places(v: Decimal, places: int, what: str) -> None:
    exponent = v.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise ValueError(f"{what}: at most {places} decimal places per million tokens, got {v}")


class SlaClass(Section):
    """Targets per SLA class; a request meets its SLA when it meets every target."""

    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
    e2e_ms: float = Field(gt=0)


class SchedulerSettings(Section):
    #: weights of input and output tokens in the fair-share counter (VTC)
    w_in: float = Field(default=1.0, ge=0)
    w_out: float = Field(default=2.0, ge=0)
    #: share of dispatches each class gets under saturation
    class_shares: dict[str, float] = Field(
        default_factory=lambda: {"interactive": 0.7, "standard": 0.2, "batch": 0.1}
    )
    #: seconds of waiting that raise a request by one priority class
    aging_s: float = Field(default=30.0, gt=0)
    #: a worker whose heartbeat is older than this is dropped
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    #: most requests per Celery message: a message costs the worker about as much as
    #: tens of zero-cost requests, and a slice is acked once all of it is settled
    max_slice: int = Field(default=256, gt=0, le=4096)
    #: under load, wait up to this long for a full slice of free capacity
    slice_fill_s: float = Field(default=0.02, ge=0, le=1)
    #: how far (weighted tokens / tenant weight) a tenant whose batch window is at risk
    #: may run ahead of the least served tenant of the batch class
    urgency_lead: float = Field(default=200_000.0, ge=0)


class BatchSettings(Section):
    max_lines: int = Field(default=50_000, gt=0)
    max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    max_line_bytes: int = Field(default=1024 * 1024, gt=0)
    #: life of a batch runner copy's lease on a batch, renewed every poll: a dead
    #: copy's batches are resumed by another this long after its death
    lease_s: float = Field(default=10.0, gt=0)


class WebhookSettings(Section):
    max_attempts: int = Field(default=8, gt=0)
    backoff_base_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    #: allow loopback receivers (127.0.0.0/8, ::1, localhost): the local stack's own;
    #: opens nothing else (see tokenmill.workers.webhook_targets)
    allow_loopback: bool = False
    #: allow receivers on private networks (10/8, 172.16/12, 192.168/16, 100.64/10,
    #: fc00::/7); loopback, link-local and cloud metadata addresses stay refused
    allow_private_targets: bool = False


class GatewaySettings(Section):
    """The HTTP API tenants use (``tokenmill gateway``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: largest JSON request body; a bigger one is answered 413 before it is parsed
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    #: where uploaded files live (default ``<home>/files``)
    files_dir: Path | None = None
    #: the longest a non-streamed completion is waited for before 504
    request_timeout_s: float = Field(default=600.0, gt=0)
    #: SHA-256 digests of the keys that may read ``/metrics``; none: metrics are off
    metrics_key_sha256: tuple[str, ...] = ()

    @field_validator("metrics_key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    def metrics_key_matches(self, key: str) -> bool:
        digest = hash_api_key(key)
        return any(hmac.compare_digest(digest, d) for d in self.metrics_key_sha256)

"""Inputs and results of the scheduling policy.

These are the policy's own small types, decoupled from the wire schema and the settings:
the scheduler service converts messages and price cards into them. Inputs are frozen and
validated when built, so a malformed value never reaches the queues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import NamedTuple

from .errors import InvalidPolicy, InvalidRequest


class Priority(str, Enum):
    """Priority classes, highest first. Each class has its own share of the capacity."""

    #: Latency-sensitive requests from people waiting for an answer.
    INTERACTIVE = "interactive"
    #: The default for API traffic.
    STANDARD = "standard"
    #: Offline work (batch files); progresses under load through its share and aging.
    BATCH = "batch"


#: Classes in rank order; a class's index here is its rank (0 is the highest).
PRIORITIES: tuple[Priority, ...] = (Priority.INTERACTIVE, Priority.STANDARD, Priority.BATCH)
RANK: dict[Priority, int] = {p: i for i, p in enumerate(PRIORITIES)}

#: Prices a request: ``(tenant, model, input_tokens, output_tokens, priority) -> cost``.
CostFn = Callable[[str, str, int, int, Priority], Decimal]


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _check_name(value: object, what: str, error: type[Exception]) -> None:
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty string, got {value!r}")


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the scheduler knows about a tenant.

    ``weight`` scales its fair share (2.0 gets twice the tokens of 1.0 under contention).
    ``budget`` caps spending per calendar month (UTC) if ``budget_calendar_month``, else
    per ``budget_period_s`` (fixed windows aligned to the epoch; ``None`` means one
    period for all time). ``requests_per_min`` and ``tokens_per_min``
    are token-bucket rate limits; ``None`` means unlimited.

    Raises:
        InvalidPolicy: on an empty name, a zero, negative or non-finite weight, a float or
            negative budget, or a non-positive period or limit.
    """

    name: str
    weight: float = 1.0
    budget: Decimal | None = None
    budget_period_s: float | None = None
    budget_calendar_month: bool = False
    requests_per_min: int | None = None
    tokens_per_min: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "tenant name", InvalidPolicy)
        if not _is_finite(self.weight) or self.weight <= 0:
            raise InvalidPolicy(f"tenant {self.name!r}: weight must be > 0, got {self.weight!r}")
        if self.budget is not None and (
            not isinstance(self.budget, Decimal) or not self.budget.is_finite() or self.budget < 0
        ):
            raise InvalidPolicy(
                f"tenant {self.name!r}: budget must be a non-negative Decimal, got {self.budget!r}"
            )
        if self.budget_period_s is not None and (
            not _is_finite(self.budget_period_s) or self.budget_period_s <= 0
        ):
            raise InvalidPolicy(f"tenant {self.name!r}: budget_period_s must be > 0")
        if self.budget_calendar_month and self.budget_period_s is not None:
            raise InvalidPolicy(
                f"tenant {self.name!r}: budget_period_s and budget_calendar_month exclude each other"
            )
        for what in ("requests_per_min", "tokens_per_min"):
            limit = getattr(self, what)
            if limit is not None and (type(limit) is not int or limit <= 0):
                raise InvalidPolicy(f"tenant {self.name!r}: {what} must be a positive int")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Tuning of the policy.

    A dispatch charges ``w_req + w_in * input_tokens + w_out * estimated_output_tokens``
    weighted tokens (``w_req`` is a per-request overhead, which keeps every charge positive
    so that no request is free). The tenant counter grows by that divided by the tenant's
    weight, the class counter by that divided by the class's share.

    Shares need not sum to 1; they are relative. Aging lowers a class's effective counter
    by ``aging_rate`` per second its oldest queued request has waited, up to
    ``max_aging_credit``; the cap keeps the shares under saturation what they say.
    An urgent tenant (a batch whose completion window is at risk) goes ahead of its
    class while it leads the least served backlogged tenant by at most ``urgency_lead``.

    Raises:
        InvalidPolicy: on a negative or non-finite weight, a share that is not > 0, a
            negative aging setting, or a negative output estimate.
    """

    w_in: float = 1.0
    w_out: float = 2.0
    w_req: float = 1.0
    interactive_share: float = 0.6
    standard_share: float = 0.3
    batch_share: float = 0.1
    aging_rate: float = 100.0
    max_aging_credit: float = 100_000.0
    default_output_estimate: int = 256
    #: how far (weighted tokens / weight) an urgent tenant may run ahead of the least
    #: served backlogged tenant of its class (see :meth:`Scheduler.set_urgent`)
    urgency_lead: float = 200_000.0

    def __post_init__(self) -> None:
        for what in ("w_in", "w_out", "w_req", "aging_rate", "max_aging_credit", "urgency_lead"):
            value = getattr(self, what)
            if not _is_finite(value) or value < 0:
                raise InvalidPolicy(f"{what} must be finite and >= 0, got {value!r}")
        for p in PRIORITIES:
            share = self.share(p)
            if not _is_finite(share) or share <= 0:
                raise InvalidPolicy(f"{p.value}_share must be > 0, got {share!r}")
        if not _is_count(self.default_output_estimate):
            raise InvalidPolicy("default_output_estimate must be an int >= 0")

    def share(self, priority: Priority) -> float:
        """The configured share of a priority class."""
        share: float = getattr(self, f"{priority.value}_share")
        return share


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """One request waiting for dispatch.

    ``estimated_output_tokens`` (default: the config's estimate, capped at
    ``max_output_tokens``) is charged to the fair-share counter at dispatch and corrected at
    completion. Budgets reserve at ``max_output_tokens``, the worst case. ``deadline`` and
    ``enqueued_at`` are seconds on the same clock as every ``now`` given to the scheduler.
    ``payload`` is opaque: the service carries its original message in it.

    Raises:
        InvalidRequest: on an empty id, tenant or model, a negative or non-int token count,
            an estimate above ``max_output_tokens``, or a non-finite time.
    """

    request_id: str
    tenant: str
    model: str
    priority: Priority
    input_tokens: int
    max_output_tokens: int
    enqueued_at: float
    estimated_output_tokens: int | None = None
    deadline: float | None = None
    payload: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.request_id, "request_id", InvalidRequest)
        _check_name(self.tenant, "tenant", InvalidRequest)
        _check_name(self.model, "model", InvalidRequest)
        if type(self.priority) is not Priority:
            try:
                object.__setattr__(self, "priority", Priority(self.priority))
            except ValueError:
                raise InvalidRequest(f"unknown priority {self.priority!r}") from None
        if not _is_count(self.input_tokens) or not _is_count(self.max_output_tokens):
            raise InvalidRequest(
                f"request {self.request_id!r}: token counts must be ints >= 0, got "
                f"input_tokens={self.input_tokens!r}, max_output_tokens={self.max_output_tokens!r}"
            )
        estimate = self.estimated_output_tokens
        if estimate is not None and (not _is_count(estimate) or estimate > self.max_output_tokens):
            raise InvalidRequest(
                f"request {self.request_id!r}: estimated_output_tokens must be an int in "
                f"[0, max_output_tokens], got {estimate!r}"
            )
        if not _is_finite(self.enqueued_at):
            raise InvalidRequest(f"request {self.request_id!r}: enqueued_at must be finite")
        if self.deadline is not None and not _is_finite(self.deadline):
            raise InvalidRequest(f"request {self.request_id!r}: deadline must be finite")


@dataclass(frozen=True, slots=True)
class Pool:
    """A worker pool asking for work: the models it serves and its free capacity now.

    ``token_budget`` optionally caps the tokens (input + estimated output) of the requests
    handed out in one call, e.g. the free KV-cache space. ``shared_slots`` caps the
    requests of the classes below interactive in one call (None: ``free_slots``): the
    rest of ``free_slots`` is the pool's interactive headroom.

    Raises:
        InvalidPolicy: on an empty name, negative slots or a negative token budget.
    """

    name: str
    models: frozenset[str]
    free_slots: int
    token_budget: int | None = None
    shared_slots: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "pool name", InvalidPolicy)
        if not isinstance(self.models, frozenset):
            models: Iterable[str] = self.models
            object.__setattr__(self, "models", frozenset(models))
        if not _is_count(self.free_slots):
            raise InvalidPolicy(f"pool {self.name!r}: free_slots must be an int >= 0")
        if self.token_budget is not None and not _is_count(self.token_budget):
            raise InvalidPolicy(f"pool {self.name!r}: token_budget must be an int >= 0")
        if self.shared_slots is not None and not _is_count(self.shared_slots):
            raise InvalidPolicy(f"pool {self.name!r}: shared_slots must be an int >= 0")


class RejectReason(str, Enum):
    """Why a request left the queue without being dispatched."""

    #: Its reservation no longer fits in the tenant's budget for the current period.
    BUDGET_EXCEEDED = "budget_exceeded"
    #: Its deadline passed while it was queued.
    DEADLINE_EXPIRED = "deadline_expired"
    #: It could not be re-admitted on restore (unknown tenant or model, duplicate id).
    INVALID = "invalid"


class Dispatch(NamedTuple):
    """A request handed to a pool, with the budget reserved for it (None: no budget)."""

    request: QueuedRequest
    reservation: Decimal | None
    #: Weighted service charged to the tenant's counter (corrected at completion).
    charge: float


class Rejection(NamedTuple):
    """A request that left the queue undispatched; the caller must report it."""

    request: QueuedRequest
    reason: RejectReason
    detail: str


class DispatchResult(NamedTuple):
    """What one :meth:`Scheduler.dispatch` call decided."""

    dispatched: list[Dispatch]
    rejected: list[Rejection]


class Completion(NamedTuple):
    """A settled request: what was reserved and what it cost (None: no budget)."""

    request: QueuedRequest
    reservation: Decimal | None
    cost: Decimal | None


class BudgetView(NamedTuple):
    """A tenant's budget in the current period."""

    limit: Decimal
    spent: Decimal
    reserved: Decimal

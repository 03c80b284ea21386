"""Small factories shared by the scheduler tests."""

from __future__ import annotations

from decimal import Decimal
from itertools import count

from tokenmill.scheduler import (
    Pool,
    Priority,
    QueuedRequest,
    Scheduler,
    SchedulerConfig,
    TenantPolicy,
)

_ids = count()

MILLI = Decimal("0.001")


def price(
    tenant: str, model: str, input_tokens: int, output_tokens: int, priority: Priority
) -> Decimal:
    """A price card: 1 milli per input token, 2 per output token; batch at half price."""
    cost = Decimal(input_tokens) * MILLI + Decimal(output_tokens) * 2 * MILLI
    return cost / 2 if priority is Priority.BATCH else cost


def req(
    tenant: str = "a",
    *,
    rid: str | None = None,
    model: str = "m",
    priority: Priority = Priority.STANDARD,
    inp: int = 10,
    out: int = 10,
    est: int | None = None,
    at: float = 0.0,
    deadline: float | None = None,
) -> QueuedRequest:
    return QueuedRequest(
        rid if rid is not None else f"r{next(_ids)}",
        tenant,
        model,
        priority,
        inp,
        out,
        at,
        est,
        deadline,
    )


def pool(slots: int, models: tuple[str, ...] = ("m",), tokens: int | None = None) -> Pool:
    return Pool("p", frozenset(models), slots, tokens)


def scheduler(
    *tenants: TenantPolicy, models: tuple[str, ...] = ("m",), config: SchedulerConfig | None = None
) -> Scheduler:
    return Scheduler(config, cost=price, tenants=tenants, models=models)


def ids(result: object) -> list[str]:
    return [d.request.request_id for d in result.dispatched]  # type: ignore[attr-defined]

"""SLA violations, published to ``tokenmill.sla-violations`` keyed by tenant.

Publication is at-least-once: a violation is sent for every violating ``finished``
event the processor handles, before the event's offset may be committed, so a replayed
event sends it again. Consumers deduplicate by ``request_id``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmill.wire import WireModel

from .sink import Recorded


class SlaViolation(WireModel):
    """A finished request that missed at least one target of its SLA class."""

    kind: Literal["sla_violation"] = "sla_violation"
    request_id: str
    tenant: str
    tier: str
    model: str
    sla_class: str
    #: the targets missed: ``ttft``, ``tpot``, ``e2e``
    missed: tuple[str, ...] = Field(min_length=1)
    queue_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float
    #: the class's targets in ms, by name
    targets: dict[str, float]
    output_tokens: int
    finished_at: float


def violation_of(rec: Recorded) -> SlaViolation | None:
    """The violation a recorded request makes, if it missed a target."""
    m, t = rec.measurement, rec.targets
    if not m.missed or t is None or rec.tier is None or rec.sla_class is None:
        return None
    ev = rec.event
    assert ev.finished_at is not None
    return SlaViolation(
        request_id=ev.request_id, tenant=ev.tenant, tier=rec.tier, model=ev.model,
        sla_class=rec.sla_class, missed=m.missed, queue_ms=m.queue_ms, ttft_ms=m.ttft_ms,
        tpot_ms=m.tpot_ms, e2e_ms=m.e2e_ms,
        targets={"ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms, "e2e_ms": t.e2e_ms},
        output_tokens=ev.completion_tokens, finished_at=ev.finished_at,
    )  # fmt: skip

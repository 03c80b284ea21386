"""SLA measurements of one finished request (pure: no I/O).

From the timestamps a ``finished`` event carries (seconds since the epoch)::

    queue wait   dispatched_at  - submitted_at
    TTFT         first_token_at - submitted_at
    end-to-end   finished_at    - submitted_at
    TPOT         (end-to-end - TTFT) / (output tokens - 1)

A request meets its SLA class when it meets every target that applies to it. A figure
that is undefined does not count against it: TPOT with fewer than two output tokens,
TTFT without a first token. Queue wait has no target; it is reported only.
"""

from __future__ import annotations

from typing import NamedTuple

from tokenmill.config import SlaClass

from tokenmill.wire import TokenEvent

#: the targets of an SLA class, in report order
TARGETS = ("ttft", "tpot", "e2e")


class Measurement(NamedTuple):
    """One request's figures in milliseconds (None: undefined) and the targets missed."""

    queue_ms: float | None
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float
    #: names from :data:`TARGETS` whose target was missed; empty when the SLA was met
    missed: tuple[str, ...]

    @property
    def met(self) -> bool:
        return not self.missed


def _ms(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else (end - start) * 1000.0


def measure(event: TokenEvent, targets: SlaClass | None) -> Measurement:
    """The figures of a ``finished`` event, judged against ``targets`` (None: no SLA
    class, nothing can be missed).

    Raises:
        ValueError: the event lacks ``submitted_at`` or ``finished_at``.
    """
    if event.submitted_at is None or event.finished_at is None:
        raise ValueError(f"request {event.request_id}: finished event without timestamps")
    e2e = (event.finished_at - event.submitted_at) * 1000.0
    ttft = _ms(event.first_token_at, event.submitted_at)
    tpot = None
    if ttft is not None and event.completion_tokens >= 2:
        tpot = (e2e - ttft) / (event.completion_tokens - 1)
    missed: list[str] = []
    if targets is not None:
        for name, value, target in (
            ("ttft", ttft, targets.ttft_ms),
            ("tpot", tpot, targets.tpot_ms),
            ("e2e", e2e, targets.e2e_ms),
        ):
            if value is not None and value > target:
                missed.append(name)
    return Measurement(
        queue_ms=_ms(event.dispatched_at, event.submitted_at),
        ttft_ms=ttft,
        tpot_ms=tpot,
        e2e_ms=e2e,
        missed=tuple(missed),
    )

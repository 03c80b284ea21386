"""SLA measurements of one finished request (pure: no I/O).

From the timestamps a ``finished`` event carries (seconds since the epoch)::

    queue wait   dispatched_at  - submitted_at
    TTFT         first_token_at - submitted_at
    end-to-end   finished_at    - submitted_at
    TPOT         (end-to-end - TTFT) / (output tokens - 1)

A request meets its SLA class when it meets every target that applies to it. A figure
that is undefined does not count against it: TPOT with fewer than two output tokens,
TTFT without a first token. Queue wait has no target; it is reported only. A
batch-class request has no latency target: it is meant to wait behind interactive work,
and its SLA is its batch's completion window (a line past it expires; ``tokenmill sla``
counts the batches completed within their windows).
"""

from __future__ import annotations

from typing import NamedTuple

from tokenmill.config import SlaClass

from tokenmill.wire import Priority, TokenEvent

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


def measure(event: TokenEvent, targets: SlaClass | None) -> Measurement:
    """The figures of a ``finished`` event, judged against ``targets`` (None: no SLA
    class, nothing can be missed).

    Raises:
        ValueError: the event lacks ``submitted_at`` or ``finished_at``.
    """
    # Straight-line arithmetic: this runs for every event of the stream.
    start, end = event.submitted_at, event.finished_at
    if start is None or end is None:
        raise ValueError(f"request {event.request_id}: finished event without timestamps")
    e2e = (end - start) * 1000.0
    first, dispatched = event.first_token_at, event.dispatched_at
    ttft = None if first is None else (first - start) * 1000.0
    tpot = None
    n = event.completion_tokens
    if ttft is not None and n >= 2:
        tpot = (e2e - ttft) / (n - 1)
    missed: tuple[str, ...] = ()
    if targets is not None and event.priority is not Priority.batch:
        late_first = ttft is not None and ttft > targets.ttft_ms
        slow = tpot is not None and tpot > targets.tpot_ms
        late = e2e > targets.e2e_ms
        if late_first or slow or late:
            missed = tuple(name for name, miss in zip(TARGETS, (late_first, slow, late)) if miss)
    queue = None if dispatched is None else (dispatched - start) * 1000.0
    return Measurement(queue, ttft, tpot, e2e, missed)

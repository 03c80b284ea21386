"""Fair-share and SLA figures of a sliding window, from the ledger's records (pure: no I/O).

The input is one :class:`Served` per request that finished in the window, made from its
SLA record and its usage record (:func:`.sla.served_requests`). The ledger stores a
request's finish time, its token counts and its end-to-end latency, queue wait and TTFT;
its other instants follow (POSIX seconds)::

    submitted    = finished - end-to-end
    dispatched   = submitted + queue wait     (the scheduler's dispatch, as reported)
    first token  = submitted + TTFT

Per priority class c, over the window (the scheduler's terms, docs/scheduler.md):

* **service** S(f, c): the weighted tokens the scheduler charges tenant f's requests of
  class c, at their actual counts: Σ (w_req + w_in·input + w_out·output);
* **received share** S(f, c) / Σ_g S(g, c);
* **entitled share** weight_f / Σ_g weight_g over the tenants *active* in c (one request
  or more of class c finished in the window);
* **normalised service** x_f = received / entitled (1: exactly its share). Under VTC a
  tenant is owed its share only while backlogged, so x_f < 1 is under-service *or* less
  demand;
* **Jain's index** (Σ x)² / (n · Σ x²) over the n active tenants of c: 1 when each got
  its entitled share, 1/n when one got everything. bench/scheduler.py's index is the same
  formula over raw service with equal weights;
* **largest service gap** of f in c: the longest interval during which f had a request
  of class c waiting (submitted, not yet dispatched) and none of f's requests of class c
  was dispatched. Computed as the union of f's waiting intervals [submitted, dispatched),
  cut at each of f's dispatch instants; the longest piece. A time, unlike
  bench/scheduler.py's gap (the spread of two tenants' weighted service, in tokens);
* **queue wait** dispatched - submitted (p50, p99); TTFT, TPOT, end-to-end p99;
* **attainment** the share of requests that met every target of their SLA class;
  **goodput** those requests per second of the window.

What the ledger does not show: requests still queued or running (a tenant starved now
shows its gap once the starved request finishes and is recorded), and the work of
cancelled or failed requests (billed as partial work, with no SLA record, so no times).
A request without a dispatch time (no queue wait recorded) counts as dispatched at its
first token, else at its finish: the nearest instant the ledger has. Tenants not in the
configuration have no weight and are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.config import Settings

#: the scheduler's per-request overhead (``SchedulerConfig.w_req``; the service keeps the default)
DEFAULT_W_REQ = 1.0


@dataclass(frozen=True, slots=True)
class Charge:
    """The scheduler's charge of a request: ``w_req + w_in·input + w_out·output``."""

    w_in: float
    w_out: float
    w_req: float = DEFAULT_W_REQ

    @classmethod
    def of_settings(cls, settings: Settings) -> Charge:
        return cls(settings.scheduler.w_in, settings.scheduler.w_out)

    def of(self, input_tokens: int, output_tokens: int) -> float:
        return self.w_req + self.w_in * input_tokens + self.w_out * output_tokens


@dataclass(frozen=True, slots=True)
class Served:
    """A request that finished, as the ledger recorded it (times in POSIX seconds)."""

    tenant: str
    priority: str
    model: str
    finished_at: float
    e2e_s: float
    queue_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    input_tokens: int
    output_tokens: int
    #: met every target of its SLA class
    met: bool

    @property
    def submitted_at(self) -> float:
        return self.finished_at - self.e2e_s

    @property
    def dispatched_at(self) -> float:
        """Its dispatch; without one, its first token, else its finish (see the module doc)."""
        start = self.submitted_at
        if self.queue_s is not None:
            return start + self.queue_s
        if self.ttft_s is not None:
            return start + self.ttft_s
        return self.finished_at


@dataclass(frozen=True, slots=True)
class TenantFigures:
    """One tenant's figures in one priority class over the window."""

    tenant: str
    priority: str
    requests: int
    #: weighted tokens charged (:class:`Charge`)
    service: float
    received_share: float
    entitled_share: float
    largest_gap_s: float
    queue_p50_s: float | None
    queue_p99_s: float | None
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    e2e_p99_s: float | None
    #: requests that met every target
    met: int
    goodput_rps: float

    @property
    def normalised(self) -> float:
        """Received over entitled share (1: exactly its share)."""
        return self.received_share / self.entitled_share

    @property
    def attainment(self) -> float:
        return self.met / self.requests


@dataclass(frozen=True, slots=True)
class Fairness:
    """The window's figures: per tenant × class, and Jain's index per class."""

    window_s: float
    tenants: list[TenantFigures]
    #: priority class → Jain's index over its active tenants
    jain: dict[str, float]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ascending values, interpolated linearly between
    closest ranks (PostgreSQL's ``percentile_cont``); None when there are none."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def jain_index(xs: Sequence[float]) -> float:
    """(Σ x)² / (n · Σ x²): in [1/n, 1], 1 when all are equal; 1 for no or all-zero values."""
    squares = sum(x * x for x in xs)
    if not xs or squares == 0.0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * squares)


def largest_gap(waits: Iterable[tuple[float, float]]) -> float:
    """The longest time some interval of ``waits`` ([submitted, dispatched) pairs of one
    tenant and class) was open with no dispatch of any of them in between."""
    spans = sorted((s, max(s, d)) for s, d in waits)  # a clock step can order them wrongly
    if not spans:
        return 0.0
    dispatches = sorted(d for _, d in spans)
    longest, i = 0.0, 0
    start, end = spans[0]
    for s, d in [*spans[1:], (float("inf"), float("inf"))]:
        if s <= end:  # overlaps (or touches) the current busy period
            end = max(end, d)
            continue
        # One busy period [start, end]: cut at every dispatch within it.
        cut = start
        while i < len(dispatches) and dispatches[i] <= end:
            if dispatches[i] > cut:
                longest = max(longest, dispatches[i] - cut)
                cut = dispatches[i]
            i += 1
        start, end = s, d
    return longest


def fairness(rows: Iterable[Served], weights: Mapping[str, float], charge: Charge,
             window_s: float) -> Fairness:  # fmt: skip
    """The figures of the module docstring for ``rows``, the requests that finished in a
    window of ``window_s`` seconds; ``weights`` are the tenants' fair-share weights."""
    groups: dict[tuple[str, str], list[Served]] = {}
    for r in rows:
        if r.tenant in weights:
            groups.setdefault((r.priority, r.tenant), []).append(r)
    service = {key: sum(charge.of(r.input_tokens, r.output_tokens) for r in rs)
               for key, rs in groups.items()}  # fmt: skip
    class_service: dict[str, float] = {}
    class_weight: dict[str, float] = {}
    for prio, tenant in groups:
        class_service[prio] = class_service.get(prio, 0.0) + service[(prio, tenant)]
        class_weight[prio] = class_weight.get(prio, 0.0) + weights[tenant]
    out = []
    for (prio, tenant), rs in sorted(groups.items()):
        met = sum(1 for r in rs if r.met)
        total = class_service[prio]
        out.append(TenantFigures(
            tenant=tenant, priority=prio, requests=len(rs), service=service[(prio, tenant)],
            received_share=service[(prio, tenant)] / total if total else 0.0,
            entitled_share=weights[tenant] / class_weight[prio],
            largest_gap_s=largest_gap((r.submitted_at, r.dispatched_at) for r in rs),
            queue_p50_s=_quantile(rs, "queue_s", 0.5), queue_p99_s=_quantile(rs, "queue_s", 0.99),
            ttft_p99_s=_quantile(rs, "ttft_s", 0.99), tpot_p99_s=_quantile(rs, "tpot_s", 0.99),
            e2e_p99_s=_quantile(rs, "e2e_s", 0.99), met=met, goodput_rps=met / window_s,
        ))  # fmt: skip
    jain = {prio: jain_index([t.normalised for t in out if t.priority == prio])
            for prio in sorted(class_service)}  # fmt: skip
    return Fairness(window_s, out, jain)


def fairness_of(rows: Iterable[Served], settings: Settings, window_s: float) -> Fairness:
    """:func:`fairness` with the configured tenants' weights and the scheduler's charge."""
    weights = {name: settings.tenant_weight(name) for name in settings.tenants}
    return fairness(rows, weights, Charge.of_settings(settings), window_s)


def _quantile(rows: Sequence[Served], figure: str, q: float) -> float | None:
    values = sorted(v for r in rows if (v := getattr(r, figure)) is not None)
    return percentile(values, q)

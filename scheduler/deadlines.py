"""Deadline planning for batches: when each batch will finish, and which need help.

A batch's ``completion_window`` is a deadline on every one of its lines. The planner
keeps, per batch, the work still queued (in *units*: a line's prompt tokens plus its
``max_tokens``, the same for queued and finished lines, so a bias in the unit cancels)
and measures each pool's throughput in those units while the pool is saturated (a
pool with free slots shows the demand, not its capacity). From them, every tick:

* ``eta_best``: the finish if the pool's batch capacity served the batches earliest
  deadline first (the order that meets every deadline that any order meets). Past the
  deadline: the batch is **at risk**; it is reported then, not found expired later. A
  batch at risk gets no precedence (it would make the batches due after it late too),
  so its work is not counted ahead of theirs.
* ``eta_fair``: the finish at the tenant's fair share of that capacity (its weight over
  the weights of the tenants with batches queued in the pool), its own batches earliest
  deadline first. Past ``deadline - margin``: the batch is **urgent**, and, unless it is
  at risk, the scheduler lets its tenant run ahead of its class (bounded: see
  ``Scheduler.set_urgent``) and the engine runs its lines first among batch work. It
  stays urgent until its last line is dispatched: help withdrawn as soon as the
  forecast recovers would leave it finishing just at its deadline, and the batch's
  results still have to be collected and its files written after that.

The batch capacity of a pool is its measured throughput times the fraction of it that
went to batch lines in the window (at least ``min_batch_fraction``, the batch class's
share under saturation). Pure: no I/O, time is an argument.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["FORECASTS_KEY", "DeadlinePlanner", "Forecast", "at_risk_by_tenant", "forecast_json"]


@dataclass
class _Batch:
    batch_id: str
    tenant: str
    pool: str
    deadline: float
    queued: int = 0
    units: float = 0.0


@dataclass
class _Throughput:
    """Units finished in a pool: all of them, and batch lines' (the current tick's)."""

    units: float = 0.0
    batch_units: float = 0.0
    #: (busy seconds, units, batch units) per saturated tick, newest last
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class Forecast:
    """Where a batch with queued lines stands (times in epoch seconds)."""

    batch_id: str
    tenant: str
    pool: str
    deadline: float
    #: lines not dispatched yet
    queued: int
    #: finish with the pool's batch capacity, earliest deadline first (None: no
    #: throughput measured yet)
    eta_best: float | None
    #: finish at the tenant's fair share of it
    eta_fair: float | None
    urgent: bool
    at_risk: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "deadline": self.deadline,
            "queued": self.queued,
            "eta_best": self.eta_best,
            "eta_fair": self.eta_fair,
            "urgent": self.urgent,
            "at_risk": self.at_risk,
        }


class DeadlinePlanner:
    """See the module docstring.

    Parameters:
        window_s: busy seconds of throughput samples kept per pool.
        margin, min_margin_s: an urgent batch's slack: urgent once its fair-share finish
            passes ``deadline - max(margin * (deadline - now), min_margin_s)``.
        min_batch_fraction: least share of a pool's throughput counted on for batches.
    """

    def __init__(
        self,
        *,
        window_s: float = 30.0,
        margin: float = 0.1,
        min_margin_s: float = 2.0,
        min_batch_fraction: float = 0.1,
    ) -> None:
        self.window_s = window_s
        self.margin = margin
        self.min_margin_s = min_margin_s
        self.min_batch_fraction = min_batch_fraction
        self._batches: dict[str, _Batch] = {}
        self._pools: dict[str, _Throughput] = {}
        #: batches found urgent once (they stay so while they have queued lines)
        self._urgent: set[str] = set()

    # -- work in and out -----------------------------------------------------------------

    def queued(self, batch_id: str, tenant: str, pool: str, deadline: float, units: float) -> None:
        """A line of ``batch_id`` joined the queue."""
        b = self._batches.get(batch_id)
        if b is None:
            b = self._batches[batch_id] = _Batch(batch_id, tenant, pool, deadline)
        b.deadline = min(b.deadline, deadline)
        b.queued += 1
        b.units += units

    def left_queue(self, batch_id: str, units: float) -> None:
        """A line left the queue (dispatched, cancelled or expired)."""
        b = self._batches.get(batch_id)
        if b is None:
            return
        b.queued -= 1
        b.units -= units
        if b.queued <= 0:
            del self._batches[batch_id]
            self._urgent.discard(batch_id)

    def finished(self, pool: str, units: float, *, batch: bool) -> None:
        """A request of ``pool`` finished (any class): throughput."""
        t = self._pools.setdefault(pool, _Throughput())
        t.units += units
        if batch:
            t.batch_units += units

    # -- the plan --------------------------------------------------------------------------

    def tick(self, dt: float, saturated: Iterable[str]) -> None:
        """Close a measuring interval of ``dt`` seconds; ``saturated``: the pools that
        were saturated through it (only their intervals measure capacity)."""
        busy = set(saturated)
        for name, t in self._pools.items():
            if name in busy and dt > 0:
                t.samples.append((dt, t.units, t.batch_units))
                total = sum(s[0] for s in t.samples)
                while t.samples and total - t.samples[0][0] >= self.window_s:
                    total -= t.samples.popleft()[0]
            t.units = t.batch_units = 0.0

    def batch_rate(self, pool: str) -> float | None:
        """Units per second a pool gives batch lines (None: not measured yet)."""
        t = self._pools.get(pool)
        if t is None or not t.samples:
            return None
        secs = sum(s[0] for s in t.samples)
        units = sum(s[1] for s in t.samples)
        if secs <= 0 or units <= 0:
            return None
        batch = sum(s[2] for s in t.samples)
        return units / secs * max(batch / units, self.min_batch_fraction)

    def forecasts(self, now: float, weight: Callable[[str], float]) -> list[Forecast]:
        """Every batch with queued lines, as of ``now``; ``weight``: a tenant's weight."""
        by_pool: dict[str, list[_Batch]] = {}
        for b in self._batches.values():
            by_pool.setdefault(b.pool, []).append(b)
        out: list[Forecast] = []
        for pool, batches in by_pool.items():
            batches.sort(key=lambda b: (b.deadline, b.batch_id))
            rate = self.batch_rate(pool)
            weights = {b.tenant: weight(b.tenant) for b in batches}
            total_weight = sum(weights.values()) or 1.0
            ahead = 0.0  # units of batches due no later, all tenants (EDF)
            own: dict[str, float] = {}  # the same, per tenant
            for b in batches:
                ahead += b.units
                own[b.tenant] = own.get(b.tenant, 0.0) + b.units
                if rate is None:
                    out.append(Forecast(b.batch_id, b.tenant, pool, b.deadline, b.queued,
                                        None, None, False, False))  # fmt: skip
                    continue
                eta_best = now + ahead / rate
                at_risk = eta_best > b.deadline
                if at_risk:
                    ahead -= b.units
                share = weights[b.tenant] / total_weight
                eta_fair = now + own[b.tenant] / (rate * share)
                slack = max(0.0, b.deadline - now)
                margin = max(self.margin * slack, self.min_margin_s)
                urgent = b.batch_id in self._urgent or eta_fair > b.deadline - margin
                if urgent:
                    self._urgent.add(b.batch_id)
                out.append(Forecast(b.batch_id, b.tenant, pool, b.deadline, b.queued,
                                    eta_best, eta_fair, urgent, at_risk))  # fmt: skip
        return out


#: Redis hash: batch id -> its :class:`Forecast` (``to_dict`` JSON), written by the
#: scheduler leader every half second for the batches with queued lines
FORECASTS_KEY = "tokenmill:scheduler:batch-forecasts"


def at_risk_by_tenant(published: Mapping[bytes, bytes]) -> dict[str, int]:
    """Batches forecast to miss their windows now, per tenant (``published``: the
    :data:`FORECASTS_KEY` hash)."""
    out: dict[str, int] = {}
    for raw in published.values():
        doc = json.loads(raw)
        if doc.get("at_risk"):
            out[doc["tenant"]] = out.get(doc["tenant"], 0) + 1
    return out


def forecast_json(raw: bytes | str | None) -> dict[str, object] | None:
    """A batch's published forecast as its batch object shows it (None: none)."""
    if not raw:
        return None
    doc = json.loads(raw)
    eta = doc.get("eta_best")
    return {
        "estimated_completion_at": None if eta is None else int(eta),
        "at_risk": bool(doc.get("at_risk")),
        "urgent": bool(doc.get("urgent")),
        "queued_requests": int(doc.get("queued", 0)),
    }

"""What the scheduler must persist to come back after a restart.

Queued requests are not in it: they are re-read from the request topics. The snapshot
holds the counters (so fairness resumes where it stopped instead of starting from zero),
rate-limit levels and the requests in flight (so their completions settle their
reservations). Budget spending is not in it: it is the ledger's (:mod:`.spending`). :meth:`SchedulerSnapshot.to_dict` gives JSON-safe data (money as
strings); :meth:`SchedulerSnapshot.from_dict` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import InvalidPolicy
from .types import Priority, QueuedRequest

if TYPE_CHECKING:
    from .tenant_queue import RequestEntry

FORMAT_VERSION = 2
#: versions read back (1 also held budget spending, now ignored: the ledger has it)
_READABLE = (1, 2)

RateLevels = tuple[float | None, float | None, float | None, float | None]

_REQUEST_FIELDS = (
    "request_id",
    "tenant",
    "model",
    "input_tokens",
    "max_output_tokens",
    "enqueued_at",
    "estimated_output_tokens",
    "deadline",
)


@dataclass(frozen=True, slots=True)
class InFlightRecord:
    """A dispatched request and what it was charged (its payload is not kept)."""

    request: QueuedRequest
    estimate: int
    tokens: float
    weight: float
    reservation: Decimal | None

    @classmethod
    def of(cls, entry: RequestEntry) -> InFlightRecord:
        return cls(entry.request, entry.estimate, entry.tokens, entry.weight, entry.reservation)

    def to_dict(self) -> dict[str, Any]:
        req = {name: getattr(self.request, name) for name in _REQUEST_FIELDS}
        req["priority"] = self.request.priority.value
        return {
            "request": req,
            "estimate": self.estimate,
            "tokens": self.tokens,
            "weight": self.weight,
            "reservation": None if self.reservation is None else str(self.reservation),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InFlightRecord:
        req = dict(data["request"])
        req["priority"] = Priority(req["priority"])
        reservation = data["reservation"]
        return cls(
            QueuedRequest(**req),
            int(data["estimate"]),
            float(data["tokens"]),
            float(data["weight"]),
            None if reservation is None else Decimal(reservation),
        )


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """Counters, rate-limit levels and in-flight requests of a scheduler."""

    #: tenant -> class value -> (virtual token counter, dispatch count at its last
    #: dispatch); tenants never served in a class are omitted.
    tenant_counters: dict[str, dict[str, tuple[float, int]]]
    #: class value -> class service counter.
    class_counters: dict[str, float]
    #: class value -> counter of the tenant that last left the class's backlog.
    tenant_floors: dict[str, float]
    #: class value -> when it last got a dispatch or became backlogged (aging).
    class_waiting_since: dict[str, float]
    #: Counter of the class that last left the whole backlog.
    class_floor: float
    #: Requests dispatched so far (orders ties between tenants).
    dispatches: int
    #: tenant -> (request bucket level, stamp, token bucket level, stamp).
    rate_limits: dict[str, RateLevels]
    in_flight: tuple[InFlightRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "tenant_counters": self.tenant_counters,
            "class_counters": self.class_counters,
            "tenant_floors": self.tenant_floors,
            "class_waiting_since": self.class_waiting_since,
            "class_floor": self.class_floor,
            "dispatches": self.dispatches,
            "rate_limits": {k: list(v) for k, v in self.rate_limits.items()},
            "in_flight": [r.to_dict() for r in self.in_flight],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerSnapshot:
        """Read :meth:`to_dict` output back.

        Raises:
            InvalidPolicy: unknown format version or malformed data.
        """
        if data.get("version") not in _READABLE:
            raise InvalidPolicy(f"unsupported snapshot version {data.get('version')!r}")
        try:
            return cls(
                tenant_counters={
                    t: {c: (float(v[0]), int(v[1])) for c, v in per.items()}
                    for t, per in data["tenant_counters"].items()
                },
                class_counters={c: float(v) for c, v in data["class_counters"].items()},
                tenant_floors={c: float(v) for c, v in data["tenant_floors"].items()},
                class_waiting_since={c: float(v) for c, v in data["class_waiting_since"].items()},
                class_floor=float(data["class_floor"]),
                dispatches=int(data["dispatches"]),
                rate_limits={t: (v[0], v[1], v[2], v[3]) for t, v in data["rate_limits"].items()},
                in_flight=tuple(InFlightRecord.from_dict(r) for r in data["in_flight"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidPolicy(f"malformed scheduler snapshot: {exc}") from exc

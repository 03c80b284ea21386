"""Per-tenant spending budgets, reserved before dispatch and settled at completion.

Invariant, per budget period: ``spent + reserved <= limit`` after every dispatch. A dispatch
reserves the request's worst-case cost (its prompt tokens plus ``max_output_tokens``) and
goes ahead only if it fits beside everything already reserved; completion swaps the
reservation for the actual cost. That is no larger as long as the declared prompt count is
an upper bound of the engine's (``tokenmill.tokens`` makes it exact for sim and vLLM
models, an upper bound for remote ones) and no dearer price card starts while the request
is in flight. Then concurrent requests cannot overshoot, however many are in flight.
``spent`` itself is read from the ledger by the service (:mod:`.spending`). Money is
``Decimal`` throughout.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from enum import IntEnum

ZERO = Decimal(0)


def month_index(now: float) -> int:
    """Calendar months (UTC) since January 1970: the index of the month ``now`` is in,
    the same months the ledger's invoices cover."""
    at = datetime.fromtimestamp(now, UTC)
    return (at.year - 1970) * 12 + at.month - 1


class BudgetCheck(IntEnum):
    """Outcome of asking whether a reservation fits."""

    #: Fits now.
    OK = 0
    #: Fits once in-flight reservations settle; keep the request queued.
    HOLD = 1
    #: Does not fit this period even if everything in flight turns out free.
    REJECT = 2


class Budget:
    """Spending of one tenant: a limit per calendar month (UTC), per fixed period of
    ``period_s`` seconds (aligned to the epoch), or for ever.

    Reservations made in one period and settled in the next are carried over: the new
    period starts with ``spent = 0`` and the old reservations still held, so the invariant
    holds in every period.
    """

    __slots__ = ("calendar_month", "limit", "period", "period_s", "reserved", "spent")

    def __init__(
        self, limit: Decimal, period_s: float | None, *, calendar_month: bool = False
    ) -> None:
        self.limit = limit
        self.period_s = period_s
        self.calendar_month = calendar_month
        self.period: int | None = None
        self.spent = ZERO
        self.reserved = ZERO

    def roll(self, now: float) -> None:
        """Start a new period if ``now`` lies past the current one (time never goes back)."""
        if self.calendar_month:
            index = month_index(now)
        elif self.period_s is None:
            return
        else:
            index = math.floor(now / self.period_s)
        if self.period is None:
            self.period = index
        elif index > self.period:
            self.period = index
            self.spent = ZERO

    def available(self, now: float) -> Decimal:
        """What the current period has left once settled spending is subtracted."""
        self.roll(now)
        return self.limit - self.spent

    def check(self, now: float, amount: Decimal) -> BudgetCheck:
        """Whether reserving ``amount`` now keeps ``spent + reserved <= limit``."""
        self.roll(now)
        if self.spent + amount > self.limit:
            return BudgetCheck.REJECT
        if self.spent + self.reserved + amount > self.limit:
            return BudgetCheck.HOLD
        return BudgetCheck.OK

    def reserve(self, amount: Decimal) -> None:
        self.reserved += amount

    def release(self, amount: Decimal) -> None:
        self.reserved -= amount

    def settle(self, now: float, reserved: Decimal, cost: Decimal) -> None:
        """Swap a reservation for the actual cost, in the period current at ``now``."""
        self.roll(now)
        self.reserved -= reserved
        self.spent += cost

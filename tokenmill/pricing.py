"""Pricing: the one function that turns tokens into money.

The scheduler's budget reservations and the ledger's billing both pick the card with
:class:`PriceBook` and price with :func:`cost`, so a reservation settled at completion
equals the ledger entry.

Rounding rule (stated once): a request's cost is exact. A price card's prices, and
the same prices after its batch discount, have at most 4 decimal places per million
tokens (checked when the config loads), so every cost is a whole multiple of
``COST_QUANTUM`` (10⁻¹⁰ of the currency unit, the ledger's precision) and the
quantize below never rounds. Only invoices round, half-even to the cent, showing
the difference (see ``tokenmill.ledger.money``).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Generic, Protocol, TypeVar

from .wire import Priority


class Prices(Protocol):
    """A price card: config's :class:`~tokenmill.config.PriceCard` or a ledger version."""

    @property
    def input_per_million(self) -> Decimal: ...
    @property
    def output_per_million(self) -> Decimal: ...
    @property
    def batch_discount(self) -> Decimal: ...


class DatedPrices(Prices, Protocol):
    """A price card version: its model and the instant it is in force from."""

    @property
    def model(self) -> str: ...
    @property
    def effective_from(self) -> datetime: ...


CardT = TypeVar("CardT", bound=DatedPrices)

#: timestamps from here on (the year 2242; inf, nan) take the datetime path, which
#: refuses what is not a time
_FAR_FUTURE = 2.0**33


class PriceBook(Generic[CardT]):
    """Price card versions by model: the one lookup of the version in force at an
    instant, used by the scheduler (config cards), the ledger sink and invoices (stored
    versions) alike, so they can never pick different cards.

    A version is in force from its ``effective_from`` (inclusive) until the next
    version of its model starts.

    Raises:
        ValueError: two versions of a model start at the same instant.
    """

    def __init__(self, cards: Iterable[CardT]) -> None:
        by_model: dict[str, list[CardT]] = {}
        for card in cards:
            by_model.setdefault(card.model, []).append(card)
        self._starts: dict[str, list[datetime]] = {}
        self._cards: dict[str, list[CardT]] = {}
        #: model → its latest version and that version's start as a timestamp
        self._latest: dict[str, tuple[CardT, float]] = {}
        for model, versions in by_model.items():
            versions.sort(key=lambda c: c.effective_from)
            starts = [c.effective_from for c in versions]
            for a, b in itertools.pairwise(starts):
                if a == b:
                    raise ValueError(
                        f"two price cards for model {model!r} start at {a.isoformat()}"
                    )
            self._starts[model], self._cards[model] = starts, versions
            self._latest[model] = (versions[-1], starts[-1].timestamp())

    def in_force(self, model: str, at: datetime) -> CardT | None:
        """The version of ``model`` in force at ``at`` (the latest that started at or
        before it); None if none had started (or the model has no card)."""
        starts = self._starts.get(model)
        if starts is None:
            return None
        i = bisect.bisect_right(starts, at)
        return self._cards[model][i - 1] if i else None

    def in_force_at(self, model: str, ts: float) -> CardT | None:
        """:meth:`in_force` at the POSIX timestamp ``ts`` (``datetime.fromtimestamp(ts,
        UTC)``), without making the datetime where the latest version clearly applies:
        the ledger sink asks this once per event.

        Raises:
            ValueError, OverflowError, OSError: ``ts`` is not a time (nan, inf, huge).
        """
        latest = self._latest.get(model)
        # A timestamp a whole 10 µs past the latest start is past it also once rounded
        # to the microsecond (a timestamp's ulp is ~0.2 µs); closer: decide exactly.
        if latest is not None and latest[1] + 1e-5 <= ts < _FAR_FUTURE:
            return latest[0]
        return self.in_force(model, datetime.fromtimestamp(ts, UTC))

    def versions(self, model: str) -> tuple[CardT, ...]:
        """Every version of ``model``, oldest first."""
        return tuple(self._cards.get(model, ()))


COST_QUANTUM = Decimal("1e-10")
CENT = Decimal("0.01")
_MILLION = Decimal(1_000_000)


def cost(card: Prices, prompt_tokens: int, completion_tokens: int, priority: Priority) -> Decimal:
    """Cost of one request under ``card``; batch-priority requests get the batch discount.

    Raises:
        ValueError: a negative token count.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be non-negative")
    factor = Decimal(1) - card.batch_discount if priority is Priority.batch else Decimal(1)
    amount = (
        card.input_per_million * factor * prompt_tokens
        + card.output_per_million * factor * completion_tokens
    ) / _MILLION
    return amount.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)

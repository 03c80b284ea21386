"""Charges in whole ledger units (10⁻¹⁰ of the currency), with integer arithmetic.

:func:`tokenmill.pricing.cost` is the one definition of a charge; it takes ~2 µs of
Decimal arithmetic per event. A price card's per-token rates, as ``cost`` computes them
(the price times the batch factor, over a million), are whole multiples of 10⁻¹⁰ for
every card the config accepts (at most 4 decimal places per million tokens), so a
charge is ``input_rate * prompt_tokens + output_rate * completion_tokens`` units:
exact integer arithmetic, no rounding anywhere.

Equal to ``cost`` by construction wherever it is used (and property-tested against
it): :class:`Rates` exist only for cards whose rates are whole units, and
:meth:`Rates.units` answers only where every step of ``cost``'s Decimal arithmetic is
exact in the current context (so ``cost`` rounds nothing and raises nothing);
otherwise it returns None and the caller uses ``cost`` itself.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import NamedTuple

from tokenmill.pricing import Prices
from tokenmill.wire import Priority

#: ledger units per currency unit (tokenmill.pricing.COST_QUANTUM is 10⁻¹⁰)
UNITS_EXPONENT = 10
_MILLION_EXPONENT = 6
#: exponent differences beyond which no fast path is attempted (cost would round)
_MAX_ALIGN = 28


class Rates(NamedTuple):
    """One card's exact per-token rates at one priority, in ledger units."""

    input_units: int
    output_units: int
    #: the Decimal coefficients of ``cost``'s two products, aligned to a common exponent:
    #: ``cost`` is exact while ``input_align * prompt + output_align * completion`` has
    #: at most the context's precision in digits
    input_align: int
    output_align: int

    def units(self, prompt_tokens: int, completion_tokens: int, limit: int) -> int | None:
        """The charge in ledger units, or None where ``cost`` must decide (negative
        counts, which it refuses, or a product too long for ``limit`` = 10**precision)."""
        if prompt_tokens < 0 or completion_tokens < 0:
            return None
        if self.input_align * prompt_tokens + self.output_align * completion_tokens >= limit:
            return None
        units = self.input_units * prompt_tokens + self.output_units * completion_tokens
        return units if units < limit else None


def rates_for(card: Prices, priority: Priority) -> Rates | None:
    """The exact rates of ``card`` at ``priority``, or None if ``cost`` would not give
    whole ledger units for some token counts (then use ``cost``)."""
    # The same operations as tokenmill.pricing.cost, in the current context.
    factor = Decimal(1) - card.batch_discount if priority is Priority.batch else Decimal(1)
    per_million = (card.input_per_million * factor, card.output_per_million * factor)
    # -0 too is left to cost: its charges are -0E-10, whose sign whole units cannot carry
    if not all(p.is_finite() and p >= 0 and not p.is_signed() for p in per_million):
        return None
    units = [p.scaleb(UNITS_EXPONENT - _MILLION_EXPONENT) for p in per_million]
    if any(u != u.to_integral_value() for u in units):
        return None
    exponents = [int(p.as_tuple().exponent) for p in per_million]
    common = min(exponents)
    if max(exponents) - common > _MAX_ALIGN:
        return None
    coefficients = [int(p.scaleb(-e)) for p, e in zip(per_million, exponents)]
    align = [c * 10 ** (e - common) for c, e in zip(coefficients, exponents)]
    return Rates(int(units[0]), int(units[1]), align[0], align[1])


def units_to_decimal(units: int) -> Decimal:
    """``units`` ledger units as the Decimal ``cost`` returns (exponent -10)."""
    return Decimal(units).scaleb(-UNITS_EXPONENT)


def precision_limit() -> int:
    """10 ** the current Decimal precision (see :meth:`Rates.units`)."""
    return 10 ** decimal.getcontext().prec  # type: ignore[no-any-return]

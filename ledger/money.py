"""Money arithmetic and the ledger's one rounding rule.

1. **Stored amounts are exact to 10 decimal places** (1e-10 of the currency unit) on
   both databases (see :class:`~.types.ExactDecimal`). A charge is computed once, by
   :func:`tokenmill.pricing.cost` (the same function prices the scheduler's budget
   reservations); price cards are validated so that it never needs to round.
   Nothing rounds an amount that is stored: :func:`exact` (used for stored price
   cards) and the sink's encoder refuse one with more places.
2. **Sums are exact**: spend and invoice totals are plain sums of stored amounts.
3. **Only invoices round to the currency's minor unit** (cents, for USD), half-even:
   each line once, and the total once, from the exact total. The difference between
   the rounded total and the sum of the rounded lines is shown as the invoice's
   ``rounding_adjustment``, so the printed lines plus the adjustment equal the
   printed total, and the printed total is the exact total rounded.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

from tokenmill.errors import LedgerError

SCALE = 10
QUANTUM = Decimal(1).scaleb(-SCALE)
#: amounts must stay below this (NUMERIC(20,10)); SQLite's int64 of 1e-10 units caps
#: one stored value (and any sum) at about 9.2e8 currency units
LIMIT = Decimal(10) ** 10
ZERO = QUANTUM * 0
#: decimal places of currencies that are not in cents (ISO 4217 minor units)
MINOR_UNITS = {"JPY": 0, "KRW": 0, "BHD": 3, "KWD": 3}


def exact(amount: Decimal) -> Decimal:
    """``amount`` at the ledger's scale, refusing anything that would need rounding.

    Raises:
        LedgerError: not a Decimal (floats are never money), more than 10 decimal
            places, not finite, or too large.
    """
    if not isinstance(amount, Decimal):
        raise LedgerError(f"money must be a Decimal, not {type(amount).__name__} {amount!r}")
    if not amount.is_finite() or abs(amount) >= LIMIT:
        raise LedgerError(f"amount {amount} is out of range")
    quantized = amount.quantize(QUANTUM)
    if quantized != amount:
        raise LedgerError(f"amount {amount} has more than {SCALE} decimal places")
    return quantized


def to_minor_unit(amount: Decimal, currency: str = "USD") -> Decimal:
    """``amount`` rounded half-even to the currency's minor unit (cents for USD)."""
    places = MINOR_UNITS.get(currency.upper(), 2)
    with localcontext() as ctx:
        ctx.prec = 50
        return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)

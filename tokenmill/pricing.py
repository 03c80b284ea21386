"""Pricing: the one function that turns tokens into money.

The scheduler's budget reservations and the ledger's billing both call
:func:`cost`, so a reservation settled at completion equals the ledger entry.

Rounding rule (stated once): a request's cost is exact. Price cards allow at most
6 decimal places per million tokens and 4 for the batch discount, so every cost is a
whole multiple of ``COST_QUANTUM`` (10⁻¹⁶ of the currency unit) and the quantize
below never rounds. Only an invoice's displayed total is rounded, half-even to the
cent; the exact sum stays in the ledger.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from .config.models import PriceCard
from .wire import Priority

COST_QUANTUM = Decimal("1e-16")
CENT = Decimal("0.01")
_MILLION = Decimal(1_000_000)


def cost(card: PriceCard, prompt_tokens: int, completion_tokens: int, priority: Priority) -> Decimal:
    """Cost of one request under ``card``; batch-priority requests get the batch discount.

    Raises:
        ValueError: a negative token count.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be non-negative")
    amount = (
        card.input_per_million * prompt_tokens + card.output_per_million * completion_tokens
    ) / _MILLION
    if priority is Priority.batch:
        amount *= Decimal(1) - card.batch_discount
    return amount.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)

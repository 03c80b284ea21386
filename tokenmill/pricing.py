"""Pricing: the one function that turns tokens into money.

The scheduler's budget reservations and the ledger's billing both call
:func:`cost`, so a reservation settled at completion equals the ledger entry.

Rounding rule (stated once): costs are exact ``Decimal`` values quantized to
``COST_QUANTUM`` (10⁻¹⁰ of the currency unit) with ROUND_HALF_EVEN; prices per
million tokens with up to 4 decimals times token counts never need more, so in
practice no rounding happens at all. Invoices round only their totals to cents.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from .config.models import PriceCard
from .wire import Priority

COST_QUANTUM = Decimal("1e-10")
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

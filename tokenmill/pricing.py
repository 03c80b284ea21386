"""Pricing: the one function that turns tokens into money.

The scheduler's budget reservations and the ledger's billing both call
:func:`cost`, so a reservation settled at completion equals the ledger entry.

Rounding rule (stated once): a request's cost is exact. A price card's prices, and
the same prices after its batch discount, have at most 4 decimal places per million
tokens (checked when the config loads), so every cost is a whole multiple of
``COST_QUANTUM`` (10⁻¹⁰ of the currency unit, the ledger's precision) and the
quantize below never rounds. Only invoices round, half-even to the cent, showing
the difference (see ``tokenmill.ledger.money``).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from .wire import Priority


class Prices(Protocol):
    """A price card: config's :class:`~tokenmill.config.PriceCard` or a ledger version."""

    @property
    def input_per_million(self) -> Decimal: ...
    @property
    def output_per_million(self) -> Decimal: ...
    @property
    def batch_discount(self) -> Decimal: ...

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

"""Pricing is exact Decimal arithmetic; the batch discount applies only to batch priority."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import PriceCard
from tokenmill.pricing import cost
from tokenmill.wire import Priority

prices = st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


def card(pin: Decimal, pout: Decimal, discount: Decimal = Decimal("0.5")) -> PriceCard:
    return PriceCard(model="m", effective_from=datetime(2026, 1, 1, tzinfo=timezone.utc),
                     input_per_million=pin, output_per_million=pout, batch_discount=discount)


@settings(max_examples=200, deadline=None)
@given(pin=prices, pout=prices, p=st.integers(0, 10**7), c=st.integers(0, 10**7))
def test_cost_is_exact_and_additive(pin: Decimal, pout: Decimal, p: int, c: int) -> None:
    k = card(pin, pout)
    total = cost(k, p, c, Priority.standard)
    assert total == (pin * p + pout * c) / 1_000_000  # no rounding was needed
    assert cost(k, p, 0, Priority.standard) + cost(k, 0, c, Priority.standard) == total
    assert cost(k, p, c, Priority.batch) * 2 == total
    assert cost(k, p, c, Priority.interactive) == total


def test_known_figure() -> None:
    k = card(Decimal("0.20"), Decimal("0.80"))
    assert cost(k, 1000, 500, Priority.standard) == Decimal("0.0006")
    assert cost(k, 1000, 500, Priority.batch) == Decimal("0.0003")


cents = st.decimals(min_value=0, max_value=1000, places=2, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(pin=cents, pout=cents, d=st.decimals(0, 1, places=2), p=st.integers(0, 10**7),
       c=st.integers(0, 10**7))
def test_discounted_cost_never_rounds(pin: Decimal, pout: Decimal, d: Decimal, p: int, c: int) -> None:
    exact = (pin * p + pout * c) / 1_000_000 * (1 - d)
    got = cost(card(pin, pout, d), p, c, Priority.batch)
    assert got == exact and got.as_tuple().exponent >= -10


@pytest.mark.parametrize(
    ("pin", "discount", "what"),
    [("0.00001", "0", "input_per_million"), ("0.0001", "0.5", "input_per_million after batch_discount")],
)
def test_cards_that_would_round_are_refused(pin: str, discount: str, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        card(Decimal(pin), Decimal(1), Decimal(discount))


def test_negative_tokens_refused() -> None:
    with pytest.raises(ValueError):
        cost(card(Decimal(1), Decimal(1)), -1, 0, Priority.standard)

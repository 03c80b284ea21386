"""Pricing is exact Decimal arithmetic; the batch discount applies only to batch priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.config import PriceCard

from tokenmill.pricing import PriceBook, cost
from tokenmill.wire import Priority

prices = st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


def card(pin: Decimal, pout: Decimal, discount: Decimal = Decimal("0.5")) -> PriceCard:
    return PriceCard(model="m", effective_from=datetime(2026, 1, 1, tzinfo=UTC),
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


# -- PriceBook: the one lookup of the card in force -----------------------------------

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def dated(model: str, start: datetime, pin: int = 1) -> PriceCard:
    return PriceCard(model=model, effective_from=start, input_per_million=Decimal(pin),
                     output_per_million=Decimal(1))


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=8, unique=True),
       probe=st.integers(-2 * 10**6, 2 * 10**6))
def test_book_finds_the_latest_started_card(offsets: list[int], probe: int) -> None:
    cards = [dated("m", BASE + timedelta(microseconds=o), i) for i, o in enumerate(offsets)]
    book = PriceBook([*cards, dated("other", BASE - timedelta(days=9))])
    at = BASE + timedelta(microseconds=probe)
    started = [c for c in cards if c.effective_from <= at]
    expected = max(started, key=lambda c: c.effective_from) if started else None
    assert book.in_force("m", at) == expected
    assert book.in_force_at("m", at.timestamp()) == book.in_force(
        "m", datetime.fromtimestamp(at.timestamp(), UTC))
    assert book.versions("m") == tuple(sorted(cards, key=lambda c: c.effective_from))


def test_book_by_timestamp_is_exact_at_the_microsecond() -> None:
    start = datetime(2026, 11, 3, 12, 0, 0, 123457, tzinfo=UTC)
    old, new = dated("m", BASE, 1), dated("m", start, 2)
    book = PriceBook([new, old])
    t = start.timestamp()
    for delta in (-1e-3, -2e-5, -1e-5, -1e-6, -6e-7, -5e-7, -4e-7, -1e-7, 0.0, 1e-7, 4e-7, 5e-7,
                  6e-7, 1e-6, 9.99e-6, 1e-5, 1.01e-5, 2e-5, 1e-3, 1e6):  # fmt: skip
        expected = book.in_force("m", datetime.fromtimestamp(t + delta, UTC))
        assert book.in_force_at("m", t + delta) is expected, delta
    assert book.in_force_at("m", t - 1e-6) is old and book.in_force_at("m", t) is new


def test_book_answers_none_before_any_card_and_refuses_what_is_not_a_time() -> None:
    book = PriceBook([dated("m", BASE)])
    assert book.in_force("m", BASE - timedelta(microseconds=1)) is None
    assert book.in_force("unknown", BASE) is None and book.in_force_at("unknown", 2e9) is None
    for ts in (float("inf"), float("nan"), 1e300):
        with pytest.raises((ValueError, OverflowError, OSError)):
            book.in_force_at("m", ts)


def test_book_refuses_two_cards_starting_together() -> None:
    with pytest.raises(ValueError, match="two price cards for model 'm'"):
        PriceBook([dated("m", BASE, 1), dated("m", BASE, 2)])


def test_settings_refuse_two_cards_starting_together(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.config import EXAMPLE_CONFIG, Settings

    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    cards = [dated("sim", BASE, 1), dated("smollm2", BASE), dated("sim", BASE, 2)]
    with pytest.raises(ValueError, match=r"price_cards\.2: same model and effective_from as price_cards\.0"):
        Settings(price_cards=cards)

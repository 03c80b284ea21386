"""The integer pricing of the stream processors (``ledger.streams.rates``) equals
:func:`tokenmill.pricing.cost` wherever it answers, and the sink's rows are the same
with it as without it."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import pytest
import streams_helpers as st
from hypothesis import assume, given
from hypothesis import strategies as hs
from tokenmill.ledger.streams import LedgerSink
from tokenmill.ledger.streams import sink as sink_module
from tokenmill.ledger.streams.decode import parse
from tokenmill.ledger.streams.rates import precision_limit, rates_for, units_to_decimal

from tokenmill import pricing
from tokenmill.wire import Priority, TokenEvent


@dataclass(frozen=True)
class Card:
    input_per_million: Decimal
    output_per_million: Decimal
    batch_discount: Decimal


def _decimals(places: int, most: int = 20) -> hs.SearchStrategy[Decimal]:
    """Prices as the config and the ledger hold them: up to ``places`` decimal places,
    sometimes with trailing zeros (as read back from a NUMERIC(…, 10) column), to at
    most ``most`` places."""
    plain = hs.decimals(min_value=0, max_value=10**6, places=places, allow_nan=False)
    padded = hs.tuples(plain, hs.integers(0, 12)).map(lambda p: p[0].quantize(
        Decimal(1).scaleb(-min(places + p[1], most))))  # fmt: skip
    return hs.one_of(plain, padded)


ODD = hs.sampled_from([Decimal("0E-40"), Decimal("-0"), Decimal("1E+30"), Decimal("1E-12"),
                       Decimal("-0.5"), Decimal("NaN"), Decimal("Infinity"),
                       Decimal("123456789012345678901234567.8")])  # fmt: skip
PRICES = hs.one_of(_decimals(4), _decimals(8), ODD)
DISCOUNTS = hs.one_of(hs.decimals(min_value=0, max_value=1, places=2), ODD)
TOKENS = hs.one_of(hs.integers(0, 10**6), hs.integers(-5, 10**30))


def _cost(card: Card, pt: int, ct: int, priority: Priority) -> Decimal | type[Exception]:
    try:
        return pricing.cost(card, pt, ct, priority)
    except (ValueError, InvalidOperation) as exc:
        return type(exc)


@given(inp=PRICES, out=PRICES, discount=DISCOUNTS, pt=TOKENS, ct=TOKENS,
       priority=hs.sampled_from(list(Priority)))  # fmt: skip
def test_integer_pricing_equals_cost_wherever_it_answers(
    inp: Decimal, out: Decimal, discount: Decimal, pt: int, ct: int, priority: Priority
) -> None:
    card = Card(inp, out, discount)
    try:
        rates = rates_for(card, priority)
    except InvalidOperation:  # a NaN or infinite discount: cost refuses the card too
        assert _cost(card, pt, ct, priority) is InvalidOperation
        return
    units = None if rates is None else rates.units(pt, ct, precision_limit())
    if units is None:
        return  # the sink uses cost itself
    expected = _cost(card, pt, ct, priority)
    assert isinstance(expected, Decimal)
    got = units_to_decimal(units)
    assert got == expected and got.as_tuple() == expected.as_tuple()


# At most 10 places: the sink prices with cards read back from the ledger (scale 10).
# With more trailing zeros (e.g. 2291.4907000000000000) a product can exceed the
# context's 28 digits, and the fast path rightly leaves such a charge to cost.
@given(inp=_decimals(4, most=10), out=_decimals(4, most=10),
       discount=hs.sampled_from([Decimal(0), Decimal("0.5"), Decimal("0.25"), Decimal("0.2")]),
       pt=hs.integers(0, 10**9), ct=hs.integers(0, 10**9),
       priority=hs.sampled_from(list(Priority)))  # fmt: skip
def test_integer_pricing_answers_for_every_card_the_config_accepts(
    inp: Decimal, out: Decimal, discount: Decimal, pt: int, ct: int, priority: Priority
) -> None:
    # the config refuses a card whose discounted prices have more than 4 decimal places
    assume(all((p * (1 - discount)).scaleb(4) % 1 == 0 for p in (inp, out)))
    rates = rates_for(Card(inp, out, discount), priority)
    assert rates is not None and rates.units(pt, ct, precision_limit()) is not None


def test_cards_without_whole_unit_rates_are_left_to_cost() -> None:
    odd = Card(Decimal("0.00001"), Decimal(1), Decimal(0))  # 10^-11 per token
    assert rates_for(odd, Priority.standard) is None
    half = Card(Decimal("0.0001"), Decimal(1), Decimal("0.5"))  # 0.00005 after discount
    assert rates_for(half, Priority.batch) is None
    assert rates_for(half, Priority.standard) is not None


@pytest.mark.parametrize("n", [300])
def test_sink_plans_the_same_rows_with_and_without_integer_pricing(
    sink: LedgerSink, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    events = [parse(st.encode(e)) for e in st.mixed_events(n, prefix="eq")]
    assert all(isinstance(e, TokenEvent) for e in events)
    fast = sink.plan(events)  # type: ignore[arg-type]
    assert all(rec.units is not None for _, rec in fast.planned)
    monkeypatch.setattr(sink_module, "rates_for", lambda card, priority: None)
    sink._rates.clear()
    slow = sink.plan(events)  # type: ignore[arg-type]
    assert all(rec.units is None for _, rec in slow.planned)
    assert fast.rows == slow.rows
    assert [(i, r.cost, r.cost.as_tuple()) for i, r in fast.planned] == [
        (i, r.cost, r.cost.as_tuple()) for i, r in slow.planned
    ]

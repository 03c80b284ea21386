"""Pure parts of the scheduler service: the settle pre-filter and price-card lookup."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from tokenmill import wire
from tokenmill.config.models import PriceCard
from tokenmill.config.settings import Settings
from tokenmill.errors import ConfigError
from tokenmill.scheduler.service import _NOT_TERMINAL

text = st.text(max_size=40)


@given(
    kind=st.sampled_from(list(wire.EventKind)),
    rid=text.filter(bool), tenant=text.filter(bool), reason=st.none() | text, custom=st.none() | text,
)
def test_the_settle_prefilter_skips_exactly_the_non_terminal_events(
    kind: wire.EventKind, rid: str, tenant: str, reason: str | None, custom: str | None
) -> None:
    # Adversarial string fields may spell out another kind; only the real one counts.
    ev = wire.TokenEvent(kind=kind, request_id=rid, tenant=tenant, model="m", reason=reason,
                         custom_id=custom)
    raw = ev.to_bytes()
    assert any(m in raw for m in _NOT_TERMINAL) is (not kind.is_terminal)


@given(offsets=st.lists(st.integers(-1000, 1000), min_size=1, max_size=8, unique=True),
       probe=st.integers(-1100, 1100))
def test_price_card_is_the_latest_started(offsets: list[int], probe: int) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    cards = [
        PriceCard(model="m", effective_from=base + timedelta(days=d),
                  input_per_million=Decimal(i + 1), output_per_million=Decimal(1))
        for i, d in enumerate(offsets)
    ]
    settings = Settings.model_construct(price_cards=cards)
    at = base + timedelta(days=probe)
    in_force = [c for c in cards if c.effective_from <= at]
    if not in_force:
        try:
            settings.price_card("m", at)
        except ConfigError:
            return
        raise AssertionError("a card before any started")
    assert settings.price_card("m", at) == max(in_force, key=lambda c: c.effective_from)


def test_configured_budgets_run_per_calendar_day_or_month() -> None:
    from tokenmill.config.models import Budget, BudgetPeriod
    from tokenmill.config.settings import load_settings
    from tokenmill.scheduler.service import build_policy

    settings = load_settings()
    alpha = settings.tenants["alpha"]
    daily = alpha.model_copy(update={"budget": Budget(amount=Decimal(5), period=BudgetPeriod.day)})
    policies = build_policy(settings).tenants
    assert alpha.budget is not None and alpha.budget.period is BudgetPeriod.month
    assert (policies["alpha"].budget_calendar_month, policies["alpha"].budget_period_s) == (True, None)
    settings = settings.model_copy(update={"tenants": {**settings.tenants, "alpha": daily}})
    policies = build_policy(settings).tenants
    assert (policies["alpha"].budget_calendar_month, policies["alpha"].budget_period_s) == (False, 86_400.0)


def test_a_reservation_is_priced_at_the_dearest_card_that_may_bill_it() -> None:
    """A request reserved now is billed with the card in force at its finish: when a
    dearer card is configured to start later, the reservation must cover it, and the
    settlement (at the finish) uses the card of that instant."""
    from tokenmill.config.settings import load_settings
    from tokenmill.scheduler.policy import Priority
    from tokenmill.scheduler.service import PricingClock, build_policy

    now = datetime.now(UTC)
    cheap = PriceCard(model="m", effective_from=now - timedelta(days=1),
                      input_per_million=Decimal(1), output_per_million=Decimal(2))
    dear = PriceCard(model="m", effective_from=now + timedelta(days=1),
                     input_per_million=Decimal(3), output_per_million=Decimal(5))
    settings = load_settings().model_copy(update={"price_cards": [cheap, dear]})
    clock = PricingClock()
    cost = build_policy(settings, clock)._cost
    assert cost is not None
    million = 1_000_000
    assert cost("t", "m", million, million, Priority.STANDARD) == Decimal(8)  # dear: 3 + 5
    clock.at = now.timestamp()  # settling a request that finished now: the cheap card
    assert cost("t", "m", million, million, Priority.STANDARD) == Decimal(3)

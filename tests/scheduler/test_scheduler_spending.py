"""Spending from the ledger (a real SQLite ledger) and settlement of every terminal kind
at the engine's counts."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tokenmill.config.models import BudgetPeriod
from tokenmill.config.settings import load_settings
from tokenmill.ledger.db import shared_factory, transaction
from tokenmill.ledger.models import EntryKind, LedgerEntry
from tokenmill.scheduler import Pool, Priority, QueuedRequest
from tokenmill.scheduler.service import PricingClock, build_policy, settle
from tokenmill.scheduler.spending import LedgerReader, Unbilled

from tokenmill import wire

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def _entry(rid: str, tenant: str, amount: str, at: datetime) -> LedgerEntry:
    # Adjustments need no price card, so the test writes the rows a sink would.
    return LedgerEntry(request_id=rid, kind=EntryKind.adjustment, tenant=tenant, model="sim",
                       amount=Decimal(amount), currency="USD", created_at=at)


def test_ledger_read_sums_each_tenants_current_period_and_finds_billed_ids(tmp_path: Path) -> None:
    factory = shared_factory(f"sqlite:///{tmp_path / 'ledger.db'}")
    with transaction(factory) as s:
        s.add_all([
            _entry("m1", "monthly", "0.25", NOW - timedelta(days=10)),
            _entry("m2", "monthly", "0.50", NOW),
            _entry("m0", "monthly", "9", datetime(2026, 2, 28, 23, 59, tzinfo=UTC)),  # last month
            _entry("d1", "daily", "0.125", NOW - timedelta(hours=1)),
            _entry("d0", "daily", "7", NOW - timedelta(days=1)),  # yesterday
            _entry("x1", "other", "5", NOW),  # no budget: not read
        ])
    reader = LedgerReader(factory, {"monthly": BudgetPeriod.month, "daily": BudgetPeriod.day})
    read = reader.read(NOW.timestamp(), {"m2", "d1", "pending", "x1"})
    assert read.spend == {"monthly": Decimal("0.75"), "daily": Decimal("0.125")}
    assert read.billed == {"m2", "d1", "x1"}
    # What is settled here and not billed there yet counts on top, per tenant.
    unbilled = Unbilled()
    unbilled.add("pending", "monthly", Decimal("0.01"))
    unbilled.add("m2", "monthly", Decimal("0.50"))
    unbilled.drop(read.billed)
    assert unbilled.spent(read.spend, ["monthly", "daily", "idle"]) == {
        "monthly": Decimal("0.76"), "daily": Decimal("0.125"), "idle": Decimal(0)}


def test_every_terminal_kind_settles_at_the_engines_counts() -> None:
    settings = load_settings()
    clock = PricingClock()
    policy = build_policy(settings, clock)
    now = time.time()
    kinds = [k for k in wire.EventKind if k.is_terminal]  # expiry arrives as `failed`
    for i, _ in enumerate([*kinds, "refused"]):
        policy.enqueue(QueuedRequest(f"k{i}", "alpha", "sim", Priority.STANDARD, 100, 50, now), now)
    assert len(policy.dispatch(Pool("p", frozenset({"sim"}), 8), now).dispatched) == len(kinds) + 1
    costs = []
    for i, kind in enumerate(kinds):
        ev = wire.TokenEvent(kind=kind, request_id=f"k{i}", tenant="alpha", model="sim",
                             prompt_tokens=100, completion_tokens=20, finished_at=now)
        done = settle(policy, clock, ev, now)
        assert done is not None and done.cost is not None
        costs.append(done.cost)
    # Cancelled or failed (expired) after it started: the work done, as if finished.
    assert costs[0] > 0 and costs == [costs[0]] * len(kinds)
    refused = wire.TokenEvent(kind=wire.EventKind.failed, request_id=f"k{len(kinds)}", tenant="alpha",
                              model="sim", finished_at=now)
    done = settle(policy, clock, refused, now)
    assert done is not None and done.cost == 0  # nothing ran: nothing to pay
    view = policy.budget("alpha", now)
    assert view is not None and (view.spent, view.reserved) == (sum(costs), 0)

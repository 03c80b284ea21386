"""spend_by_tenant: budgets restored from the ledger agree with the invoice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import PriceCard
from tokenmill.ledger import (
    EntryKind,
    LedgerEntry,
    Period,
    invoice,
    price_card_version_for,
    spend_by_tenant,
    sync_price_cards,
    transaction,
)

from tokenmill.errors import LedgerError

MAR = datetime(2026, 3, 1, tzinfo=UTC)
CARD = PriceCard(model="sim", effective_from=MAR - timedelta(days=60),
                 input_per_million=Decimal("0.10"), output_per_million=Decimal("0.40"))  # fmt: skip


def _entry(rid: str, kind: EntryKind, tenant: str, amount: str, at: datetime,
           version: int | None, currency: str = "USD") -> LedgerEntry:  # fmt: skip
    # Entries of every kind, whoever writes them: this tests the read side only.
    return LedgerEntry(request_id=rid, kind=kind, tenant=tenant, model="sim",
                       amount=Decimal(amount), currency=currency,
                       price_card_version_id=version, created_at=at)  # fmt: skip


def test_spend_by_tenant_sums_every_kind_in_the_invoice_period(
    sessions: sessionmaker[Session],
) -> None:
    period = Period.month(2026, 3)
    with transaction(sessions) as s:
        sync_price_cards(s, [CARD])
        vid = price_card_version_for(s, "sim", MAR).id
        s.add_all([
            _entry("a1", EntryKind.charge, "alpha", "0.0000000001", MAR, vid),
            _entry("a2", EntryKind.partial, "alpha", "1.2500000000", MAR + timedelta(days=3), vid),
            _entry("a1", EntryKind.refund, "alpha", "-0.0000000001", MAR + timedelta(days=4), vid),
            _entry("a3", EntryKind.adjustment, "alpha", "0.3333333333", MAR + timedelta(days=5),
                   None),
            # Just outside [start, end) on both sides: never counted.
            _entry("a4", EntryKind.charge, "alpha", "7", MAR - timedelta(microseconds=1), vid),
            _entry("a5", EntryKind.charge, "alpha", "7", period.end, vid),
            _entry("b1", EntryKind.charge, "beta", "2", period.end - timedelta(microseconds=1),
                   vid),
        ])  # fmt: skip
    with transaction(sessions) as s:
        spend = spend_by_tenant(s, period.start, period.end)
        assert spend == {"alpha": Decimal("1.5833333333"), "beta": Decimal(2)}
        assert spend["alpha"] == invoice(s, "alpha", period).total
        assert spend["beta"] == invoice(s, "beta", period).total
        assert spend_by_tenant(s, period.start, period.end, ["beta", "gamma"]) == {
            "beta": Decimal(2)
        }
        assert spend_by_tenant(s, period.start, period.end, []) == {}
        s.add(_entry("a6", EntryKind.adjustment, "alpha", "1", MAR, None, currency="EUR"))
        with pytest.raises(LedgerError, match="currencies"):
            spend_by_tenant(s, period.start, period.end)

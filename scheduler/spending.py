"""Budget spending read from the ledger, so that it survives Redis and the scheduler.

A budgeted tenant's spending in the current period is::

    the ledger's sum for the period + the cost of requests settled here whose charge
    the ledger does not hold yet ("unbilled")

The ledger is read at start and every couple of seconds; a settled request leaves the
unbilled set once the ledger holds an entry for it (matched by request id), so nothing
is counted twice for longer than one refresh, and only ever counted twice, never zero
times: the read checks which unbilled ids the ledger holds *before* it sums, so an
entry landing between the two statements is counted in both (held back one refresh),
never in neither.

The blocking database work (:meth:`LedgerReader.read`) runs in a thread; the rest
runs in the service's event loop.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ..config.models import BudgetPeriod
from ..ledger.billing import Period, spend_by_tenant
from ..ledger.errors import translated
from ..ledger.models import LedgerEntry

ZERO = Decimal(0)
#: ids per ``IN (...)`` query (SQLite allows 32,766 variables; stay well below)
_ID_CHUNK = 900


@dataclass(frozen=True, slots=True)
class LedgerRead:
    """What one read of the ledger found."""

    #: tenant -> its net spend in its current budget period (absent: nothing)
    spend: dict[str, Decimal]
    #: of the ids asked about, those the ledger holds an entry for
    billed: frozenset[str]


class LedgerReader:
    """Reads budgeted tenants' spending for their current period from the ledger."""

    def __init__(self, factory: sessionmaker[Session], periods: Mapping[str, BudgetPeriod]) -> None:
        self.factory = factory
        self.periods = dict(periods)

    def read(self, now: float, ids: Collection[str]) -> LedgerRead:
        """Blocking: which of ``ids`` the ledger holds, then each tenant's spend.

        Raises:
            LedgerError: the database failed or a tenant has several currencies.
        """
        at = datetime.fromtimestamp(now, UTC)
        with self.factory() as session:
            billed = _billed(session, ids)  # first: see the module docstring
            spend: dict[str, Decimal] = {}
            by_period: dict[Period, list[str]] = {}
            for tenant, kind in self.periods.items():
                by_period.setdefault(Period.containing(at, kind), []).append(tenant)
            for period, tenants in by_period.items():
                spend.update(spend_by_tenant(session, period.start, period.end, tenants))
        return LedgerRead(spend, billed)


@translated
def _billed(session: Session, ids: Collection[str]) -> frozenset[str]:
    found: set[str] = set()
    ordered = sorted(ids)
    for start in range(0, len(ordered), _ID_CHUNK):
        chunk = ordered[start : start + _ID_CHUNK]
        found.update(
            session.scalars(
                select(LedgerEntry.request_id).where(LedgerEntry.request_id.in_(chunk)).distinct()
            )
        )
    return frozenset(found)


@dataclass
class Unbilled:
    """Costs settled here that the ledger has not shown yet, by request id."""

    costs: dict[str, tuple[str, Decimal]] = field(default_factory=dict)

    def add(self, request_id: str, tenant: str, cost: Decimal) -> None:
        self.costs[request_id] = (tenant, cost)

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.costs.pop(rid, None)

    def spent(self, ledger: Mapping[str, Decimal], tenants: Iterable[str]) -> dict[str, Decimal]:
        """Each tenant's spending: its ledger sum plus its unbilled costs."""
        out = {t: ledger.get(t, ZERO) for t in tenants}
        for tenant, cost in self.costs.values():
            if tenant in out:
                out[tenant] += cost
        return out

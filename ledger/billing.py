"""Price card versions, ledger entries (charges, refunds, adjustments), spend and invoices.

Rounding follows the one rule in :mod:`.money`: entries are exact to 10 decimal
places, sums are exact, and only invoice lines and totals are rounded (half-even,
to cents), with the rounding difference shown. An entry belongs to the period that
holds its ``created_at`` (the billed event's time, not the time it was written): invoices
and :func:`spend_by_tenant` (budgets) place entries alike.

Entries are written only by the ledger sink (:mod:`.streams.sink`); this module reads
them and keeps the price card versions.
"""

from __future__ import annotations

import calendar
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tokenmill.config import PriceCard
from tokenmill.config.models import BudgetPeriod

from tokenmill.errors import LedgerError, NotFound
from tokenmill.pricing import PriceBook

from .errors import translated
from .models import EntryKind, LedgerEntry, PriceCardVersion
from .money import ZERO, exact, to_minor_unit
from .types import utc, utcnow
from .upsert import insert_ignore


@dataclass(frozen=True)
class Period:
    """A half-open span of time ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", utc(self.start))
        object.__setattr__(self, "end", utc(self.end))
        if self.start >= self.end:
            raise ValueError(f"empty period {self.start.isoformat()} .. {self.end.isoformat()}")

    @classmethod
    def month(cls, year: int, month: int) -> Period:
        """A calendar month (UTC)."""
        days = calendar.monthrange(year, month)[1]
        start = datetime(year, month, 1, tzinfo=UTC)
        return cls(start, start + timedelta(days=days))

    @classmethod
    def day(cls, day: date) -> Period:
        """A calendar day (UTC)."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return cls(start, start + timedelta(days=1))

    @classmethod
    def containing(cls, at: datetime, kind: BudgetPeriod) -> Period:
        """The budget period (day or month) that holds ``at``."""
        at = utc(at)
        if BudgetPeriod(kind) is BudgetPeriod.day:
            return cls.day(at.date())
        return cls.month(at.year, at.month)


@dataclass(frozen=True)
class InvoiceLine:
    """A tenant's entries of one kind for one model in a period: completed requests
    (``charge``), work done on requests that did not finish (``partial``), refunds or
    adjustments."""

    model: str
    kind: EntryKind
    #: number of entries (one per request)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    #: exact sum of the entries
    amount: Decimal
    #: ``amount`` rounded half-even to the currency's minor unit
    amount_rounded: Decimal


@dataclass(frozen=True)
class Invoice:
    """A tenant's bill for a period (see the rounding rule in :mod:`.money`)."""

    tenant: str
    period: Period
    currency: str
    lines: tuple[InvoiceLine, ...]
    #: exact sum of every entry in the period
    total: Decimal
    #: ``total`` rounded half-even to the minor unit: what is owed
    total_rounded: Decimal
    #: ``total_rounded`` minus the sum of the rounded lines
    rounding_adjustment: Decimal


@translated
def sync_price_cards(session: Session, cards: Iterable[PriceCard]) -> int:
    """Store the configured price cards that are not stored yet.

    A stored version is never changed: a price change must be a new card with a
    later ``effective_from``, or past charges would no longer match their card.

    Raises:
        LedgerError: a configured card differs from the stored version of the same
            model and ``effective_from``.

    Returns:
        How many versions were added.
    """
    added = 0
    for card in cards:
        values = {
            "model": card.model,
            "effective_from": utc(card.effective_from),
            "currency": card.currency,
            "input_per_million": exact(card.input_per_million),
            "output_per_million": exact(card.output_per_million),
            "batch_discount": exact(card.batch_discount),
            "created_at": utcnow(),
        }
        if insert_ignore(session, PriceCardVersion, values, ["model", "effective_from"]):
            added += 1
            continue
        stored = session.execute(
            select(PriceCardVersion).where(
                PriceCardVersion.model == card.model,
                PriceCardVersion.effective_from == values["effective_from"],
            )
        ).scalar_one()
        for key in ("currency", "input_per_million", "output_per_million", "batch_discount"):
            if getattr(stored, key) != values[key]:
                raise LedgerError(
                    f"price card {card.model} from {card.effective_from.isoformat()}: {key} "
                    f"is {values[key]} in the config but {getattr(stored, key)} in the ledger; "
                    "add a card with a new effective_from instead of editing one"
                )
    return added


@dataclass(frozen=True)
class Card:
    """A stored price card version, detached from any session (what
    :func:`tokenmill.pricing.cost` and :class:`~tokenmill.pricing.PriceBook` need)."""

    id: int
    model: str
    effective_from: datetime
    currency: str
    input_per_million: Decimal
    output_per_million: Decimal
    batch_discount: Decimal


@translated
def load_price_book(session: Session) -> PriceBook[Card]:
    """Every stored price card version, for lookups by model and instant."""
    rows = session.execute(select(PriceCardVersion)).scalars()
    return PriceBook(
        Card(r.id, r.model, r.effective_from, r.currency, r.input_per_million,
             r.output_per_million, r.batch_discount)
        for r in rows
    )  # fmt: skip


@translated
def price_card_version_for(session: Session, model: str, at: datetime) -> Card:
    """The stored version in force for ``model`` at ``at`` (see
    :meth:`~tokenmill.pricing.PriceBook.in_force`).

    Raises:
        NotFound: no card for the model had started by then.
    """
    card = load_price_book(session).in_force(model, utc(at))
    if card is None:
        raise NotFound(f"no price card for model {model!r} in force at {utc(at).isoformat()}")
    return card


def _single_currency(currencies: set[str], tenant: str) -> str:
    if len(currencies) > 1:
        raise LedgerError(
            f"tenant {tenant} has entries in several currencies: {sorted(currencies)}"
        )
    return next(iter(currencies), "USD")


@translated
def spend_by_tenant(
    session: Session,
    start: datetime,
    end: datetime,
    tenants: Collection[str] | None = None,
) -> dict[str, Decimal]:
    """Each tenant's exact net spend in ``[start, end)``: the sum of all its entries
    (charges, partial work, refunds, adjustments) placed by ``created_at``, the
    timestamp :func:`invoice` places them by, so a budget restored from this always
    agrees with the invoice. Tenants without entries are absent (not zero).

    Parameters:
        tenants: only these tenants (``None``: every tenant; empty: none).

    Raises:
        LedgerError: a tenant's entries are in more than one currency.
    """
    if tenants is not None and not tenants:
        return {}
    query = (
        select(LedgerEntry.tenant, LedgerEntry.currency, func.sum(LedgerEntry.amount))
        .where(LedgerEntry.created_at >= utc(start), LedgerEntry.created_at < utc(end))
        .group_by(LedgerEntry.tenant, LedgerEntry.currency)
    )
    if tenants is not None:
        query = query.where(LedgerEntry.tenant.in_(sorted(set(tenants))))
    spend: dict[str, Decimal] = {}
    currencies: dict[str, set[str]] = {}
    for tenant, currency, amount in session.execute(query).all():
        currencies.setdefault(tenant, set()).add(currency)
        _single_currency(currencies[tenant], tenant)
        spend[tenant] = amount
    return spend


#: the order of an invoice's lines for one model
_LINE_ORDER = {kind: i for i, kind in enumerate(
    (EntryKind.charge, EntryKind.partial, EntryKind.refund, EntryKind.adjustment))}  # fmt: skip


@translated
def invoice(session: Session, tenant: str, period: Period) -> Invoice:
    """A tenant's invoice for ``period``: one line per model and entry kind (so work
    billed for unfinished requests is a line of its own), rounded per :mod:`.money`.

    Raises:
        LedgerError: the entries are in more than one currency.

    Returns:
        The invoice; its ``total`` is exactly the sum of the period's entries.
    """
    rows = session.execute(
        select(
            LedgerEntry.currency,
            LedgerEntry.model,
            LedgerEntry.kind,
            func.count(),
            func.coalesce(func.sum(LedgerEntry.prompt_tokens), 0),
            func.coalesce(func.sum(LedgerEntry.completion_tokens), 0),
            func.sum(LedgerEntry.amount),
        )
        .where(
            LedgerEntry.tenant == tenant,
            LedgerEntry.created_at >= period.start,
            LedgerEntry.created_at < period.end,
        )
        .group_by(LedgerEntry.currency, LedgerEntry.model, LedgerEntry.kind)
    ).all()
    currency = _single_currency({row[0] for row in rows}, tenant)
    lines = tuple(
        sorted(
            (
                InvoiceLine(
                    model=model,
                    kind=EntryKind(kind),
                    requests=int(requests),
                    prompt_tokens=int(prompt),
                    completion_tokens=int(completion),
                    amount=amount,
                    amount_rounded=to_minor_unit(amount, currency),
                )
                for _, model, kind, requests, prompt, completion, amount in rows
            ),
            key=lambda ln: (ln.model, _LINE_ORDER[ln.kind]),
        )
    )
    total = sum((line.amount for line in lines), ZERO)
    total_rounded = to_minor_unit(total, currency)
    return Invoice(
        tenant=tenant,
        period=period,
        currency=currency,
        lines=lines,
        total=total,
        total_rounded=total_rounded,
        rounding_adjustment=total_rounded - sum((ln.amount_rounded for ln in lines), Decimal(0)),
    )

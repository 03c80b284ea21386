"""Price card versions, ledger entries (charges, refunds, adjustments), spend and invoices.

Rounding follows the one rule in :mod:`.money`: entries are exact to 10 decimal
places, sums are exact, and only invoice lines and totals are rounded (half-even,
to cents), with the rounding difference shown. An entry belongs to the period that
holds its ``created_at`` (the billed event's time, not the time it was written).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tokenmill.config import PriceCard
from tokenmill.config.models import BudgetPeriod

from tokenmill.errors import LedgerError, NotFound

from .errors import translated
from .models import EntryKind, LedgerEntry, PriceCardVersion
from .money import ZERO, exact, to_minor_unit
from .types import utc, utcnow
from .upsert import insert_ignore, insert_ignore_many


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
    """A tenant's net spend on one model in a period."""

    model: str
    #: number of charged requests
    requests: int
    prompt_tokens: int
    completion_tokens: int
    #: exact sum of the model's entries (charges, refunds, adjustments)
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


@translated
def price_card_version_for(session: Session, model: str, at: datetime) -> PriceCardVersion:
    """The price card version in force for ``model`` at ``at`` (the latest that started
    at or before it).

    Raises:
        NotFound: no card for the model had started by then.
    """
    version = session.execute(
        select(PriceCardVersion)
        .where(PriceCardVersion.model == model, PriceCardVersion.effective_from <= utc(at))
        .order_by(PriceCardVersion.effective_from.desc())
        .limit(1)
    ).scalar_one_or_none()
    if version is None:
        raise NotFound(f"no price card for model {model!r} in force at {utc(at).isoformat()}")
    return version


@translated
def record_charge(
    session: Session,
    request_id: str,
    tenant: str,
    model: str,
    amount: Decimal,
    price_card_version_id: int | None,
    *,
    kind: EntryKind = EntryKind.charge,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    currency: str | None = None,
    at: datetime | None = None,
) -> bool:
    """Append a ledger entry for a request once; a replay is a no-op.

    Parameters:
        session: the caller's transaction; commit it before acknowledging the event.
        request_id: the request; at most one entry of each ``kind`` exists per id.
        tenant, model: whom and what for.
        amount: exact to 10 places (see :func:`tokenmill.pricing.cost`); >= 0 for a
            charge, <= 0 for a refund, either sign for an adjustment.
        price_card_version_id: the version priced with (required for a charge).
        kind: charge, refund or adjustment.
        prompt_tokens, completion_tokens: the tokens billed.
        currency: defaults to the price card version's.
        at: when the billed event happened, which decides the period (default: now).

    Raises:
        LedgerError: a float or inexact amount, a wrong sign, an unknown price card
            version, or no currency.
        NotFound: ``price_card_version_id`` does not exist.

    Returns:
        True if the entry is new.
    """
    kind = EntryKind(kind)
    amount = exact(amount)
    if (kind is EntryKind.charge and amount < 0) or (kind is EntryKind.refund and amount > 0):
        raise LedgerError(f"{kind.value} of {amount} has the wrong sign (request {request_id})")
    if kind is EntryKind.charge and price_card_version_id is None:
        raise LedgerError(f"charge for request {request_id} names no price card version")
    if currency is None:
        if price_card_version_id is None:
            raise LedgerError(f"{kind.value} for request {request_id} needs a currency")
        version = session.get(PriceCardVersion, price_card_version_id)
        if version is None:
            raise NotFound(f"price card version {price_card_version_id} not found")
        currency = version.currency
    return insert_ignore(
        session,
        LedgerEntry,
        {
            "request_id": request_id,
            "kind": kind,
            "tenant": tenant,
            "model": model,
            "amount": amount,
            "currency": currency,
            "price_card_version_id": price_card_version_id,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "created_at": utc(at) if at is not None else utcnow(),
        },
        ["request_id", "kind"],
    )


class ChargeItem(NamedTuple):
    """One request's charge, as :func:`record_charges_new` takes it."""

    request_id: str
    tenant: str
    model: str
    #: exact cost from :func:`tokenmill.pricing.cost` under the version below
    amount: Decimal
    price_card_version_id: int
    currency: str
    prompt_tokens: int
    completion_tokens: int
    #: when the billed event happened (the request's finish): decides the period
    at: datetime


@translated
def record_charges_new(session: Session, items: Iterable[ChargeItem]) -> set[str]:
    """Append many charges with multi-row inserts; a request already charged (a replay,
    or a repeat within ``items``: the first wins) is skipped.

    Parameters:
        session: the caller's transaction; commit it before acknowledging the events.
        items: the charges; rows are inserted in request-id order (see
            :func:`~.upsert.insert_ignore_many`).

    Raises:
        LedgerError: a float, inexact or negative amount, or an unknown price card
            version (the whole transaction fails: keep the batch small or retry the
            items one by one to find the culprit).

    Returns:
        The request ids charged by this call.
    """
    unique: dict[str, ChargeItem] = {}
    for item in items:
        unique.setdefault(item.request_id, item)
    rows = []
    for rid in sorted(unique):
        item = unique[rid]
        amount = exact(item.amount)
        if amount < 0:
            raise LedgerError(f"charge of {amount} has the wrong sign (request {rid})")
        rows.append(
            {
                "request_id": rid,
                "kind": EntryKind.charge,
                "tenant": item.tenant,
                "model": item.model,
                "amount": amount,
                "currency": item.currency,
                "price_card_version_id": item.price_card_version_id,
                "prompt_tokens": item.prompt_tokens,
                "completion_tokens": item.completion_tokens,
                "created_at": utc(item.at),
            }
        )
    return insert_ignore_many(session, LedgerEntry, rows, ["request_id", "kind"], "request_id")


def _single_currency(currencies: set[str], tenant: str) -> str:
    if len(currencies) > 1:
        raise LedgerError(
            f"tenant {tenant} has entries in several currencies: {sorted(currencies)}"
        )
    return next(iter(currencies), "USD")


@translated
def tenant_spend(
    session: Session, tenant: str, period_start: datetime, period_end: datetime
) -> Decimal:
    """A tenant's exact net spend with ``period_start <= created_at < period_end``.

    Raises:
        LedgerError: the entries are in more than one currency.
    """
    rows = session.execute(
        select(LedgerEntry.currency, func.sum(LedgerEntry.amount))
        .where(
            LedgerEntry.tenant == tenant,
            LedgerEntry.created_at >= utc(period_start),
            LedgerEntry.created_at < utc(period_end),
        )
        .group_by(LedgerEntry.currency)
    ).all()
    _single_currency({currency for currency, _ in rows}, tenant)
    return rows[0][1] if rows else ZERO


@translated
def invoice(session: Session, tenant: str, period: Period) -> Invoice:
    """A tenant's invoice for ``period``: one line per model, rounded per :mod:`.money`.

    Raises:
        LedgerError: the entries are in more than one currency.

    Returns:
        The invoice; its ``total`` is exactly the sum of the period's entries.
    """
    is_charge = LedgerEntry.kind == EntryKind.charge
    rows = session.execute(
        select(
            LedgerEntry.currency,
            LedgerEntry.model,
            func.count().filter(is_charge),
            func.coalesce(func.sum(LedgerEntry.prompt_tokens).filter(is_charge), 0),
            func.coalesce(func.sum(LedgerEntry.completion_tokens).filter(is_charge), 0),
            func.sum(LedgerEntry.amount),
        )
        .where(
            LedgerEntry.tenant == tenant,
            LedgerEntry.created_at >= period.start,
            LedgerEntry.created_at < period.end,
        )
        .group_by(LedgerEntry.currency, LedgerEntry.model)
        .order_by(LedgerEntry.model)
    ).all()
    currency = _single_currency({row[0] for row in rows}, tenant)
    lines = tuple(
        InvoiceLine(
            model=model,
            requests=int(requests),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            amount=amount,
            amount_rounded=to_minor_unit(amount, currency),
        )
        for _, model, requests, prompt, completion, amount in rows
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

"""The ledger sink: one batch of token events → one database transaction.

For every ``finished`` event the transaction inserts, each keyed by request id with
``ON CONFLICT DO NOTHING``: the usage record (and adds it to the per-minute roll-up only
if it was new), the charge priced with the price-card version in force at the
request's finish, and the SLA record. A replayed batch therefore changes nothing, so
the stream can be at-least-once: the caller acknowledges the events (lets the consumer
commit their offsets) only after :meth:`LedgerSink.write` returned.

Failed and cancelled requests are not billed and have no usage (the scheduler releases
their budget reservations at zero cost); progress events carry nothing to record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import Settings, SlaClass

from tokenmill import pricing
from tokenmill.errors import LedgerError
from tokenmill.wire import EventKind, TokenEvent

from ..billing import ChargeItem, record_charges_new, sync_price_cards
from ..db import run_transaction, transaction
from ..errors import LedgerConflict
from ..models import PriceCardVersion
from ..sla import SlaItem, record_sla_new
from ..types import utc
from ..usage import UsageItem, record_usage_new
from .measure import Measurement, measure


class LedgerUnavailable(LedgerError):
    """The database cannot be reached (or stays locked): retry the same batch later."""


@dataclass(frozen=True)
class Card:
    """A stored price-card version (what :func:`tokenmill.pricing.cost` needs)."""

    id: int
    model: str
    effective_from: datetime
    currency: str
    input_per_million: Decimal
    output_per_million: Decimal
    batch_discount: Decimal


@dataclass(slots=True)
class Recorded:
    """A finished request as the sink saw it."""

    event: TokenEvent
    #: its finish (UTC), which picks the price card, the minute and the billing period
    at: datetime
    tier: str | None
    sla_class: str | None
    targets: SlaClass | None
    measurement: Measurement
    cost: Decimal
    currency: str
    card_id: int
    #: whether this batch inserted its usage (False: a replay or a duplicate)
    new: bool = False


@dataclass
class BatchOutcome:
    """What one :meth:`LedgerSink.write` did."""

    #: finished events recorded now or before (replays), in input order
    recorded: list[Recorded] = field(default_factory=list)
    #: (index into the input, reason) of events that cannot be recorded
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: events of other kinds (validated, nothing to record)
    skipped: int = 0

    @property
    def new(self) -> list[Recorded]:
        return [r for r in self.recorded if r.new]

    @property
    def duplicates(self) -> int:
        return sum(1 for r in self.recorded if not r.new)


class LedgerSink:
    """Prices and records batches of token events (thread-compatible, not thread-safe:
    one batch at a time).

    Parameters:
        sessions: session factory of a migrated ledger.
        settings: tenants, tiers and SLA classes (price cards come from the ledger's
            versions, synced from the settings by :meth:`prepare`).
    """

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._cards: dict[str, list[Card]] = {}
        self._tiers: dict[str, tuple[str | None, str | None, SlaClass | None]] = {}

    def prepare(self) -> None:
        """Store the configured price cards not stored yet and load every version.

        Raises:
            LedgerError: a configured card contradicts a stored version.
        """
        with transaction(self.sessions) as session:
            sync_price_cards(session, self.settings.price_cards)
        self._load_cards()

    def _load_cards(self) -> None:
        with transaction(self.sessions) as session:
            rows = session.execute(
                select(PriceCardVersion).order_by(PriceCardVersion.effective_from)
            ).scalars()
            cards: dict[str, list[Card]] = {}
            for r in rows:
                cards.setdefault(r.model, []).append(
                    Card(r.id, r.model, r.effective_from, r.currency, r.input_per_million,
                         r.output_per_million, r.batch_discount)
                )  # fmt: skip
        self._cards = cards

    def card_for(self, model: str, at: datetime) -> Card | None:
        """The version in force for ``model`` at ``at``: the latest that started by then."""
        found = None
        for card in self._cards.get(model, ()):
            if card.effective_from <= at:
                found = card
        return found

    def _tier_of(self, tenant: str) -> tuple[str | None, str | None, SlaClass | None]:
        found = self._tiers.get(tenant)
        if found is None:
            t = self.settings.tenants.get(tenant)
            if t is None:
                found = (None, None, None)
            else:
                name = self.settings.tiers[t.tier].sla
                found = (t.tier, name, self.settings.sla[name])
            self._tiers[tenant] = found
        return found

    def write(self, events: Sequence[TokenEvent]) -> BatchOutcome:
        """Record the ``finished`` events of ``events`` in one transaction.

        Returns:
            What was recorded, what was a replay, and which events were rejected (no
            price card for the model then, or refused by the database) with reasons.

        Raises:
            LedgerUnavailable: the database cannot be reached or stays locked; nothing
                was written, retry the same batch.
        """
        outcome = BatchOutcome()
        planned: list[tuple[int, Recorded]] = []
        reloaded = False
        for i, ev in enumerate(events):
            if ev.kind is not EventKind.finished:
                outcome.skipped += 1
                continue
            assert ev.finished_at is not None  # decode.parse guarantees it
            at = utc(ev.finished_at)
            card = self.card_for(ev.model, at)
            if card is None and not reloaded:
                self._load_cards()  # another process may have stored a newer card
                reloaded = True
                card = self.card_for(ev.model, at)
            if card is None:
                outcome.rejected.append(
                    (i, f"NotFound: no price card for model {ev.model!r} at {at.isoformat()}")
                )
                continue
            tier, sla_class, targets = self._tier_of(ev.tenant)
            try:
                amount = pricing.cost(card, ev.prompt_tokens, ev.completion_tokens, ev.priority)
                m = measure(ev, targets)
            except ValueError as exc:
                outcome.rejected.append((i, f"ValueError: {exc}"))
                continue
            rec = Recorded(ev, at, tier, sla_class, targets, m, amount, card.currency, card.id)
            planned.append((i, rec))
        if not planned:
            return outcome
        try:
            new = self._transact([r for _, r in planned])
        except LedgerUnavailable:
            raise
        except LedgerError:
            new, kept = set(), []
            for i, rec in planned:  # find the culprits: one transaction per event
                try:
                    new |= self._transact([rec])
                    kept.append((i, rec))
                except LedgerUnavailable:
                    raise
                except LedgerError as exc:
                    outcome.rejected.append((i, f"LedgerError: {exc}"))
            planned = kept
        # Keep the batch's order; the first delivery of a request id in it is the new one.
        seen: set[str] = set()
        for _, rec in planned:
            rid = rec.event.request_id
            rec.new = rid in new and rid not in seen
            seen.add(rid)
            outcome.recorded.append(rec)
        outcome.rejected.sort()
        return outcome

    def _transact(self, recs: Sequence[Recorded]) -> set[str]:
        """One transaction for ``recs``; the request ids whose usage was new."""

        def work(session: Session) -> set[str]:
            new = record_usage_new(session, (_usage(r) for r in recs))
            record_charges_new(session, (_charge(r) for r in recs))
            record_sla_new(session, (_sla(r) for r in recs if r.tier is not None))
            return new

        try:
            return run_transaction(self.sessions, work)
        except LedgerConflict as exc:
            raise LedgerUnavailable(f"ledger stays locked: {exc}") from exc
        except LedgerError as exc:
            if isinstance(exc.__cause__, (sa_exc.OperationalError, sa_exc.InterfaceError,
                                          sa_exc.TimeoutError)):  # fmt: skip
                raise LedgerUnavailable(f"ledger unavailable: {exc}") from exc
            raise


def _usage(r: Recorded) -> UsageItem:
    ev = r.event
    return UsageItem(ev.request_id, ev.tenant, ev.model, ev.priority, ev.prompt_tokens,
                     ev.completion_tokens, r.at)  # fmt: skip


def _charge(r: Recorded) -> ChargeItem:
    ev = r.event
    return ChargeItem(ev.request_id, ev.tenant, ev.model, r.cost, r.card_id, r.currency,
                      ev.prompt_tokens, ev.completion_tokens, r.at)  # fmt: skip


def _sla(r: Recorded) -> SlaItem:
    ev, m = r.event, r.measurement
    assert r.tier is not None and r.sla_class is not None
    return SlaItem(ev.request_id, ev.tenant, r.tier, ev.model, r.sla_class, m.queue_ms,
                   m.ttft_ms, m.tpot_ms, m.e2e_ms, m.met, r.at)  # fmt: skip

"""The ledger sink: one batch of token events → one database transaction. It is the
only writer of usage, charges and SLA records.

A request is billed once, by the first terminal event that carries work:

* ``finished``: a usage record, a ``charge`` and (for a known tenant) an SLA record;
* ``cancelled`` or ``failed`` with token counts (the engine had admitted the prompt or
  generated tokens before the request was cancelled, expired or failed): a usage record
  and a ``partial`` entry, priced like a charge; no SLA record (it did not finish).
  With no counts (refused or cancelled before the engine had it) nothing is recorded.

Each is priced with the price-card version in force at the event's finish
(:class:`~tokenmill.pricing.PriceBook`). The usage record is keyed by request id and
inserted with ``ON CONFLICT DO NOTHING``; the entry, the roll-up and the SLA record are
written only for the requests whose usage record is new in this transaction, so a
replayed batch changes nothing and a request with both a partial and a finished event
(a race, a redelivery, a reconciler's repair) is billed once. The stream can therefore
be at-least-once: the caller commits the events' offsets only after
:meth:`LedgerSink.write` (or :meth:`LedgerSink.commit`) returned.

Progress events carry nothing to record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import Settings, SlaClass

from tokenmill import pricing
from tokenmill.errors import LedgerError
from tokenmill.pricing import PriceBook
from tokenmill.wire import EventKind, Priority, TokenEvent

from ..billing import Card, load_price_book, sync_price_cards
from ..bulk import Encoder, insert_new, insert_rows
from ..db import run_transaction, transaction
from ..errors import LedgerConflict, translated
from ..models import EntryKind, LedgerEntry, SlaRecord, UsageRecord
from ..types import utcnow
from ..usage import add_to_minutes
from .measure import Measurement, measure
from .rates import Rates, precision_limit, rates_for, units_to_decimal

#: terminal kinds billed for the work done when they carry token counts
PARTIAL_KINDS = frozenset({EventKind.cancelled, EventKind.failed})
#: what a partial record has for SLA figures: none (it did not finish; no SLA record)
UNMEASURED = Measurement(None, None, None, 0.0, ())


class LedgerUnavailable(LedgerError):
    """The database cannot be reached (or stays locked): retry the same batch later."""


@dataclass(slots=True)
class Recorded:
    """A billed request as the sink saw it: finished (``kind`` charge) or partial."""

    event: TokenEvent
    tier: str | None
    sla_class: str | None
    targets: SlaClass | None
    #: its SLA figures (:data:`UNMEASURED` for a partial record)
    measurement: Measurement
    currency: str
    card_id: int
    #: the charge in ledger units (10⁻¹⁰), where priced with whole-unit rates (see .rates)
    units: int | None
    #: the charge as :func:`tokenmill.pricing.cost` computed it, where ``units`` is None
    priced: Decimal | None = None
    #: whether this batch inserted its usage (False: a replay or a duplicate)
    new: bool = False
    #: the ledger entry's kind: ``charge`` (finished) or ``partial``
    kind: EntryKind = EntryKind.charge
    #: when it ended (POSIX seconds): picks the price card, the minute and the period
    ended: float = 0.0

    @property
    def cost(self) -> Decimal:
        """The charge (a Decimal made only when asked for: most events never need one)."""
        if self.units is None:
            assert self.priced is not None
            return self.priced
        return units_to_decimal(self.units)

    @property
    def at(self) -> datetime:
        """When it ended (UTC), which picks the price card, the minute and the period."""
        return datetime.fromtimestamp(self.ended, UTC)


@dataclass
class BatchOutcome:
    """What one :meth:`LedgerSink.write` did."""

    #: finished events recorded now or before (replays), in input order
    recorded: list[Recorded] = field(default_factory=list)
    #: cancelled/failed events with token counts, billed as partial work now or before
    partial: list[Recorded] = field(default_factory=list)
    #: (index into the input, reason) of events that cannot be recorded
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: events with nothing to record (progress, or terminal without token counts)
    skipped: int = 0

    @property
    def new(self) -> list[Recorded]:
        """Finished events this batch billed."""
        return [r for r in self.recorded if r.new]

    @property
    def duplicates(self) -> int:
        """Finished events already billed (a replay, or the request was billed before)."""
        return sum(1 for r in self.recorded if not r.new)

    @property
    def new_partial(self) -> list[Recorded]:
        """Partial work this batch billed."""
        return [r for r in self.partial if r.new]


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
        self._book: PriceBook[Card] = PriceBook(())
        self._tiers: dict[str, tuple[str | None, str | None, SlaClass | None]] = {}
        #: (card id, priority) → its exact rates, None if it has none
        self._rates: dict[tuple[int, Priority], Rates | None] = {}
        self._enc: Encoder | None = None

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
            self._book = load_price_book(session)

    @property
    def price_book(self) -> PriceBook[Card]:
        """The stored price card versions it prices with (loaded by :meth:`prepare`)."""
        return self._book

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
        """Record the billable events of ``events`` in one transaction (:meth:`plan`,
        then :meth:`commit`).

        Returns:
            What was recorded, what was a replay, and which events were rejected (no
            price card for the model then, or refused by the database) with reasons.

        Raises:
            LedgerUnavailable: the database cannot be reached or stays locked; nothing
                was written, retry the same batch.
        """
        return self.commit(self.plan(events))

    def plan(self, events: Sequence[TokenEvent]) -> Plan:
        """Price and measure the billable events of ``events`` and build their rows:
        all of a batch's work but the database's (no I/O, except reloading the price
        cards when an event has none)."""
        skipped = 0
        rejected: list[tuple[int, str]] = []
        planned: list[tuple[int, Recorded]] = []
        reloaded = False
        limit = precision_limit()
        finished, partial_kinds = EventKind.finished, PARTIAL_KINDS
        charge, partial = EntryKind.charge, EntryKind.partial
        all_rates, tiers = self._rates, self._tiers
        # Per event only lookups and integer arithmetic: no datetime, no Decimal where
        # whole-unit rates apply (both made later only if asked for, see Recorded), and
        # the usual case of _tier_of inline.
        for i, ev in enumerate(events):
            kind = ev.kind
            pt, ct = ev.prompt_tokens, ev.completion_tokens
            if kind is finished:
                entry = charge
                ended = ev.finished_at
                assert ended is not None  # decode.parse guarantees it
            elif kind in partial_kinds and (pt or ct):
                entry = partial
                ended = ev.finished_at if ev.finished_at is not None else ev.ts
            else:
                skipped += 1
                continue
            try:
                card = self._book.in_force_at(ev.model, ended)
                if card is None and not reloaded:
                    self._load_cards()  # another process may have stored a newer card
                    reloaded = True
                    card = self._book.in_force_at(ev.model, ended)
            except (ValueError, OverflowError, OSError) as exc:  # inf, nan: not a time
                rejected.append((i, f"ValueError: finished_at {ended}: {exc}"))
                continue
            if card is None:
                at = datetime.fromtimestamp(ended, UTC)
                rejected.append(
                    (i, f"NotFound: no price card for model {ev.model!r} at {at.isoformat()}")
                )
                continue
            tier, sla_class, targets = tiers.get(ev.tenant) or self._tier_of(ev.tenant)
            key = (card.id, ev.priority)
            try:
                rates = all_rates[key]
            except KeyError:
                rates = all_rates[key] = rates_for(card, ev.priority)
            try:
                units = None if rates is None else rates.units(pt, ct, limit)
                priced = None if units is not None else pricing.cost(card, pt, ct, ev.priority)
                m = measure(ev, targets) if entry is charge else UNMEASURED
            except ValueError as exc:
                rejected.append((i, f"ValueError: {exc}"))
                continue
            rec = Recorded(ev, tier, sla_class, targets, m, card.currency, card.id, units, priced,
                           False, entry, ended)  # fmt: skip
            planned.append((i, rec))
        rows: Rows | LedgerError | None = None
        if planned:
            try:
                rows = build_rows(self._encoder(), [r for _, r in planned])
            except LedgerError as exc:  # e.g. an amount out of range: commit finds which
                rows = exc
        return Plan(skipped, rejected, planned, rows)

    def commit(self, plan: Plan) -> BatchOutcome:
        """Write a :meth:`plan` in one transaction (blocking; safe on another thread than
        the one that planned, one plan at a time).

        Raises:
            LedgerUnavailable: the database cannot be reached or stays locked; nothing
                was written, retry the same plan.
        """
        outcome = BatchOutcome(rejected=list(plan.rejected), skipped=plan.skipped)
        planned = plan.planned
        if not planned:
            return outcome
        try:
            if isinstance(plan.rows, LedgerError):
                raise plan.rows
            assert plan.rows is not None
            new = self._transact(plan.rows)
        except LedgerUnavailable:
            raise
        except LedgerError:
            new, kept = set(), []
            for i, rec in planned:  # find the culprits: one transaction per event
                try:
                    new |= self._transact(build_rows(self._encoder(), [rec]))
                    kept.append((i, rec))
                except LedgerUnavailable:
                    raise
                except LedgerError as exc:
                    outcome.rejected.append((i, f"LedgerError: {exc}"))
            planned = kept
        outcome.rejected.sort()
        # Keep the batch's order; the first delivery of a request id in it is the new one.
        charge = EntryKind.charge
        if len(new) == len(planned):  # the usual case: all new, so no id repeats
            for _, rec in planned:
                rec.new = True
                (outcome.recorded if rec.kind is charge else outcome.partial).append(rec)
            return outcome
        seen: set[str] = set()
        for _, rec in planned:
            rid = rec.event.request_id
            rec.new = rid in new and rid not in seen
            seen.add(rid)
            (outcome.recorded if rec.kind is charge else outcome.partial).append(rec)
        return outcome

    def _transact(self, rows: Rows) -> set[str]:
        """One transaction writing ``rows``; the request ids whose usage was new."""
        try:
            enc = self._encoder()
            return run_transaction(  # recorded_at: when written (retries included)
                self.sessions, lambda s: write_rows(s.connection(), rows, enc.time(utcnow()))
            )
        except LedgerConflict as exc:
            raise LedgerUnavailable(f"ledger stays locked: {exc}") from exc
        except LedgerError as exc:
            if isinstance(exc.__cause__, (sa_exc.OperationalError, sa_exc.InterfaceError,
                                          sa_exc.TimeoutError)):  # fmt: skip
                raise LedgerUnavailable(f"ledger unavailable: {exc}") from exc
            raise

    def _encoder(self) -> Encoder:
        if self._enc is None:
            bind = self.sessions.kw["bind"]  # the engine: its dialect, without connecting
            self._enc = Encoder(bind.dialect)
        return self._enc


USAGE_COLS = ("request_id", "tenant", "model", "priority", "minute", "prompt_tokens",
              "completion_tokens", "recorded_at")  # fmt: skip
CHARGE_COLS = ("request_id", "kind", "tenant", "model", "amount", "currency",
               "price_card_version_id", "prompt_tokens", "completion_tokens", "created_at")  # fmt: skip
SLA_COLS = ("request_id", "tenant", "tier", "model", "sla_class", "queue_ms", "ttft_ms",
            "tpot_ms", "e2e_ms", "met", "finished_at")  # fmt: skip
_ENTRY_TEXT = {k: k.value for k in EntryKind}
#: a dict lookup: an enum's ``.value`` is a Python-level property call
_PRIORITY_TEXT = {p: p.value for p in Priority}


@dataclass
class Rows:
    """A batch's rows, driver-ready, in request-id order (see :mod:`...bulk`); usage
    rows without ``recorded_at``, stamped when written."""

    usage: list[tuple[Any, ...]]
    charges: list[tuple[Any, ...]]
    slas: list[tuple[Any, ...]]
    #: the per-minute roll-up of all the usage rows (what to add when all are new), keyed
    #: as :func:`~...usage.add_to_minutes` takes it; None: sum them when written
    minutes: dict[tuple[str, str, Any], list[int]] | None = None


@dataclass
class Plan:
    """A batch priced, measured and turned into rows (:meth:`LedgerSink.plan`)."""

    #: events of other kinds
    skipped: int
    #: (index into the input, reason) of events that cannot be priced or measured
    rejected: list[tuple[int, str]]
    #: (index into the input, record) of the events to write, in input order
    planned: list[tuple[int, Recorded]]
    #: their rows; a LedgerError if some value cannot be stored (found one by one)
    rows: Rows | LedgerError | None


def build_rows(enc: Encoder, recs: Sequence[Recorded]) -> Rows:
    """The usage, ledger-entry and SLA rows of ``recs`` as driver-ready tuples, built in
    one pass, in request-id order; the first of repeated request ids wins.

    Raises:
        LedgerError: an amount that cannot be stored exactly.
    """
    unique: dict[str, Recorded] = {}
    for r in recs:
        unique.setdefault(r.event.request_id, r)
    rows = Rows([], [], [], {})
    usage, charges, slas, minutes = rows.usage, rows.charges, rows.slas, rows.minutes
    assert minutes is not None
    stamp, money, money_units = enc.finish_stamp, enc.money, enc.money_units
    charge = EntryKind.charge
    for rid in sorted(unique):
        r = unique[rid]
        ev = r.event
        tenant, model, pt, ct = ev.tenant, ev.model, ev.prompt_tokens, ev.completion_tokens
        at, minute = stamp(r.ended)
        units = r.units
        amount = money(r.cost) if units is None else money_units(units)
        usage.append((rid, tenant, model, _PRIORITY_TEXT[ev.priority], minute, pt, ct))
        _count(minutes, (tenant, model, minute), pt, ct)
        charges.append((rid, _ENTRY_TEXT[r.kind], tenant, model, amount, r.currency, r.card_id,
                        pt, ct, at))  # fmt: skip
        if r.tier is not None and r.kind is charge:
            m = r.measurement
            slas.append((rid, tenant, r.tier, model, r.sla_class, m.queue_ms, m.ttft_ms,
                         m.tpot_ms, m.e2e_ms, not m.missed, at))  # fmt: skip
    return rows


def _count(
    sums: dict[tuple[str, str, Any], list[int]], key: tuple[str, str, Any], pt: int, ct: int
) -> None:
    """Add one request of ``pt`` prompt and ``ct`` completion tokens to ``sums[key]``."""
    s = sums.get(key)
    if s is None:
        s = sums[key] = [0, 0, 0]
    s[0] += 1
    s[1] += pt
    s[2] += ct


@translated
def write_rows(conn: Connection, rows: Rows, recorded_at: Any) -> set[str]:
    """Insert the usage records of ``rows`` (stamped with the driver-ready
    ``recorded_at``; replays are no-ops) and, for those new to the ledger only, their
    ledger entries, roll-up counts and SLA records: a few multi-row statements per
    table. A request whose usage is already recorded (by an earlier finished or partial
    event) is never billed again.

    Returns:
        The request ids whose usage was new.
    """
    usage = [(*row, recorded_at) for row in rows.usage]
    new: set[str] = insert_new(conn, UsageRecord, USAGE_COLS, usage, "request_id")
    if rows.minutes is not None and len(new) == len(rows.usage):
        # every row new (the usual case): summed when planned
        sums, charges, slas = rows.minutes, rows.charges, rows.slas
    else:
        sums = {}
        for rid, tenant, model, _prio, minute, pt, ct in rows.usage:
            if rid in new:
                _count(sums, (tenant, model, minute), pt, ct)
        charges = [row for row in rows.charges if row[0] in new]
        slas = [row for row in rows.slas if row[0] in new]
    add_to_minutes(conn, sums)
    # ON CONFLICT still: an entry without its usage record (written by an older
    # version) must not fail the batch.
    insert_rows(conn, LedgerEntry, CHARGE_COLS, charges, conflict=("request_id", "kind"))
    insert_rows(conn, SlaRecord, SLA_COLS, slas, conflict=("request_id",))
    return new

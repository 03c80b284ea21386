"""Reconciliation: the ledger's charges against the durable facts of the work done.

Token events live in the broker; if it (or a stream processor) dies with events
unconsumed, work that was done and delivered goes unbilled. The facts survive
elsewhere: the ledger's ``requests`` table (batch lines: terminal state, the engine's
token counts, finish time, settled by the batch runner) and the result store in Redis
(every request's terminal :class:`~tokenmill.wire.TokenEvent`, stored beside its result
by whoever committed the outcome, kept ``RESULT_TTL_S``), and for a batch line whose
row lacks token counts its batch's ``results.jsonl``. :func:`reconcile` compares
them with the ledger's charges per request, set-based (a few SQL scans; Redis by
``SCAN`` + pipelined ``MGET``), and sorts every difference into one :class:`Category`:

- ``missing``: done, billable, and no charge (usage rows are written with the charge);
- ``duplicated``: more than one charge for one request (the unique keys forbid it:
  found anyway);
- ``mispriced``: the charge differs from :func:`tokenmill.pricing.cost` with the price
  card in force at the finish, or its tokens (or its usage record's) differ from the
  durable fact's, or it was priced with another card than the one in force.

:func:`repair` bills what is missing, and only that: it replays the terminal event the
result store kept, or synthesizes the one the worker sent from the ``requests`` row
(same request id: the ledger's idempotency key), through :class:`LedgerSink` — the one
write path, whose unique keys make it exactly once however often and concurrently it
runs. Mis-priced and duplicated charges are only reported: money corrections are an
operator's adjustments.

Which terminal kinds are billable is the sink's decision (``finished``, and cancelled
or failed work with token counts as ``partial`` entries): asked of
:meth:`LedgerSink.plan` itself, so the two can never disagree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import pydantic_core
import redis
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    cast,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.workers import keys

from tokenmill import pricing
from tokenmill.logs import get_logger
from tokenmill.pricing import PriceBook
from tokenmill.wire import EventKind, Priority, RequestState, TokenEvent, decode

from .billing import Card, Period, load_price_book
from .db import transaction
from .models import MONEY, EntryKind, LedgerEntry, PriceCardVersion, RequestRow, UsageRecord
from .streams.sink import LedgerSink
from .types import UtcDateTime

__all__ = [
    "Category",
    "Difference",
    "Progress",
    "RepairResult",
    "Report",
    "billable_kinds",
    "reconcile",
    "repair",
]

log = get_logger(__name__)

#: entry kinds that bill work (every kind but the money corrections: a partial-work kind
#: added later counts as billing)
CHARGE_KINDS = tuple(
    k.value for k in EntryKind if k not in (EntryKind.refund, EntryKind.adjustment)
)
#: terminal request states whose work done may be billable, and the event kind a worker
#: sends for each (an expired request's event is ``failed``, its reason says so)
_KIND_OF_STATE = {
    RequestState.FINISHED: EventKind.finished,
    RequestState.FAILED: EventKind.failed,
    RequestState.CANCELLED: EventKind.cancelled,
    RequestState.EXPIRED: EventKind.failed,
}
#: result-store keys per SCAN step, and ids per ledger lookup
_SCAN_COUNT = 5000
_IDS_PER_QUERY = 5000
#: events per repair transaction: short, so stream processors writing meanwhile wait little
_REPAIR_CHUNK = 2000

#: ``progress(stage, done, total)``: ``done`` so far of ``total`` (None: unknown)
Progress = Callable[[str, int, int | None], None]


class Category(StrEnum):
    """Kinds of difference between what was done and what was billed."""

    #: done (billable work in a durable fact) but not billed
    missing = "missing"
    #: billed more than once
    duplicated = "duplicated"
    #: billed at another amount than the price card in force × the fact's tokens
    mispriced = "mispriced"


@dataclass(frozen=True, slots=True)
class Difference:
    """One request's difference."""

    category: Category
    request_id: str
    tenant: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"request_id": self.request_id, "tenant": self.tenant, "detail": self.detail}


@dataclass
class Report:
    """What :func:`reconcile` found."""

    period: Period | None
    tenant: str | None
    #: where the facts came from: ``ledger`` (requests table), ``results`` (Redis)
    sources: tuple[str, ...]
    #: billable requests found in the facts (each once)
    facts: int
    #: charge entries checked
    charges: int
    counts: dict[Category, int] = field(default_factory=lambda: dict.fromkeys(Category, 0))
    #: the first ``examples`` differences of each category, by request id
    examples: dict[Category, list[Difference]] = field(
        default_factory=lambda: {c: [] for c in Category}
    )
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not any(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "tokenmill.reconciliation",
            "period": None if self.period is None else {
                "start": _iso(self.period.start), "end": _iso(self.period.end)},
            "tenant": self.tenant, "sources": list(self.sources), "facts": self.facts,
            "charges": self.charges, "clean": self.clean,
            "counts": {c.value: n for c, n in self.counts.items()},
            "examples": {c.value: [d.to_dict() for d in ds] for c, ds in self.examples.items()},
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


@dataclass
class RepairResult:
    """What :func:`repair` did."""

    #: missing requests found (all of them, also those past ``limit``)
    missing: int = 0
    #: billed now, by this repair
    repaired: int = 0
    #: billed meanwhile by someone else (a stream processor, another repair)
    already: int = 0
    #: (request id, reason) the sink refused (e.g. no price card for the model then)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    #: (request id, reason) with no token counts anywhere: cannot be billed from facts
    unrepairable: list[tuple[str, str]] = field(default_factory=list)
    #: missing ones left for a later call (past ``limit``)
    remaining: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing, "repaired": self.repaired, "already": self.already,
            "rejected": [{"request_id": r, "reason": w} for r, w in self.rejected],
            "unrepairable": [{"request_id": r, "reason": w} for r, w in self.unrepairable],
            "remaining": self.remaining, "seconds": round(self.seconds, 3),
        }  # fmt: skip


# -- the facts --------------------------------------------------------------------------


@dataclass(slots=True)
class _Missing:
    """A billable fact with no charge: what repair needs to bill it."""

    request_id: str
    tenant: str
    #: the event to write (None: no token counts known)
    event: TokenEvent | None
    #: why ``event`` is None
    why: str = ""
    #: the ``requests`` row it was found in, if any
    row: Any = None


@dataclass
class _Findings:
    report: Report
    #: request id → the missing fact, in id order once sorted
    missing: dict[str, _Missing]


def billable_kinds(sink: LedgerSink) -> frozenset[EventKind]:
    """The terminal event kinds ``sink`` bills, asked of :meth:`LedgerSink.plan` with one
    probe event per kind (no database write); ``finished`` where no card exists."""
    with transaction(sink.sessions) as session:
        card = session.execute(
            select(PriceCardVersion.model, PriceCardVersion.effective_from)
            .order_by(PriceCardVersion.effective_from.desc())
            .limit(1)
        ).first()
    if card is None:
        return frozenset({EventKind.finished})
    at = max(time.time(), card.effective_from.timestamp() + 1.0)
    kinds = set()
    for kind in (EventKind.finished, EventKind.failed, EventKind.cancelled):
        probe = TokenEvent(
            kind=kind, request_id="reconcile-probe", tenant="reconcile-probe", model=card.model,
            prompt_tokens=1, completion_tokens=1, submitted_at=at - 1.0, dispatched_at=at - 1.0,
            first_token_at=at - 0.5, finished_at=at, ts=at, reason=f"{kind.value}: probe",
        )  # fmt: skip
        if sink.plan([probe]).planned:
            kinds.add(kind)
    return frozenset(kinds)


def reconcile(
    sink: LedgerSink,
    *,
    results: redis.Redis | None = None,
    period: Period | None = None,
    tenant: str | None = None,
    examples: int = 10,
    settle_s: float = 0.0,
    progress: Progress | None = None,
) -> Report:
    """Compare the durable facts of the work done with the ledger's charges.

    Parameters:
        sink: the ledger (its sessions) and its billing rules (which kinds it bills).
        results: the result store's Redis (None: the ledger's requests table alone).
        period: only requests that finished, and charges made, in it (None: all time).
        tenant: only this tenant's.
        examples: request ids kept per category (the counts are always exact).
        settle_s: leave out facts younger than this (events still on their way).
        progress: called as the scan goes (see :data:`Progress`).

    Raises:
        LedgerError: the ledger cannot be read.
        redis.RedisError: the result store cannot be read.
    """
    return _find(sink, results, period, tenant, examples, settle_s, progress).report


def repair(
    sink: LedgerSink,
    *,
    results: redis.Redis | None = None,
    period: Period | None = None,
    tenant: str | None = None,
    limit: int = 100_000,
    settle_s: float = 0.0,
    progress: Progress | None = None,
) -> tuple[Report, RepairResult]:
    """Bill what :func:`reconcile` finds missing, exactly once: the stored terminal event,
    or one synthesized from the ``requests`` row, through ``sink`` (prepared), in
    transactions of a few thousand events. Idempotent and safe beside running stream
    processors (the sink's unique keys decide who bills). Cheap with nothing to repair:
    the scan alone; bounded: at most ``limit`` requests a call (``remaining`` says how
    many are left). ``sink`` writes one batch at a time: give it a sink of its own, or
    call it before the stream processor's consumer starts.

    Returns:
        The report before repairing, and what was repaired.

    Raises:
        LedgerUnavailable: the ledger stays locked or unreachable (what was written
            stays written; run again).
    """
    findings = _find(sink, results, period, tenant, 0, settle_s, progress)
    out = RepairResult(missing=len(findings.missing))
    start = time.perf_counter()
    todo: list[TokenEvent] = []
    for rid in sorted(findings.missing):
        m = findings.missing[rid]
        if m.event is None:
            out.unrepairable.append((rid, m.why))
        elif len(todo) < limit:
            todo.append(m.event)
        else:
            out.remaining += 1
    for done in range(0, len(todo), _REPAIR_CHUNK):
        chunk = todo[done : done + _REPAIR_CHUNK]
        outcome = sink.write(chunk)
        for rec in (*outcome.recorded, *outcome.partial):
            if rec.new:
                out.repaired += 1
            else:
                out.already += 1
        out.rejected += [(chunk[i].request_id, reason) for i, reason in outcome.rejected]
        if progress:
            progress("repair", done + len(chunk), len(todo))
    out.seconds = time.perf_counter() - start
    if out.missing:
        log.warning("reconcile repaired", repaired=out.repaired, already=out.already,
                    rejected=len(out.rejected), unrepairable=len(out.unrepairable),
                    remaining=out.remaining, tenant=tenant, seconds=round(out.seconds, 3))  # fmt: skip
    return findings.report, out


def _find(
    sink: LedgerSink,
    results: redis.Redis | None,
    period: Period | None,
    tenant: str | None,
    examples: int,
    settle_s: float,
    progress: Progress | None,
) -> _Findings:
    started = time.perf_counter()
    kinds = billable_kinds(sink)
    end = None if period is None else period.end
    if settle_s > 0:
        cutoff = datetime.fromtimestamp(time.time() - settle_s, UTC)
        end = cutoff if end is None else min(end, cutoff)
    start = None if period is None else period.start
    window = _Window(start, end)
    found: dict[Category, dict[str, Difference]] = {c: {} for c in Category}
    missing: dict[str, _Missing] = {}
    # Several short transactions rather than one: on SQLite every ledger transaction
    # holds the write lock (BEGIN IMMEDIATE), and the stream processors wait for it.
    facts, charges = _ledger_side(sink.sessions, kinds, window, tenant, found, missing, progress)
    sources: tuple[str, ...] = ("ledger",)
    if results is not None:
        facts += _results_side(
            sink.sessions, results, kinds, window, tenant, found, missing, progress
        )
        sources = ("ledger", "results")
    report = Report(period, tenant, sources, facts, charges)
    for cat, diffs in found.items():
        report.counts[cat] = len(diffs)
        report.examples[cat] = [diffs[r] for r in sorted(diffs)[:examples]]
    report.seconds = time.perf_counter() - started
    log.info("reconciled", tenant=tenant, period=None if period is None else _iso(period.start),
             facts=facts, charges=charges, seconds=round(report.seconds, 3),
             **{c.value: n for c, n in report.counts.items()})  # fmt: skip
    _from_batch_files(sink.settings.home, missing)
    return _Findings(report, missing)


class _Window:
    """``[start, end)`` of finish times (either open)."""

    def __init__(self, start: datetime | None, end: datetime | None) -> None:
        self.start, self.end = start, end
        self._lo = -math.inf if start is None else start.timestamp()
        self._hi = math.inf if end is None else end.timestamp()

    def where(self, column: Any) -> list[ColumnElement[bool]]:
        out = []
        if self.start is not None:
            out.append(column >= self.start)
        if self.end is not None:
            out.append(column < self.end)
        return out

    def holds(self, ts: float) -> bool:
        """Whether a finish at epoch ``ts`` is in the window as the ledger stores it (to
        the microsecond: decided on the datetime only within 10 µs of a bound)."""
        if self._lo + 1e-5 <= ts < self._hi - 1e-5:
            return True
        if ts < self._lo - 1e-5 or ts >= self._hi + 1e-5:
            return False
        at = datetime.fromtimestamp(ts, UTC)
        return (self.start is None or at >= self.start) and (self.end is None or at < self.end)


# -- the ledger's requests table ------------------------------------------------------


def _billable(kinds: frozenset[EventKind]) -> ColumnElement[bool]:
    """Requests whose work is billable: finished ones; others with tokens, where the sink
    bills their kind."""
    r = RequestRow.__table__.c
    partial = [
        s for s, k in _KIND_OF_STATE.items() if k in kinds and s is not RequestState.FINISHED
    ]
    cond: ColumnElement[bool] = r.state == RequestState.FINISHED
    if partial:
        worked = func.coalesce(r.prompt_tokens, 0) + func.coalesce(r.completion_tokens, 0) > 0
        cond = or_(cond, and_(r.state.in_(partial), worked))
    return cond


def _filters(
    kinds: frozenset[EventKind], window: _Window, tenant: str | None
) -> tuple[list[ColumnElement[bool]], list[ColumnElement[bool]]]:
    """WHERE clauses of the billable requests, and of the charges, in scope."""
    r, e = RequestRow.__table__.c, LedgerEntry.__table__.c
    facts_where = [_billable(kinds), *window.where(r.finished_at)]
    entries_where = [e.kind.in_(CHARGE_KINDS), *window.where(e.created_at)]
    if tenant is not None:
        facts_where.append(r.tenant == tenant)
        entries_where.append(e.tenant == tenant)
    return facts_where, entries_where


def _ledger_side(
    sessions: sessionmaker[Session],
    kinds: frozenset[EventKind],
    window: _Window,
    tenant: str | None,
    found: dict[Category, dict[str, Difference]],
    missing: dict[str, _Missing],
    progress: Progress | None,
) -> tuple[int, int]:
    """The requests table's billable facts and every charge in the window: the missing,
    the duplicated and the mispriced, a transaction each. Returns (facts, charges)
    counted."""
    r, e = RequestRow.__table__.c, LedgerEntry.__table__.c
    facts_where, entries_where = _filters(kinds, window, tenant)
    if progress:
        progress("ledger", 0, 3)
    billed = exists().where(e.request_id == r.id, e.kind.in_(CHARGE_KINDS))
    with transaction(sessions) as session:
        facts = session.execute(select(func.count()).where(*facts_where)).scalar_one()
        charges = session.execute(select(func.count()).where(*entries_where)).scalar_one()
        rows = session.execute(
            select(r.id, r.tenant, r.model, r.priority, r.state, r.submitted_at, r.dispatched_at,
                   r.first_token_at, r.finished_at, r.prompt_tokens, r.completion_tokens,
                   r.batch_id, r.custom_id, r.error)
            .where(*facts_where, ~billed)
        ).all()  # fmt: skip
    for row in rows:
        m = _missing_of_row(row)
        missing[row.id] = m
        found[Category.missing][row.id] = Difference(
            Category.missing, row.id, row.tenant,
            f"{row.state.name.lower()} at {_iso(row.finished_at)}, "
            f"{_tokens(row.prompt_tokens, row.completion_tokens)}: no charge",
        )  # fmt: skip
    if progress:
        progress("ledger", 1, 3)

    count = func.count()
    with transaction(sessions) as session:
        twice = session.execute(
            select(e.request_id, func.min(e.tenant).label("tenant"), count.label("n"))
            .where(*entries_where)
            .group_by(e.request_id)
            .having(count > 1)
        ).all()
    for row in twice:
        found[Category.duplicated][row.request_id] = Difference(
            Category.duplicated, row.request_id, row.tenant, f"{row.n} charges"
        )
    if progress:
        progress("ledger", 2, 3)

    with transaction(sessions) as session:
        _mispriced(session, entries_where, found)
    if progress:
        progress("ledger", 3, 3)
    return facts, charges


def _missing_of_row(row: Any, tokens: tuple[int, int] | None = None) -> _Missing:
    """The event a worker sent for a ``requests`` row (its counts, else ``tokens``)."""
    if tokens is None and (row.prompt_tokens is None or row.completion_tokens is None):
        why = "no token counts in the ledger's requests row, the result store or the batch's results file"
        return _Missing(row.id, row.tenant, None, why, row)
    pt, ct = tokens or (row.prompt_tokens, row.completion_tokens)
    kind = _KIND_OF_STATE[row.state]
    reason = None
    if kind is not EventKind.finished:
        reason = row.error or f"{row.state.name.lower()}: reconciled"
        if row.state is RequestState.EXPIRED and not reason.startswith("expired"):
            reason = f"expired: {reason}"
    fin = row.finished_at.timestamp()
    event = TokenEvent(
        kind=kind, request_id=row.id, tenant=row.tenant, model=row.model, priority=row.priority,
        worker="reconcile", prompt_tokens=pt, completion_tokens=ct,
        ts=fin, submitted_at=_ts(row.submitted_at), dispatched_at=_ts(row.dispatched_at),
        first_token_at=_ts(row.first_token_at), finished_at=fin, reason=reason,
        batch_id=row.batch_id, custom_id=row.custom_id,
    )  # fmt: skip
    return _Missing(row.id, row.tenant, event)


def _from_batch_files(home: Path, missing: dict[str, _Missing]) -> None:
    """Token counts for finished batch lines whose ``requests`` row has none (the runner
    was killed between its results file and the ledger) and no stored event: from the
    usage in the batch's ``results.jsonl``, which the runner fsyncs before the ledger."""
    by_batch: dict[str, dict[str, _Missing]] = {}
    for m in missing.values():
        row = m.row
        if (
            m.event is None
            and row is not None
            and row.batch_id
            and row.state is RequestState.FINISHED
        ):
            by_batch.setdefault(row.batch_id, {})[m.request_id] = m
    if not by_batch:
        return
    # Imported here: the producers package loads the client (seconds), needed only now.
    from tokenmill.producers.batch_files import BatchDir, read_jsonl

    for batch_id, wanted in by_batch.items():
        for rec in read_jsonl(BatchDir.of(home, batch_id).results):
            hit = wanted.get(rec.get("request_id", ""))
            if hit is None or rec.get("status") != "succeeded":
                continue
            usage: Any = (((rec.get("entry") or {}).get("response") or {}).get("body") or {}).get(
                "usage"
            )
            try:
                tokens = (int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
            except (TypeError, KeyError, ValueError):
                continue
            missing[hit.request_id] = _missing_of_row(hit.row, tokens)


def _spans(session: Session, book: PriceBook[Card]) -> list[tuple[Card, datetime | None]]:
    """Every stored version and when the next version of its model starts (None: still
    in force)."""
    models = session.execute(select(PriceCardVersion.model).distinct()).scalars()
    out: list[tuple[Card, datetime | None]] = []
    for model in models:
        versions = book.versions(model)
        out += [(c, versions[i + 1].effective_from if i + 1 < len(versions) else None)
                for i, c in enumerate(versions)]  # fmt: skip
    return out


def _rate(per_million: Decimal, priority: Priority, discount: Decimal) -> Decimal | None:
    """The exact per-token rate :func:`pricing.cost` charges, if a whole number of ledger
    units (then a charge is ``rate × tokens``, nothing rounded); None otherwise."""
    factor = Decimal(1) - discount if priority is Priority.batch else Decimal(1)
    rate = per_million * factor / Decimal(1_000_000)
    return rate if rate == rate.quantize(pricing.COST_QUANTUM) and rate >= 0 else None


def _mispriced(
    session: Session,
    entries_where: list[ColumnElement[bool]],
    found: dict[Category, dict[str, Difference]],
) -> None:
    """Charges whose card, amount or tokens disagree: SQL finds candidates (amount ≠
    rate × tokens with the card in force, or tokens differing from the usage record or
    the requests row), :func:`pricing.cost` confirms each."""
    book = load_price_book(session)
    spans_of = _spans(session, book)
    if not spans_of:
        return  # no card, no charge (a charge must name its card)
    # One row per card version and priority: its span and exact rates, typed like the
    # ledger's columns so the comparison below is exact on both databases.
    pg = session.get_bind().dialect.name == "postgresql"

    def typed(value: Any, type_: Any) -> Any:
        # PostgreSQL types a bare parameter as text: cast. (On SQLite a CAST would change
        # stored text times to numbers: the column type alone binds them.)
        v = null() if value is None else literal(value, type_)
        return cast(v, type_) if pg else v

    spans = union_all(*(
        select(typed(c.id, Integer()).label("card_id"), typed(c.model, String()).label("model"),
               typed(p.value, String()).label("priority"),
               typed(c.effective_from, UtcDateTime()).label("valid_from"),
               typed(until, UtcDateTime()).label("valid_until"),
               typed(_rate(c.input_per_million, p, c.batch_discount), MONEY).label("in_rate"),
               typed(_rate(c.output_per_million, p, c.batch_discount), MONEY).label("out_rate"))
        for c, until in spans_of for p in Priority
    )).cte("card_spans")  # fmt: skip
    e, u, r = LedgerEntry.__table__.c, UsageRecord.__table__.c, RequestRow.__table__.c
    cs = spans.c
    priority = func.coalesce(u.priority, r.priority)
    fact_known = and_(r.id.is_not(None), r.state >= RequestState.FINISHED,
                      r.prompt_tokens.is_not(None), r.completion_tokens.is_not(None))  # fmt: skip
    suspect = or_(
        cs.card_id.is_(None),
        cs.model != e.model,
        e.created_at < cs.valid_from,
        and_(cs.valid_until.is_not(None), e.created_at >= cs.valid_until),
        cs.in_rate.is_(None),
        cs.out_rate.is_(None),
        e.amount != cs.in_rate * e.prompt_tokens + cs.out_rate * e.completion_tokens,
        u.request_id.is_(None),
        u.prompt_tokens != e.prompt_tokens,
        u.completion_tokens != e.completion_tokens,
        and_(fact_known, or_(r.prompt_tokens != e.prompt_tokens,
                             r.completion_tokens != e.completion_tokens, r.priority != u.priority)),
    )  # fmt: skip
    query: Select[Any] = (
        select(e.request_id, e.tenant, e.model, e.amount, e.price_card_version_id, e.prompt_tokens,
               e.completion_tokens, e.created_at, u.priority.label("u_priority"),
               u.prompt_tokens.label("u_prompt"), u.completion_tokens.label("u_completion"),
               r.priority.label("r_priority"), r.prompt_tokens.label("r_prompt"),
               r.completion_tokens.label("r_completion"), fact_known.label("fact_known"))
        .select_from(LedgerEntry.__table__)
        .outerjoin(UsageRecord.__table__, u.request_id == e.request_id)
        .outerjoin(RequestRow.__table__, r.id == e.request_id)
        .outerjoin(spans, and_(cs.card_id == e.price_card_version_id, cs.priority == priority))
        .where(*entries_where, suspect)
    )  # fmt: skip
    for row in session.execute(query):
        why = _why_mispriced(row, book)
        if why:
            found[Category.mispriced][row.request_id] = Difference(
                Category.mispriced, row.request_id, row.tenant, "; ".join(why)
            )


def _why_mispriced(row: Any, book: PriceBook[Card]) -> list[str]:
    why: list[str] = []
    tokens = (row.prompt_tokens, row.completion_tokens)
    if row.fact_known and (row.r_prompt, row.r_completion) != tokens:
        why.append(
            f"billed {_tokens(*tokens)}, the request used {_tokens(row.r_prompt, row.r_completion)}"
        )
        tokens = (row.r_prompt, row.r_completion)
    if row.u_priority is None:
        why.append("no usage record")
    elif (row.u_prompt, row.u_completion) != (row.prompt_tokens, row.completion_tokens):
        why.append(f"usage record has {_tokens(row.u_prompt, row.u_completion)}")
    if row.fact_known and row.r_priority is not None and row.u_priority is not None \
            and row.r_priority != row.u_priority:  # fmt: skip
        why.append(f"usage priority {row.u_priority.value}, the request's {row.r_priority.value}")
    priority = row.r_priority if row.fact_known and row.r_priority is not None else row.u_priority
    card = book.in_force(row.model, row.created_at)
    if card is None:
        why.append(f"no price card for {row.model} at {_iso(row.created_at)}")
    else:
        if card.id != row.price_card_version_id:
            why.append(f"priced with card version {row.price_card_version_id}, "
                       f"version {card.id} was in force")  # fmt: skip
        if priority is not None:
            expected = pricing.cost(card, tokens[0], tokens[1], priority)
            if expected != row.amount:
                why.append(f"charged {row.amount:f}, the card says {expected:f}")
    return why


# -- the result store -------------------------------------------------------------------


class _Stored(NamedTuple):
    """A terminal event in the result store, as far as reconciling needs it."""

    kind: str
    tenant: str
    prompt_tokens: int
    completion_tokens: int
    finished_at: float
    raw: bytes


def _read_store(
    client: redis.Redis,
    kinds: frozenset[EventKind],
    window: _Window,
    tenant: str | None,
    progress: Progress | None,
) -> dict[str, _Stored]:
    """The billable terminal events in the result store, in scope, by request id
    (parsed field by field: a full decode only for those repaired)."""
    kind_values = {k.value for k in kinds}
    facts: dict[str, _Stored] = {}
    seen = 0
    for raws in _scan_final_events(client):
        seen += len(raws)
        for raw in raws:
            if raw is None:
                continue  # expired between SCAN and MGET
            try:
                ev = pydantic_core.from_json(raw)
                rid = ev["request_id"]
                fact = _Stored(ev["kind"], ev["tenant"], int(ev.get("prompt_tokens", 0)),
                               int(ev.get("completion_tokens", 0)), float(ev["finished_at"]), raw)  # fmt: skip
            except (ValueError, KeyError, TypeError):
                log.warning("reconcile: unreadable terminal event", raw=raw[:200])
                continue
            if fact.kind not in kind_values or not (fact.kind == "finished" or fact.prompt_tokens
                                                    or fact.completion_tokens):  # fmt: skip
                continue
            if (tenant is None or fact.tenant == tenant) and window.holds(fact.finished_at):
                facts[rid] = fact
        if progress:
            progress("results", seen, None)
    return facts


def _results_side(
    sessions: sessionmaker[Session],
    client: redis.Redis,
    kinds: frozenset[EventKind],
    window: _Window,
    tenant: str | None,
    found: dict[Category, dict[str, Difference]],
    missing: dict[str, _Missing],
    progress: Progress | None,
) -> int:
    """The result store's billable events compared with the charges of their request ids
    (every charge, in or out of the window), ``_IDS_PER_QUERY`` ids a query. Returns how
    many of these facts the requests table had not counted."""
    facts = _read_store(client, kinds, window, tenant, progress)
    e, r = LedgerEntry.__table__.c, RequestRow.__table__.c
    ids = sorted(facts)
    billed: dict[str, tuple[int, int]] = {}
    counted: set[str] = set()
    facts_where, _ = _filters(kinds, window, tenant)
    chunk_ids: BindParameter[list[str]] = bindparam("ids", expanding=True)  # no per-id coercion
    charges_of = select(e.request_id, e.prompt_tokens, e.completion_tokens).where(
        e.request_id.in_(chunk_ids), e.kind.in_(CHARGE_KINDS)
    )
    in_ledger_facts = select(r.id).where(r.id.in_(chunk_ids), *facts_where)
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = {"ids": ids[start : start + _IDS_PER_QUERY]}
        with transaction(sessions) as session:
            charged = session.execute(charges_of, chunk).all()
            counted.update(session.execute(in_ledger_facts, chunk).scalars())
        for row in charged:
            billed[row.request_id] = (row.prompt_tokens, row.completion_tokens)
    for rid in ids:
        fact = facts[rid]
        tokens = (fact.prompt_tokens, fact.completion_tokens)
        got = billed.get(rid)
        if got is None:
            known = missing.get(rid)
            if known is None or known.event is None:  # the stored event is the better fact
                missing[rid] = _Missing(rid, fact.tenant, decode(TokenEvent, fact.raw))
                at = _iso(datetime.fromtimestamp(fact.finished_at, UTC))
                found[Category.missing][rid] = Difference(
                    Category.missing, rid, fact.tenant,
                    f"{fact.kind} at {at}, {_tokens(*tokens)} (result store): no charge",
                )  # fmt: skip
        elif got != tokens and rid not in found[Category.mispriced]:
            found[Category.mispriced][rid] = Difference(
                Category.mispriced, rid, fact.tenant,
                f"billed {_tokens(*got)}, the result store's event has {_tokens(*tokens)}",
            )  # fmt: skip
    return len(facts) - len(counted)


def _scan_final_events(client: redis.Redis) -> Iterator[list[bytes | None]]:
    """The stored terminal events, a SCAN step at a time: each step's keys read with one
    MGET, pipelined with the next SCAN step."""
    pattern = keys.final_event("*")
    cursor, batch = client.scan(0, match=pattern, count=_SCAN_COUNT)
    while True:
        pipe = client.pipeline(transaction=False)
        if batch:
            pipe.mget(batch)
        if cursor:
            pipe.scan(cursor, match=pattern, count=_SCAN_COUNT)
        replies = pipe.execute() if (batch or cursor) else []
        if batch:
            yield replies.pop(0)
        if not cursor:
            return
        cursor, batch = replies[0]


# -- small helpers ----------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ts(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


def _tokens(prompt: int | None, completion: int | None) -> str:
    return f"{prompt}+{completion} tokens"

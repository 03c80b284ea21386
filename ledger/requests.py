"""Accepted requests and their lifecycle (see :mod:`.state_machine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tokenmill.errors import NotFound
from tokenmill.wire import InferenceRequest, RequestState

from .errors import translated
from .models import RequestRow
from .state_machine import can_transition, check_transition
from .types import utc, utcnow
from .upsert import insert_ignore, insert_ignore_many


@translated
def upsert_request(session: Session, request: InferenceRequest) -> bool:
    """Record an accepted request as QUEUED, unless it is already recorded.

    Parameters:
        session: the caller's transaction.
        request: the wire request; its id is the row's key.

    Raises:
        LedgerError: e.g. another request id already holds its (batch_id, custom_id).

    Returns:
        True if the request is new.
    """
    values = {
        "id": request.id,
        "tenant": request.tenant,
        "model": request.model,
        "priority": request.priority,
        "state": RequestState.QUEUED,
        "batch_id": request.batch_id,
        "custom_id": request.custom_id,
        "submitted_at": utc(request.submitted_at),
        "attempts": 0,
    }
    return insert_ignore(session, RequestRow, values, ["id"])


@translated
def upsert_requests(session: Session, requests: Sequence[InferenceRequest]) -> int:
    """:func:`upsert_request` for many requests (batch files): multi-row inserts sent
    straight to the driver (:func:`~.upsert.insert_ignore_many`), in id order.

    Returns:
        How many were new.
    """
    rows = [
        {
            "id": r.id,
            "tenant": r.tenant,
            "model": r.model,
            "priority": r.priority,
            "state": RequestState.QUEUED,
            "batch_id": r.batch_id,
            "custom_id": r.custom_id,
            "submitted_at": utc(r.submitted_at),
            "attempts": 0,
        }
        for r in sorted({r.id: r for r in requests}.values(), key=lambda r: r.id)
    ]
    return len(insert_ignore_many(session, RequestRow, rows, ["id"], "id"))


@translated
def unfinished_batch_requests(session: Session, batch_id: str) -> list[str]:
    """Ids of a batch's requests not yet in a terminal state."""
    return list(
        session.execute(
            select(RequestRow.id).where(
                RequestRow.batch_id == batch_id, RequestRow.state < RequestState.FINISHED
            )
        ).scalars()
    )


@translated
def advance_request(
    session: Session,
    request_id: str,
    to: RequestState,
    *,
    at: datetime | None = None,
    error: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> bool:
    """Move a request to state ``to`` if the lifecycle allows it.

    Entering DISPATCHED stamps ``dispatched_at`` and counts an attempt; RUNNING stamps
    ``first_token_at``; a terminal state stamps ``finished_at`` and keeps ``error`` and
    the token counts given.

    Parameters:
        session: the caller's transaction (the row is locked until it ends).
        request_id: the request.
        to: the new state.
        at: when it happened (default: now).
        error: the reason, for FAILED (or any terminal state).
        prompt_tokens, completion_tokens: final counts, for a terminal state.

    Raises:
        NotFound: no such request.
        IllegalTransition: the lifecycle forbids it (a LedgerError naming both states).

    Returns:
        True if the state changed, False if the request was already in ``to``.
    """
    to = RequestState(to)
    row = session.execute(
        select(RequestRow)
        .where(RequestRow.id == request_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"request {request_id} not found")
    if not check_transition(row.state, to, request_id=request_id):
        return False
    when = utc(at) if at is not None else utcnow()
    row.state = to
    if to is RequestState.DISPATCHED:
        row.dispatched_at = when
        row.attempts += 1
    elif to is RequestState.RUNNING:
        row.first_token_at = when
    elif to.is_terminal:
        row.finished_at = when
        row.error = error
        if prompt_tokens is not None:
            row.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            row.completion_tokens = completion_tokens
    session.flush()
    return True


@dataclass(frozen=True, slots=True)
class Outcome:
    """A request's end, for :func:`settle_requests`."""

    request_id: str
    state: RequestState  #: a terminal state
    at: datetime | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


#: ids per SELECT ... IN (...) (SQLite allows 32,766 parameters; keep statements small)
_SETTLE_CHUNK = 500


@translated
def settle_requests(session: Session, outcomes: Sequence[Outcome]) -> int:
    """Bring many requests to their terminal states at once, as :func:`advance_request`
    one by one would through the lifecycle: a request already terminal keeps its end (the
    first outcome stands); one still queued passes through DISPATCHED to FINISHED; a
    running one that expired is CANCELLED. One locking SELECT and one bulk UPDATE per
    chunk instead of a SELECT and a flush per request and step.

    Returns:
        How many requests changed.
    """
    changed = 0
    for start in range(0, len(outcomes), _SETTLE_CHUNK):
        chunk = outcomes[start : start + _SETTLE_CHUNK]
        rows = session.execute(
            select(RequestRow.id, RequestRow.state, RequestRow.attempts, RequestRow.dispatched_at)
            .where(RequestRow.id.in_([o.request_id for o in chunk]))
            .with_for_update()
        ).all()
        current = {r.id: r for r in rows}
        updates: list[dict[str, object]] = []
        for o in chunk:
            row = current.get(o.request_id)
            if row is None or row.state.is_terminal:
                continue
            when = utc(o.at) if o.at is not None else utcnow()
            change: dict[str, object] = {"id": o.request_id, "finished_at": when}
            finished = o.state is RequestState.FINISHED
            if can_transition(row.state, o.state) or finished:
                change.update(state=o.state, error=o.error)
                if o.prompt_tokens is not None:
                    change["prompt_tokens"] = o.prompt_tokens
                if o.completion_tokens is not None:
                    change["completion_tokens"] = o.completion_tokens
                if not can_transition(row.state, o.state):  # finished, never dispatched as far
                    change.update(dispatched_at=when, attempts=row.attempts + 1)  # as the ledger knew
            else:  # a running request cannot expire: it was stopped
                change.update(state=RequestState.CANCELLED, error=None)
            updates.append(change)
        if updates:
            session.execute(update(RequestRow), updates)
            changed += len(updates)
    return changed


@translated
def get_request(session: Session, tenant: str, request_id: str) -> RequestRow:
    """A tenant's request.

    Raises:
        NotFound: no such request for this tenant (another tenant's looks the same).
    """
    row = session.execute(
        select(RequestRow).where(RequestRow.id == request_id, RequestRow.tenant == tenant)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"request {request_id} not found")
    return row

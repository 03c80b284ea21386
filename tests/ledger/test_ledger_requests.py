"""The request state machine, pure and through the database."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.ledger import (
    TRANSITIONS,
    IllegalTransition,
    Outcome,
    advance_request,
    can_transition,
    check_transition,
    get_request,
    settle_requests,
    transaction,
    upsert_request,
)

from tokenmill.errors import LedgerError, NotFound
from tokenmill.wire import InferenceRequest, Priority, RequestState

S = RequestState
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

LEGAL = {
    (S.QUEUED, S.DISPATCHED), (S.QUEUED, S.FAILED), (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.EXPIRED),
    (S.DISPATCHED, S.RUNNING), (S.DISPATCHED, S.QUEUED), (S.DISPATCHED, S.FINISHED),
    (S.DISPATCHED, S.FAILED), (S.DISPATCHED, S.CANCELLED), (S.DISPATCHED, S.EXPIRED),
    (S.RUNNING, S.QUEUED), (S.RUNNING, S.FINISHED), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
}  # fmt: skip


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
def test_transition_table(current: RequestState, target: RequestState) -> None:
    if current == target:
        assert check_transition(current, target) is False  # redelivery: no-op
    elif (current, target) in LEGAL:
        assert check_transition(current, target) is True
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition(current, target, request_id="req_1")
        assert issubclass(type(info.value), LedgerError)
        assert f"{current.name} -> {target.name}" in str(info.value)
        assert "req_1" in str(info.value)
        assert (info.value.from_state, info.value.to_state) == (current, target)


def test_terminal_states_have_no_exits() -> None:
    assert all(not TRANSITIONS[s] for s in S if s.is_terminal)
    assert set(TRANSITIONS) == set(S)


@given(st.lists(st.sampled_from(list(S)), max_size=30))
def test_random_sequences_never_leave_a_terminal_state(targets: list[RequestState]) -> None:
    state = S.QUEUED
    for target in targets:
        before = state
        try:
            if check_transition(state, target):
                state = target
        except IllegalTransition:
            assert not can_transition(before, target)
        if before.is_terminal:
            assert state == before


def _request(tenant: str = "alpha", **kw: object) -> InferenceRequest:
    return InferenceRequest(
        tenant=tenant, model="sim", priority=Priority.standard,
        body={"messages": [{"role": "user", "content": "hi"}]},
        max_tokens=16, prompt_tokens_estimate=3, submitted_at=T0.timestamp(), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_upsert_is_idempotent_and_reads_are_tenant_scoped(
    sessions: sessionmaker[Session],
) -> None:
    req = _request()
    with transaction(sessions) as s:
        assert upsert_request(s, req) is True
        assert upsert_request(s, req) is False
    with transaction(sessions) as s:
        assert upsert_request(s, req) is False
        row = get_request(s, "alpha", req.id)
        assert row.state is S.QUEUED and row.submitted_at == T0 and row.attempts == 0
        with pytest.raises(NotFound):
            get_request(s, "beta", req.id)


def test_duplicate_custom_id_under_another_id_is_refused(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        upsert_request(s, _request(batch_id="batch_1", custom_id="line-1"))
    with pytest.raises(LedgerError), transaction(sessions) as s:
        upsert_request(s, _request(batch_id="batch_1", custom_id="line-1"))


def test_lifecycle_stamps_times_and_counts_attempts(sessions: sessionmaker[Session]) -> None:
    req = _request()
    steps = [
        (S.DISPATCHED, True), (S.DISPATCHED, False),  # redelivered message: no-op
        (S.QUEUED, True),  # worker lost: back to the queue
        (S.DISPATCHED, True), (S.RUNNING, True), (S.RUNNING, False), (S.FINISHED, True),
    ]  # fmt: skip
    with transaction(sessions) as s:
        upsert_request(s, req)
    for i, (to, changed) in enumerate(steps):
        with transaction(sessions) as s:
            at = T0 + timedelta(seconds=i + 1)
            assert (
                advance_request(s, req.id, to, at=at, prompt_tokens=3, completion_tokens=5)
                is changed
            )
    with transaction(sessions) as s:
        row = get_request(s, "alpha", req.id)
        assert row.state is S.FINISHED
        assert row.attempts == 2
        assert row.dispatched_at == T0 + timedelta(seconds=4)
        assert row.first_token_at == T0 + timedelta(seconds=5)
        assert row.finished_at == T0 + timedelta(seconds=7)
        assert (row.prompt_tokens, row.completion_tokens) == (3, 5)
        with pytest.raises(IllegalTransition, match="FINISHED -> QUEUED"):
            advance_request(s, req.id, S.QUEUED)
        with pytest.raises(NotFound):
            advance_request(s, "req_missing", S.DISPATCHED)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(targets=st.lists(st.sampled_from(list(S)), min_size=1, max_size=8))
def test_database_agrees_with_the_table(
    sessions: sessionmaker[Session], targets: list[RequestState]
) -> None:
    req = _request(id=f"req_{uuid.uuid4().hex}")
    with transaction(sessions) as s:
        upsert_request(s, req)
    expected = S.QUEUED
    for target in targets:
        try:
            with transaction(sessions) as s:
                advance_request(s, req.id, target)
        except IllegalTransition:
            assert not can_transition(expected, target)
        else:
            assert can_transition(expected, target)
            expected = target
        with transaction(sessions) as s:
            assert get_request(s, "alpha", req.id).state is expected


PATHS = {  # how a request reaches each state before its outcome is settled
    S.QUEUED: [], S.DISPATCHED: [S.DISPATCHED], S.RUNNING: [S.DISPATCHED, S.RUNNING],
    S.FINISHED: [S.DISPATCHED, S.FINISHED], S.FAILED: [S.FAILED], S.CANCELLED: [S.CANCELLED],
    S.EXPIRED: [S.EXPIRED],
}
ENDS = [S.FINISHED, S.FAILED, S.CANCELLED, S.EXPIRED]


def test_bulk_settle_agrees_with_advancing_one_by_one(sessions: sessionmaker[Session]) -> None:
    # Every (state now, outcome) pair, settled in bulk and through the lifecycle one step
    # at a time as the batch runner used to: the rows must end the same.
    pairs = list(itertools.product(PATHS, ENDS))
    bulk, single = [], []
    with transaction(sessions) as s:
        for state, _ in pairs * 2:
            req = _request()
            upsert_request(s, req)
            for step in PATHS[state]:
                advance_request(s, req.id, step, at=T0)
            (bulk if len(bulk) < len(pairs) else single).append(req.id)
    at = T0 + timedelta(seconds=5)
    outcomes = [Outcome(rid, end, at=at, error="e" if end is S.FAILED else None, prompt_tokens=3,
                        completion_tokens=4) for rid, (_, end) in zip(bulk, pairs)]
    with transaction(sessions) as s:
        settle_requests(s, outcomes + [Outcome("req_missing", S.FINISHED)])
    with transaction(sessions) as s:
        for rid, (_, end) in zip(single, pairs):
            try:
                advance_request(s, rid, end, at=at, error="e" if end is S.FAILED else None,
                                prompt_tokens=3, completion_tokens=4)
            except IllegalTransition as exc:
                if exc.from_state.is_terminal:
                    continue
                step = S.DISPATCHED if end is S.FINISHED else S.CANCELLED
                advance_request(s, rid, step, at=at)
                if step is S.DISPATCHED:
                    advance_request(s, rid, end, at=at, prompt_tokens=3, completion_tokens=4)
    fields = ("state", "dispatched_at", "finished_at", "attempts", "prompt_tokens", "completion_tokens",
              "error")
    with transaction(sessions) as s:
        for a, b, pair in zip(bulk, single, pairs):
            ra, rb = get_request(s, "alpha", a), get_request(s, "alpha", b)
            assert [getattr(ra, f) for f in fields] == [getattr(rb, f) for f in fields], pair

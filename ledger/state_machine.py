"""The request lifecycle as a transition table (pure: no I/O).

::

    from          to
    QUEUED        DISPATCHED; FAILED, CANCELLED, EXPIRED (never ran)
    DISPATCHED    RUNNING, FINISHED, FAILED, CANCELLED, EXPIRED; QUEUED (redelivery)
    RUNNING       FINISHED, FAILED, CANCELLED; QUEUED (redelivery)
    FINISHED, FAILED, CANCELLED, EXPIRED      nothing: terminal

- A worker may report ``finished`` without a separate ``first_token`` step (the
  finished event carries ``first_token_at``), so DISPATCHED may go straight to
  FINISHED. Only a request that has not produced tokens can EXPIRE.
- Terminal states (:attr:`RequestState.is_terminal`) never change.
- Moving to the state a request is already in is a no-op, not an error: that is what
  a redelivered message does.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenmill.wire import RequestState

from .errors import IllegalTransition

Q, D, R = RequestState.QUEUED, RequestState.DISPATCHED, RequestState.RUNNING
FINISHED, FAILED = RequestState.FINISHED, RequestState.FAILED
CANCELLED, EXPIRED = RequestState.CANCELLED, RequestState.EXPIRED

#: every allowed change of state (staying in the same state is allowed separately)
TRANSITIONS: Mapping[RequestState, frozenset[RequestState]] = {
    Q: frozenset({D, FAILED, CANCELLED, EXPIRED}),
    D: frozenset({Q, R, FINISHED, FAILED, CANCELLED, EXPIRED}),
    R: frozenset({Q, FINISHED, FAILED, CANCELLED}),
    **{s: frozenset() for s in RequestState if s.is_terminal},
}


def can_transition(current: RequestState, target: RequestState) -> bool:
    """Whether ``current -> target`` is allowed (staying put always is)."""
    return current == target or target in TRANSITIONS[current]


def check_transition(
    current: RequestState, target: RequestState, *, request_id: str | None = None
) -> bool:
    """Validate ``current -> target``.

    Parameters:
        current: the request's state now.
        target: the state asked for.
        request_id: named in the error, if given.

    Raises:
        IllegalTransition: the lifecycle does not allow it (a LedgerError naming both states).

    Returns:
        True if the state changes, False if it is a no-op (already in ``target``).
    """
    if current == target:
        return False
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(request_id, current, target)
    return True

"""Ledger errors, and the translation of SQLAlchemy's exceptions where they enter::

LedgerError                  (tokenmill.errors) the database refused an operation
├── IllegalTransition        a request state change the lifecycle does not allow
└── LedgerConflict           a transient conflict (deadlock, serialization failure,
                             SQLite busy): retry the whole transaction
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from sqlalchemy import exc as sa_exc

from tokenmill.errors import LedgerError
from tokenmill.wire import RequestState

P = ParamSpec("P")
R = TypeVar("R")

# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class IllegalTransition(LedgerError):
    """A request state change that the lifecycle does not allow."""

    def __init__(self, request_id: str | None, from_state: RequestState, to_state: RequestState):
        who = f"request {request_id}: " if request_id else ""
        super().__init__(f"{who}illegal state transition {from_state.name} -> {to_state.name}")
        self.request_id = request_id
        self.from_state = from_state
        self.to_state = to_state


class LedgerConflict(LedgerError):
    """A transient conflict with a concurrent transaction; the transaction can be retried."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock, serialization failure or SQLite lock timeout."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    msg = str(orig).lower()
    return isinstance(exc, sa_exc.OperationalError) and (
        "database is locked" in msg or "database is busy" in msg
    )


def translate(exc: sa_exc.SQLAlchemyError, operation: str) -> LedgerError:
    """The :class:`LedgerError` for a SQLAlchemy exception (raise it ``from exc``)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        detail = str(exc.orig).strip().splitlines()[0]
    else:
        detail = str(exc).strip().splitlines()[0]
    cls = LedgerConflict if is_transient(exc) else LedgerError
    return cls(f"{operation}: {type(exc).__name__}: {detail}")


def translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a ledger operation so SQLAlchemy errors leave it as :class:`LedgerError`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, fn.__name__) from exc

    return wrapper

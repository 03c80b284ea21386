"""Errors raised by the scheduling policy.

::

    SchedulerError
    ├── UnknownTenant      the request names a tenant that was never added
    ├── UnknownModel       the request names a model that no pool was declared for
    ├── InvalidRequest     a malformed request or token count (negative, NaN, ...)
    ├── InvalidPolicy      a malformed tenant policy or scheduler config
    ├── DuplicateRequest   a request id that is already queued or in flight
    ├── BudgetExceeded     the request alone would exceed the tenant's budget
    └── Fenced             (service, :mod:`.leader`) this scheduler lost its lease

Every error is raised before any state changes, so a caller may catch it and go on.
"""

from __future__ import annotations

from decimal import Decimal

from ..errors import TokenmillError


class SchedulerError(TokenmillError):
    """Base of every error the scheduling policy raises."""


class UnknownTenant(SchedulerError):
    """The tenant was never added with :meth:`Scheduler.add_tenant`."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"unknown tenant {tenant!r}")
        self.tenant = tenant


class UnknownModel(SchedulerError):
    """The model was never declared with :meth:`Scheduler.add_model`."""

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown model {model!r}")
        self.model = model


class InvalidRequest(SchedulerError):
    """A request or a reported token count is malformed."""


class InvalidPolicy(SchedulerError):
    """A tenant policy, pool or scheduler config is malformed."""


class DuplicateRequest(SchedulerError):
    """A request with this id is already queued or in flight."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id!r} is already queued or in flight")
        self.request_id = request_id


class BudgetExceeded(SchedulerError):
    """The request's reservation does not fit in what is left of the tenant's budget.

    ``needed`` is the reservation (cost at ``max_output_tokens``), ``available`` what the
    current budget period has left once settled spending is subtracted.
    """

    def __init__(self, tenant: str, needed: Decimal, available: Decimal) -> None:
        super().__init__(
            f"tenant {tenant!r}: request needs a reservation of {needed}, "
            f"budget has {available} left this period"
        )
        self.tenant = tenant
        self.needed = needed
        self.available = available

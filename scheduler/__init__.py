"""tokenmill's fair-share scheduling policy: a pure, synchronous data structure.

The scheduler service drives a :class:`Scheduler` with requests read from the priority
topics and with worker pools' free capacity; it does no I/O and reads no clock.
"""

from .errors import (
    BudgetExceeded,
    DuplicateRequest,
    InvalidPolicy,
    InvalidRequest,
    SchedulerError,
    UnknownModel,
    UnknownTenant,
)
from .policy import Scheduler
from .snapshot import InFlightRecord, SchedulerSnapshot
from .types import (
    PRIORITIES,
    BudgetView,
    Completion,
    CostFn,
    Dispatch,
    DispatchResult,
    Pool,
    Priority,
    QueuedRequest,
    Rejection,
    RejectReason,
    SchedulerConfig,
    TenantPolicy,
)

__all__ = [
    "PRIORITIES",
    "BudgetExceeded",
    "BudgetView",
    "Completion",
    "CostFn",
    "Dispatch",
    "DispatchResult",
    "DuplicateRequest",
    "InFlightRecord",
    "InvalidPolicy",
    "InvalidRequest",
    "Pool",
    "Priority",
    "QueuedRequest",
    "RejectReason",
    "Rejection",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerSnapshot",
    "TenantPolicy",
    "UnknownModel",
    "UnknownTenant",
]

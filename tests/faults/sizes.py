"""How big a fault drill is: the issue's full size under ``make faults``
(``FAULTS_SIZE=full``), a small one by default so ``make test`` stays quick."""

from __future__ import annotations

import os
from dataclasses import dataclass

SIZE_VAR = "FAULTS_SIZE"


@dataclass(frozen=True)
class Size:
    name: str
    lines_per_tenant: int  #: batch lines of each of the three tenants
    interactive: int  #: interactive requests, in two waves (start, and just before the kill)
    hooked_every: int  #: every n-th interactive request goes through the request API with a webhook
    decode_ms_per_step: (
        float  #: the sim engine's step: every token of a running sequence takes this long
    )
    max_in_flight: int  #: sequences the one worker runs at once
    max_tokens: tuple[int, int]  #: completion lengths vary over this range (inclusive)
    kill_at: float  #: share of the batch lines done when the fault strikes
    #: bounds on waits (generous: a bound that trips is a finding, not flakiness)
    batch_done_s: float  #: the batches end after recovery
    request_timeout_s: float  #: the gateway's and (plus a margin) the client's wait for one answer
    settle_s: float  #: the ledger and the webhooks catch up once the batches have ended
    error_within_s: float  #: callers of a lost Redis/broker hear so, before anyone restarts it
    test_timeout_s: float  #: one case, set-up to teardown
    #: the workers' Celery visibility timeout: a lost worker's (or a lost Redis's) unacked
    #: slices come back after it (running workers renew theirs)
    visibility_timeout_s: float = 60.0

    @property
    def lines(self) -> int:
        return 3 * self.lines_per_tenant


SMALL = Size(
    name="small",
    lines_per_tenant=40,
    interactive=60,
    hooked_every=6,
    decode_ms_per_step=50.0,
    max_in_flight=16,
    max_tokens=(4, 12),
    kill_at=0.3,
    batch_done_s=150.0,
    # above the workers' Celery visibility timeout: a killed worker's requests come back after it
    request_timeout_s=120.0,
    settle_s=30.0,
    error_within_s=15.0,
    test_timeout_s=420.0,
    # short, so the restarted stack's unacked slices come back within seconds (the
    # default 60 s made the Redis full-restart drill the longest test of `make test`)
    visibility_timeout_s=10.0,
)

# The drill: 3,000 lines from three tenants, 1,000 interactive requests, a ~1 s
# decode step and 1,500 sequences in flight.
FULL = Size(
    name="full",
    lines_per_tenant=1000,
    interactive=1000,
    hooked_every=10,
    decode_ms_per_step=1000.0,
    max_in_flight=1500,
    max_tokens=(4, 12),
    kill_at=0.3,
    batch_done_s=900.0,
    request_timeout_s=300.0,
    settle_s=120.0,
    error_within_s=30.0,
    test_timeout_s=2400.0,
)

SIZES = {s.name: s for s in (SMALL, FULL)}


def chosen() -> Size:
    """The size named by ``$FAULTS_SIZE`` (default ``small``).

    Raises:
        ValueError: an unknown size name.
    """
    name = os.environ.get(SIZE_VAR, "small")
    if name not in SIZES:
        raise ValueError(f"${SIZE_VAR}={name!r}: expected one of {', '.join(SIZES)}")
    return SIZES[name]

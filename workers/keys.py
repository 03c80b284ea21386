"""Every Redis key the workers write, in one place (readers use these too).

=====================================  ==========================================
key                                    what
=====================================  ==========================================
``tokenmill:result:<request_id>``      :class:`~tokenmill.wire.Result` JSON (TTL)
``tokenmill:final-event:<request_id>`` the terminal TokenEvent JSON, kept so a
                                       redelivery re-sends the *same* event
``tokenmill:reported:<request_id>``    set once the terminal event reached Kafka
``tokenmill:stream:<request_id>``      Redis Stream: ``delta`` entries (streaming
                                       requests) then one ``end`` entry
``tokenmill:cancel:<request_id>``      cancel requested (set by clients/scheduler)
``tokenmill:lease:<request_id>``       worker running it; TTL, renewed while it runs
``tokenmill:attempts:<request_id>``    runs started so far (INCR)
``tokenmill:done:<tenant>``            Redis Stream: one ``id`` entry per stored
                                       outcome of the tenant (clients' waiters)
``tokenmill:owner:<request_id>``       the tenant the gateway accepted it for (TTL):
                                       streams and cancels are checked against it
``tokenmill:workers:<pool>``           ZSET worker name → last heartbeat (epoch s)
``tokenmill:worker:<name>``            :class:`~tokenmill.wire.WorkerHeartbeat` JSON (TTL)
=====================================  ==========================================
"""

from __future__ import annotations

PREFIX = "tokenmill:"


def result(request_id: str) -> str:
    return f"{PREFIX}result:{request_id}"


def final_event(request_id: str) -> str:
    return f"{PREFIX}final-event:{request_id}"


def reported(request_id: str) -> str:
    return f"{PREFIX}reported:{request_id}"


def stream(request_id: str) -> str:
    return f"{PREFIX}stream:{request_id}"


def cancel(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


#: bumped by every cancel request, so workers poll one key until some cancel is asked
CANCEL_EPOCH = f"{PREFIX}cancel-epoch"
#: a list the gateway pushes a new batch's id on; an idle batch runner blocks on it
BATCH_WAKE = f"{PREFIX}batch-runner:wake"


def lease(request_id: str) -> str:
    return f"{PREFIX}lease:{request_id}"


def attempts(request_id: str) -> str:
    return f"{PREFIX}attempts:{request_id}"


def dispatched(request_id: str) -> str:
    """Set by the scheduler when it hands the request to a worker pool (a week's TTL):
    a re-read request is skipped, and a lost broker cannot have taken it with it."""
    return f"{PREFIX}dispatched:{request_id}"


def owner(request_id: str) -> str:
    return f"{PREFIX}owner:{request_id}"


def done(tenant: str) -> str:
    return f"{PREFIX}done:{tenant}"


def pool_workers(pool: str) -> str:
    return f"{PREFIX}workers:{pool}"


def worker(name: str) -> str:
    return f"{PREFIX}worker:{name}"

"""Stream processors as copies in one consumer group: each announces its partitions and
lag in Redis, a SIGKILLed copy's partitions move to the survivor and every event is
recorded once; two copies starting at once (each running the start-up repair) bill
each request once. Real broker, Redis, worker processes; SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis
import streams_helpers as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from streams_helpers import Workers
from tokenmill.config import Settings
from tokenmill.ledger import (
    LedgerEntry,
    Outcome,
    make_engine,
    session_factory,
    settle_requests,
    transaction,
    upsert_requests,
)
from tokenmill.ledger.streams import LedgerSink
from tokenmill.ledger.streams.app import SERVICE
from tokenmill.ledger.streams.worker import repair_on_start

from tokenmill.presence import Instance, live_instances
from tokenmill.stack import Endpoints
from tokenmill.wire import InferenceRequest, Priority, RequestState

PARTITIONS = 8  # StreamsConfig.partitions


def announced(client: redis.Redis, pids: set[int]) -> list[Instance]:
    return [i for i in live_instances(client) if i.service == SERVICE and int(i.instance.rsplit(":", 1)[1]) in pids]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the group is what is tested
def test_a_killed_copys_partitions_move_and_every_event_is_recorded_once(
    workers: Workers, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    env = {"TOKENMILL_REDIS_URL": redis_url, "TOKENMILL_STREAMS__BATCH_MAX": "200"}
    one, two = workers.start(**env), workers.start(**env)
    pids = {one.pid, two.pid}

    def split() -> list[Instance] | None:  # both copies hold partitions, all of them between them
        got = announced(client, pids)
        parts = [i.detail.get("partitions", 0) for i in got]
        return got if len(got) == 2 and min(parts) > 0 and sum(parts) == PARTITIONS else None

    st.wait_until(lambda: split() is not None, timeout_s=60, what="partitions spread over both copies")
    events = st.mixed_events(4_000, prefix="copies")
    workers.publish(events[:2_000], spread=True)  # keyed by request id: every partition
    st.wait_until(lambda: st.usage_count(workers.database_url) >= 200, timeout_s=60, what="consuming")
    one.kill()
    workers.publish(events[2_000:], spread=True)
    workers.wait_recorded(4_000)
    totals = st.ledger_totals(workers.database_url)
    assert (totals.usage_records, totals.charges) == (4_000, 4_000)  # each once
    # The survivor holds every partition and says so, with no lag left.
    st.wait_until(lambda: [(i.detail["partitions"], i.detail["lag"]) for i in announced(client, {two.pid})]
                  == [(PARTITIONS, 0)], timeout_s=30, what="the survivor announcing all partitions")
    assert sum(b["recorded"] for b in two.batches()) > 0
    assert two.log().count('"event": "partitions assigned"') >= 2  # it was given the dead copy's


def _finished_lines(sessions: sessionmaker[Session], n: int) -> list[str]:
    """``n`` batch lines the ledger holds as finished (with tokens) but never billed."""
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    reqs = [InferenceRequest(
        id=f"rep-{i:04d}", tenant="alpha", model="sim", priority=Priority.batch,
        body={"messages": [{"role": "user", "content": "hi"}]}, max_tokens=64, prompt_tokens_estimate=1,
        submitted_at=(at - timedelta(minutes=1)).timestamp(), batch_id="batch_rep", custom_id=str(i),
    ) for i in range(n)]  # fmt: skip
    with transaction(sessions) as s:
        upsert_requests(s, reqs)
        settle_requests(s, [Outcome(r.id, RequestState.FINISHED, at=at + timedelta(seconds=i),
                                    prompt_tokens=100 + i, completion_tokens=20) for i, r in enumerate(reqs)])
    return [r.id for r in reqs]


def test_two_copies_repairing_at_start_bill_each_request_once(
    ledger_url: str, sessions: sessionmaker[Session], settings: Settings
) -> None:
    lines = _finished_lines(sessions, 300)
    unreachable = Endpoints("127.0.0.1:1", "redis://127.0.0.1:1/0", ledger_url)  # the ledger's facts only
    engines = [make_engine(ledger_url) for _ in range(2)]  # as two processes would
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def start_copy(engine: object) -> None:
        try:
            sink = LedgerSink(session_factory(engine), settings)  # type: ignore[arg-type]
            sink.prepare()
            go.wait(timeout=30)
            repair_on_start(sink, unreachable)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=start_copy, args=(e,)) for e in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for e in engines:
            e.dispose()
    assert not errors and not any(t.is_alive() for t in threads), errors
    with transaction(sessions) as s:
        per_request = dict(s.execute(
            select(LedgerEntry.request_id, func.count()).group_by(LedgerEntry.request_id)).all())
    assert per_request == {rid: 1 for rid in lines}

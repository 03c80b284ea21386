"""``tokenmill reconcile``: the ledger's charges against the durable facts of the work
done — the ledger's requests table (SQLite and PostgreSQL) and the result store (a real
Redis) — and ``--repair`` billing what is missing exactly once through the ledger sink,
also while a sink writes the same events."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger import Outcome, Period, settle_requests, transaction, upsert_requests
from tokenmill.ledger import reconcile as reconcile_module
from tokenmill.ledger.models import EntryKind, LedgerEntry, UsageRecord
from tokenmill.ledger.reconcile import Category, Report, reconcile, repair
from tokenmill.ledger.streams import LedgerSink
from tokenmill.producers.batch_files import BatchDir, append_lines, outcome_entry
from tokenmill.workers.responses import completion_body
from tokenmill.workers.results import ResultStore

from tokenmill.redis_client import async_redis
from tokenmill.wire import (
    EventKind,
    InferenceRequest,
    Priority,
    RequestState,
    Result,
    ResultStatus,
    TokenEvent,
    Usage,
)

NOV = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
OCT = datetime(2026, 10, 20, 8, 0, tzinfo=UTC)
SIM_IN, SIM_OUT = Decimal("0.10"), Decimal("0.40")  # the example config's sim card


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The example config (tenants alpha/beta/gamma; a price card for ``sim``)."""
    for name in ("TOKENMILL_DATABASE_URL", "TOKENMILL_REDIS_URL", "TOKENMILL_KAFKA_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    return Settings(home=tmp_path / "home")


@pytest.fixture
def sink(sessions: sessionmaker[Session], settings: Settings) -> LedgerSink:
    s = LedgerSink(sessions, settings)
    s.prepare()
    return s


@pytest.fixture
def results(redis_url: str) -> Iterator[redis.Redis]:
    """The result store's Redis, a database of its own, emptied."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# -- building facts ---------------------------------------------------------------------


def rid_of(prefix: str, i: int) -> str:
    return f"{prefix}-{i:04d}"


def tokens_of(i: int) -> tuple[int, int]:
    return 100 + i, 20 + i % 7


def accept(
    sessions: sessionmaker[Session],
    prefix: str,
    n: int,
    *,
    tenant: str = "alpha",
    at: datetime = NOV,
    state: RequestState = RequestState.FINISHED,
    tokens: bool = True,
    priority: Priority = Priority.batch,
) -> list[str]:
    """``n`` batch lines accepted and settled by the ledger's own functions (as the
    batch runner does), finishing a second apart from ``at``."""
    reqs = [
        InferenceRequest(
            id=rid_of(prefix, i), tenant=tenant, model="sim", priority=priority,
            body={"messages": [{"role": "user", "content": "hi"}]}, max_tokens=64,
            prompt_tokens_estimate=1, submitted_at=(at - timedelta(minutes=1)).timestamp(),
            batch_id=f"batch_{prefix}", custom_id=str(i),
        )
        for i in range(n)
    ]  # fmt: skip
    outcomes = [
        Outcome(r.id, state, at=at + timedelta(seconds=i),
                prompt_tokens=tokens_of(i)[0] if tokens else None,
                completion_tokens=tokens_of(i)[1] if tokens else None)
        for i, r in enumerate(reqs)
    ]  # fmt: skip
    with transaction(sessions) as session:
        upsert_requests(session, reqs)
        settle_requests(session, outcomes)
    return [r.id for r in reqs]


def event(
    rid: str,
    i: int,
    *,
    tenant: str = "alpha",
    at: datetime = NOV,
    kind: EventKind = EventKind.finished,
    priority: Priority = Priority.batch,
    tokens: tuple[int, int] | None = None,
) -> TokenEvent:
    """The terminal event a worker sends for :func:`accept`'s ``i``-th line."""
    pt, ct = tokens or tokens_of(i)
    fin = (at + timedelta(seconds=i)).timestamp()
    return TokenEvent(
        kind=kind, request_id=rid, tenant=tenant, model="sim", priority=priority, worker="w1",
        prompt_tokens=pt, completion_tokens=ct, ts=fin, submitted_at=fin - 60,
        dispatched_at=fin - 2, first_token_at=fin - 1, finished_at=fin,
        reason=None if kind is EventKind.finished else f"{kind.value}: test",
    )  # fmt: skip


def cost(pt: int, ct: int, priority: Priority = Priority.batch) -> Decimal:
    factor = Decimal("0.5") if priority is Priority.batch else Decimal(1)
    return (SIM_IN * factor * pt + SIM_OUT * factor * ct) / 1_000_000


def entries(sessions: sessionmaker[Session]) -> dict[str, list[tuple[str, Decimal, int, int]]]:
    """request id → its ledger entries (kind, amount, tokens)."""
    out: dict[str, list[tuple[str, Decimal, int, int]]] = {}
    with transaction(sessions) as session:
        for e in session.execute(select(LedgerEntry)).scalars():
            out.setdefault(e.request_id, []).append(
                (e.kind.value, e.amount, e.prompt_tokens, e.completion_tokens)
            )
    return out


def counts(report: Report) -> dict[str, int]:
    return {c.value: n for c, n in report.counts.items()}


def ids(report: Report, category: Category) -> list[str]:
    return [d.request_id for d in report.examples[category]]


# -- the requests table -----------------------------------------------------------------


def test_missing_found_exactly_and_repaired_once(
    sessions: sessionmaker[Session], sink: LedgerSink
) -> None:
    done = accept(sessions, "b", 30)
    sink.write([event(rid, i) for i, rid in enumerate(done) if i % 3 != 0])  # 20 billed

    report = reconcile(sink, examples=4)
    assert counts(report) == {"missing": 10, "duplicated": 0, "mispriced": 0}
    assert (report.facts, report.charges, report.clean) == (30, 20, False)
    assert ids(report, Category.missing) == [done[0], done[3], done[6], done[9]]
    assert "finished" in report.examples[Category.missing][0].detail

    before, fixed = repair(sink)
    assert before.counts[Category.missing] == 10
    assert (fixed.missing, fixed.repaired, fixed.already, fixed.rejected, fixed.remaining) == (
        10,
        10,
        0,
        [],
        0,
    )
    billed = entries(sessions)
    assert sorted(billed) == sorted(done)
    for i, rid in enumerate(done):  # one charge each, priced from the durable fact
        pt, ct = tokens_of(i)
        assert billed[rid] == [("charge", cost(pt, ct), pt, ct)]
    with transaction(sessions) as session:
        assert session.execute(select(func.count()).select_from(UsageRecord)).scalar_one() == 30
    after = reconcile(sink)
    assert after.clean and (after.facts, after.charges) == (30, 30)

    _, again = repair(sink)  # a second repair finds nothing and writes nothing
    assert (again.missing, again.repaired, again.already) == (0, 0, 0)
    assert entries(sessions) == billed


def test_repair_is_bounded(sessions: sessionmaker[Session], sink: LedgerSink) -> None:
    accept(sessions, "b", 12)
    _, first = repair(sink, limit=5)
    assert (first.missing, first.repaired, first.remaining) == (12, 5, 7)
    assert reconcile(sink).counts[Category.missing] == 7
    _, second = repair(sink, limit=5)
    assert (second.missing, second.repaired, second.remaining) == (7, 5, 2)
    _, third = repair(sink, limit=5)
    assert (third.missing, third.repaired, third.remaining) == (2, 2, 0)
    assert reconcile(sink).clean


def test_repair_while_a_sink_writes_the_same_events_bills_once(
    sessions: sessionmaker[Session], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = accept(sessions, "b", 400)
    events = [event(rid, i) for i, rid in enumerate(done)]
    stream = LedgerSink(sessions, settings)  # a stream processor's own sink
    stream.prepare()
    mine = LedgerSink(sessions, settings)
    mine.prepare()
    monkeypatch.setattr(reconcile_module, "_REPAIR_CHUNK", 20)  # interleave transactions
    scanned = threading.Event()
    stream_new = 0

    def stream_processor() -> None:  # the events arrive after all, as repair bills them
        nonlocal stream_new
        assert scanned.wait(timeout=30)
        for start in range(0, len(events), 20):
            stream_new += len(stream.write(events[start : start + 20]).new)

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage == "ledger" and done == total:
            scanned.set()

    worker = threading.Thread(target=stream_processor)
    worker.start()
    _, fixed = repair(mine, progress=progress)
    worker.join(timeout=60)
    assert not worker.is_alive()

    assert fixed.missing == 400
    assert fixed.repaired + stream_new == 400  # each request billed by exactly one of them
    assert fixed.repaired + fixed.already == 400
    billed = entries(sessions)
    assert len(billed) == 400 and all(len(v) == 1 for v in billed.values())
    assert reconcile(mine).clean


def test_mispriced_token_mismatch_and_duplicate_reported_not_repaired(
    sessions: sessionmaker[Session], sink: LedgerSink
) -> None:
    done = accept(sessions, "b", 6)
    pt0, ct0 = tokens_of(0)
    # 0: charged at a wrong amount (a writer bug), with its usage record
    with transaction(sessions) as session:
        session.add(
            UsageRecord(
                request_id=done[0],
                tenant="alpha",
                model="sim",
                priority=Priority.batch,
                minute=NOV.replace(second=0),
                prompt_tokens=pt0,
                completion_tokens=ct0,
            )
        )
        session.add(LedgerEntry(request_id=done[0], kind=EntryKind.charge, tenant="alpha", model="sim",
                                amount=cost(pt0, ct0) + Decimal("0.0000000001"), currency="USD",
                                price_card_version_id=1, prompt_tokens=pt0, completion_tokens=ct0,
                                created_at=NOV))  # fmt: skip
    # 1: billed with other tokens than the request used
    sink.write([event(done[1], 1, tokens=(5, 5))])
    # 2: billed twice (a charge, and a partial entry besides)
    sink.write([event(done[2], 2)])
    pt2, ct2 = tokens_of(2)
    with transaction(sessions) as session:
        session.add(LedgerEntry(request_id=done[2], kind=EntryKind.partial, tenant="alpha", model="sim",
                                amount=cost(pt2, ct2), currency="USD", price_card_version_id=1,
                                prompt_tokens=pt2, completion_tokens=ct2,
                                created_at=NOV + timedelta(seconds=2)))  # fmt: skip
    # 3..5: billed right
    sink.write([event(done[i], i) for i in (3, 4, 5)])

    report = reconcile(sink)
    assert counts(report) == {"missing": 0, "duplicated": 1, "mispriced": 2}
    assert ids(report, Category.duplicated) == [done[2]]
    assert report.examples[Category.duplicated][0].detail == "2 charges"
    assert ids(report, Category.mispriced) == [done[0], done[1]]
    wrong_amount, wrong_tokens = (d.detail for d in report.examples[Category.mispriced])
    assert f"the card says {cost(pt0, ct0):f}" in wrong_amount
    assert f"billed 5+5 tokens, the request used {pt0 + 1}+{ct0 + 1} tokens" in wrong_tokens

    _, fixed = repair(sink)  # money corrections are an operator's: nothing written
    assert (fixed.missing, fixed.repaired) == (0, 0)
    assert counts(reconcile(sink)) == {"missing": 0, "duplicated": 1, "mispriced": 2}


def test_tenant_and_period_filters(sessions: sessionmaker[Session], sink: LedgerSink) -> None:
    nov_a = accept(sessions, "na", 5, tenant="alpha", at=NOV)
    accept(sessions, "nb", 3, tenant="beta", at=NOV)
    oct_a = accept(sessions, "oa", 4, tenant="alpha", at=OCT)
    sink.write([event(nov_a[0], 0), event(oct_a[0], 0, at=OCT)])
    nov, october = Period.month(2026, 11), Period.month(2026, 10)

    assert counts(reconcile(sink))["missing"] == 4 + 3 + 3
    assert counts(reconcile(sink, period=nov))["missing"] == 4 + 3
    assert counts(reconcile(sink, period=october))["missing"] == 3
    assert counts(reconcile(sink, tenant="alpha"))["missing"] == 4 + 3
    only = reconcile(sink, tenant="beta", period=nov)
    assert (only.counts[Category.missing], only.facts, only.charges) == (3, 3, 0)
    assert counts(reconcile(sink, tenant="beta", period=october))["missing"] == 0
    assert counts(reconcile(sink, tenant="gamma"))["missing"] == 0

    just_now = accept(
        sessions, "now", 2, tenant="gamma", at=datetime.now(UTC) - timedelta(seconds=5)
    )
    assert counts(reconcile(sink, tenant="gamma"))["missing"] == 2
    # finished in the last 10 minutes: their events may be on their way
    assert counts(reconcile(sink, tenant="gamma", settle_s=600))["missing"] == 0
    _, later = repair(sink, tenant="gamma", settle_s=600)
    assert later.missing == 0 and not set(entries(sessions)) & set(just_now)

    _, fixed = repair(sink, tenant="alpha", period=october)
    assert fixed.repaired == 3
    assert counts(reconcile(sink))["missing"] == 4 + 3 + 2
    assert counts(reconcile(sink, settle_s=600))["missing"] == 4 + 3
    assert reconcile(sink, period=october).clean


def test_work_done_on_unfinished_requests_is_billed_as_partial(
    sessions: sessionmaker[Session], sink: LedgerSink
) -> None:
    cancelled = accept(sessions, "c", 3, state=RequestState.CANCELLED)
    failed = accept(sessions, "f", 2, state=RequestState.FAILED)
    accept(sessions, "z", 4, state=RequestState.CANCELLED, tokens=False)  # never ran: free
    report = reconcile(sink)
    assert counts(report) == {"missing": 5, "duplicated": 0, "mispriced": 0}
    _, fixed = repair(sink)
    assert fixed.repaired == 5
    billed = entries(sessions)
    assert sorted(billed) == sorted(cancelled + failed)
    assert {rows[0][0] for rows in billed.values()} == {"partial"}
    assert reconcile(sink).clean


def test_counts_missing_from_the_ledger_come_from_the_batch_results_file(
    sessions: sessionmaker[Session], sink: LedgerSink, settings: Settings
) -> None:
    """The runner killed between its results file and the ledger: the rows are FINISHED
    without counts, and the file (fsynced first) has them."""
    done = accept(sessions, "k", 3, tokens=False)
    batch_dir = BatchDir.of(settings.home, "batch_k")
    batch_dir.root.mkdir(parents=True)
    records = []
    for i, rid in enumerate(done[:2]):  # the third line's outcome never reached the file
        pt, ct = tokens_of(i)
        req = InferenceRequest(id=rid, tenant="alpha", model="sim", body={"messages": [{"role": "user", "content": "hi"}]},
                               max_tokens=64, prompt_tokens_estimate=1, batch_id="batch_k", custom_id=str(i))  # fmt: skip
        result = Result(request_id=rid, tenant="alpha", model="sim", status=ResultStatus.succeeded,
                        body=completion_body(req, "hello", "stop", Usage(prompt_tokens=pt, completion_tokens=ct)),
                        usage=Usage(prompt_tokens=pt, completion_tokens=ct), batch_id="batch_k", custom_id=str(i))  # fmt: skip
        status, entry = outcome_entry("batch_k", i, str(i), result)
        records.append(
            {"line": i, "custom_id": str(i), "request_id": rid, "status": status, "entry": entry}
        )
    append_lines(batch_dir.results, records)

    assert counts(reconcile(sink)) == {"missing": 3, "duplicated": 0, "mispriced": 0}
    _, fixed = repair(sink)
    assert (fixed.repaired, [r for r, _ in fixed.unrepairable]) == (2, [done[2]])
    billed = entries(sessions)
    for i, rid in enumerate(done[:2]):
        pt, ct = tokens_of(i)
        assert billed[rid] == [("charge", cost(pt, ct), pt, ct)]
    assert done[2] not in billed
    assert counts(reconcile(sink)) == {"missing": 1, "duplicated": 0, "mispriced": 0}


# -- the result store -------------------------------------------------------------------


def store(url: str, events: Sequence[TokenEvent]) -> None:
    """Commit outcomes as a worker does (:class:`ResultStore`), each with its event."""

    async def go() -> None:
        client = async_redis(url)
        try:
            status = {EventKind.finished: ResultStatus.succeeded, EventKind.cancelled: ResultStatus.cancelled,
                      EventKind.failed: ResultStatus.failed}  # fmt: skip
            await ResultStore(client).commit_many([
                (Result(request_id=ev.request_id, tenant=ev.tenant, model=ev.model, status=status[ev.kind],
                        usage=Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
                        finished_at=ev.finished_at or ev.ts), ev)
                for ev in events
            ])  # fmt: skip
        finally:
            await client.aclose()

    asyncio.run(go())


def redis_url_of(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def test_result_store_facts_found_and_replayed(
    sessions: sessionmaker[Session], sink: LedgerSink, results: redis.Redis
) -> None:
    interactive = [
        event(f"req_{i:04d}", i, tenant="beta", priority=Priority.interactive) for i in range(40)
    ]
    # a batch line the ledger knows finished but without counts (the runner was killed
    # between its results file and the ledger): the result store has them
    [line] = accept(sessions, "k", 1, tokens=False)
    line_event = event(line, 0)
    store(redis_url_of(results), [*interactive, line_event])
    sink.write(interactive[:25])  # 14 interactive requests never billed
    sink.write([interactive[25].model_copy(update={"completion_tokens": 1})])  # billed short

    ledger_only = reconcile(sink)
    assert counts(ledger_only) == {"missing": 1, "duplicated": 0, "mispriced": 0}
    _, stuck = repair(sink, period=Period.month(2026, 12))  # nothing in December
    assert stuck.missing == 0
    report = reconcile(sink, results=results)
    assert report.sources == ("ledger", "results")
    assert counts(report) == {"missing": 15, "duplicated": 0, "mispriced": 1}
    assert report.facts == 1 + 40
    assert ids(report, Category.missing)[:2] == [line, interactive[26].request_id]
    assert report.examples[Category.missing][0].detail == (
        f"finished at 2026-11-03T12:00:00Z, {tokens_of(0)[0]}+{tokens_of(0)[1]} tokens (result store): no charge"
    )
    assert ids(report, Category.mispriced) == [interactive[25].request_id]
    assert counts(reconcile(sink, results=results, tenant="alpha")) == {
        "missing": 1,
        "duplicated": 0,
        "mispriced": 0,
    }
    assert counts(reconcile(sink, results=results, period=Period.month(2026, 10)))["missing"] == 0

    _, cannot = repair(sink)  # the ledger alone has no counts for the line
    assert (cannot.repaired, [r for r, _ in cannot.unrepairable]) == (0, [line])
    _, fixed = repair(sink, results=results)
    assert (fixed.missing, fixed.repaired, fixed.unrepairable) == (15, 15, [])
    billed = entries(sessions)
    for i, ev in enumerate(interactive[26:], start=26):
        pt, ct = tokens_of(i)
        assert billed[ev.request_id] == [("charge", cost(pt, ct, Priority.interactive), pt, ct)]
    pt, ct = tokens_of(0)
    assert billed[line] == [("charge", cost(pt, ct), pt, ct)]
    after = reconcile(sink, results=results)
    assert counts(after) == {"missing": 0, "duplicated": 0, "mispriced": 1}
    _, again = repair(sink, results=results)
    assert (again.missing, again.repaired) == (0, 0)


def test_a_stream_processor_starting_bills_what_the_events_never_brought(
    sessions: sessionmaker[Session], sink: LedgerSink, results: redis.Redis
) -> None:
    """The stream processor's start-up repair (``tokenmill streams``): work done this
    month whose events died with a broker is billed from the result store's stored
    events and the batch lines' rows, exactly as the events would have billed it; a
    second start bills nothing more; an unreachable result store leaves the ledger's
    own facts."""
    from tokenmill.ledger.streams.worker import repair_on_start
    from tokenmill.stack import Endpoints

    now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    lines = accept(sessions, "s", 5, at=now)
    interactive = [event(f"live_{i:04d}", i, tenant="beta", at=now, priority=Priority.interactive)
                   for i in range(7)]  # fmt: skip
    store(redis_url_of(results), interactive)
    sink.write(interactive[:2])  # these two arrived as events
    old = accept(sessions, "o", 2, at=now - timedelta(days=100))  # before the repair's window

    down = Endpoints("127.0.0.1:1", "redis://127.0.0.1:1/0", "sqlite://")
    repair_on_start(sink, down)  # Redis unreachable: the batch lines alone
    assert set(entries(sessions)) == {*lines, *(e.request_id for e in interactive[:2])}

    repair_on_start(sink, Endpoints("127.0.0.1:1", redis_url_of(results), "sqlite://"))
    billed = entries(sessions)
    assert set(billed) == {*lines, *(e.request_id for e in interactive)}
    for i, ev in enumerate(interactive):
        pt, ct = tokens_of(i)
        assert billed[ev.request_id] == [("charge", cost(pt, ct, Priority.interactive), pt, ct)]
    with sessions() as session:  # the stored event's timings: its SLA record too
        from tokenmill.ledger.models import SlaRecord

        slas = set(session.scalars(select(SlaRecord.request_id)))
    assert {e.request_id for e in interactive} <= slas
    repair_on_start(sink, Endpoints("127.0.0.1:1", redis_url_of(results), "sqlite://"))
    assert entries(sessions) == billed
    assert not set(old) & set(billed)


# -- the command ------------------------------------------------------------------------


def run_cli(
    home: Path, url: str, *args: str, redis_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENMILL_HOME": str(home), "TOKENMILL_DATABASE_URL": url,
           "TOKENMILL_CONFIG": str(EXAMPLE_CONFIG)}  # fmt: skip
    env.pop("TOKENMILL_REDIS_URL", None)
    if redis_url:
        env["TOKENMILL_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", "reconcile", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_exit_codes_and_output(
    sessions: sessionmaker[Session],
    sink: LedgerSink,
    ledger_url: str,
    results: redis.Redis,
    tmp_path: Path,
) -> None:
    done = accept(sessions, "b", 8)
    sink.write([event(rid, i) for i, rid in enumerate(done[:5])])
    redis_url = redis_url_of(results)
    home = tmp_path / "cli-home"

    found = run_cli(home, ledger_url, "--ledger-only", "--json")
    assert found.returncode == 1, found.stderr
    doc = json.loads(found.stdout)
    assert doc["counts"] == {"missing": 3, "duplicated": 0, "mispriced": 0}
    assert [e["request_id"] for e in doc["examples"]["missing"]] == done[5:]
    assert (doc["facts"], doc["charges"], doc["clean"]) == (8, 5, False)

    table = run_cli(
        home, ledger_url, "--period", "2026-11", "--tenant", "alpha", redis_url=redis_url
    )
    assert table.returncode == 1, table.stderr
    assert (
        "missing" in table.stdout
        and done[5] in table.stdout
        and "differences found" in table.stdout
    )

    fixed = run_cli(home, ledger_url, "--repair", "--json", redis_url=redis_url)
    assert fixed.returncode == 0, fixed.stderr
    doc = json.loads(fixed.stdout)
    assert (
        doc["repair"]["repaired"] == 3 and doc["clean"] and doc["sources"] == ["ledger", "results"]
    )
    again = run_cli(home, ledger_url, "--repair", "--json", "--ledger-only")
    assert again.returncode == 0 and json.loads(again.stdout)["repair"]["repaired"] == 0
    assert len(entries(sessions)) == 8

    bad = run_cli(home, ledger_url, "--period", "November", "--ledger-only")
    assert bad.returncode == 1 and "period 'November': give YYYY-MM or YYYY-MM-DD" in bad.stderr
    no_store = run_cli(home, ledger_url)  # no Redis configured, no local stack
    assert no_store.returncode == 1 and "--ledger-only" in no_store.stderr

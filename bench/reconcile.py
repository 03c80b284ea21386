"""Reconciliation benchmark: ``tokenmill reconcile`` over a 100k-request ledger.

In one run, on a fresh SQLite ledger in a temporary home (or ``--database-url``):

1. record ``--requests`` batch lines FINISHED with the engine's token counts (the
   ``requests`` table, as the batch runner leaves it), and bill all but ``--missing``
   of them through :class:`LedgerSink` (the stream processors' write path);
2. baselines: a plain ``SELECT count(*)`` of the requests ⟕ charges join (the floor of
   any set-based check), and the per-row way — one query per request — timed over
   ``--per-row`` requests;
3. time :func:`reconcile` (``--repeat`` runs, the median is the headline
   ``reconcile_requests_per_s``), then :func:`repair` (billing the missing ones), a
   second reconcile (must be clean) and a second repair (the no-op a stream processor
   pays at start-up);
4. unless ``--no-results``: store every request's terminal event in a private Redis as
   the workers do (the result store), and time reconcile reading it too (``SCAN`` +
   pipelined ``MGET``, then the ledger 900 ids a query): ``with_results_requests_per_s``.

    python bench/reconcile.py [--requests 100000] [--missing 1000] [--repeat 5] [--no-results]

Ends with one JSON line of the figures (target: ``reconcile_requests_per_s`` ≥ 50,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import insert, text
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger import make_engine, migrate, session_factory, transaction
from tokenmill.ledger.models import RequestRow
from tokenmill.ledger.reconcile import Category, reconcile, repair
from tokenmill.ledger.streams import LedgerSink
from tokenmill.workers.results import ResultStore

from tokenmill.redis_client import async_redis
from tokenmill.stack import processes
from tokenmill.wire import (
    EventKind,
    Priority,
    RequestState,
    Result,
    ResultStatus,
    TokenEvent,
    Usage,
)

TENANTS = ("alpha", "beta", "gamma")
START = datetime(2026, 11, 2, tzinfo=UTC)


def build(
    sink: LedgerSink, n: int, missing: int, seed: int = 7
) -> tuple[set[str], list[TokenEvent]]:
    """``n`` finished batch lines, all but ``missing`` (chosen at random) billed.
    Returns the unbilled ids and every line's terminal event."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    events: list[TokenEvent] = []
    for i in range(n):
        fin = START + timedelta(seconds=i * 0.5, microseconds=rng.randrange(1_000_000))
        pt, ct = rng.randint(0, 4000), rng.randint(0, 800)
        tenant, priority = rng.choice(TENANTS), rng.choice(list(Priority))
        rid = f"batch_{i // 1000:03d}:{i % 1000:04d}"
        rows.append({"id": rid, "tenant": tenant, "model": "sim", "priority": priority,
                     "state": RequestState.FINISHED, "batch_id": f"batch_{i // 1000:03d}",
                     "custom_id": f"{i % 1000:04d}", "submitted_at": fin - timedelta(seconds=30),
                     "dispatched_at": fin - timedelta(seconds=3), "first_token_at": fin - timedelta(seconds=2),
                     "finished_at": fin, "attempts": 1, "prompt_tokens": pt, "completion_tokens": ct})  # fmt: skip
        t = fin.timestamp()
        events.append(TokenEvent(
            kind=EventKind.finished, request_id=rid, tenant=tenant, model="sim", priority=priority,
            worker="bench", prompt_tokens=pt, completion_tokens=ct, ts=t, submitted_at=t - 30,
            dispatched_at=t - 3, first_token_at=t - 2, finished_at=t,
        ))  # fmt: skip
    unbilled = set(rng.sample([r["id"] for r in rows], missing))
    with transaction(sink.sessions) as session:
        for start in range(0, n, 10_000):
            session.execute(insert(RequestRow), rows[start : start + 10_000])
    billed = [e for e in events if e.request_id not in unbilled]
    for start in range(0, len(billed), 5000):
        sink.write(billed[start : start + 5000])
    return unbilled, events


def store_results(url: str, events: list[TokenEvent]) -> None:
    """Commit every event's outcome to the result store as the workers do."""

    async def go() -> None:
        client = async_redis(url)
        store = ResultStore(client)
        try:
            for start in range(0, len(events), 1000):
                await store.commit_many([
                    (Result(request_id=e.request_id, tenant=e.tenant, model=e.model,
                            status=ResultStatus.succeeded, finished_at=e.finished_at or e.ts,
                            usage=Usage(prompt_tokens=e.prompt_tokens,
                                        completion_tokens=e.completion_tokens)), e)
                    for e in events[start : start + 1000]
                ])  # fmt: skip
        finally:
            await client.aclose()

    asyncio.run(go())


def with_results(sink: LedgerSink, events: list[TokenEvent], work: Path, repeat: int) -> float:
    """Seconds (median) of a reconcile that also reads the result store."""
    port = processes.free_port()
    data = work / "redis"
    data.mkdir()
    proc = processes.spawn(
        "redis", processes.redis_argv(port, data), data / "redis.log",
        lambda: processes.redis_ready(port),
    )  # fmt: skip
    try:
        url = f"redis://{processes.LOOPBACK}:{port}/0"
        store_results(url, events)
        client = redis.Redis.from_url(url)
        try:
            times = []
            for _ in range(repeat):
                report = reconcile(sink, results=client)
                assert report.clean and report.facts == len(events), report.counts
                times.append(report.seconds)
        finally:
            client.close()
        return statistics.median(times)
    finally:
        processes.stop_pid(proc.pid)


def join_scan(sink: LedgerSink) -> float:
    """Seconds for a plain count of the requests ⟕ charges join."""
    t0 = time.perf_counter()
    with transaction(sink.sessions) as session:
        session.execute(text(
            "SELECT count(*) FROM requests r LEFT JOIN ledger_entries e"
            " ON e.request_id = r.id AND e.kind = 'charge' WHERE r.state = 3"
        )).scalar_one()  # fmt: skip
    return time.perf_counter() - t0


def per_row(sink: LedgerSink, n: int) -> float:
    """Requests/s checked the per-row way: each request's charge fetched by its own query
    and compared in Python (``n`` requests)."""
    t0 = time.perf_counter()
    with transaction(sink.sessions) as session:
        reqs = session.execute(text(
            "SELECT id, prompt_tokens, completion_tokens FROM requests WHERE state = 3 LIMIT :n"
        ), {"n": n}).all()  # fmt: skip
        bad = 0
        for rid, pt, ct in reqs:
            got = session.execute(text(
                "SELECT prompt_tokens, completion_tokens FROM ledger_entries"
                " WHERE request_id = :r AND kind = 'charge'"
            ), {"r": rid}).first()  # fmt: skip
            bad += got is None or tuple(got) != (pt, ct)
    return len(reqs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--missing", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--per-row", type=int, default=10_000, help="requests in the per-row baseline")
    ap.add_argument("--no-results", action="store_true", help="skip the result-store phase")
    ap.add_argument(
        "--database-url", help="a fresh ledger database (default: SQLite in a temp dir)"
    )
    args = ap.parse_args()

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="tm-bench-reconcile-"))
    os.environ["TOKENMILL_CONFIG"] = str(EXAMPLE_CONFIG)
    url = args.database_url or f"sqlite:///{work / 'ledger.db'}"
    engine = make_engine(url)
    try:
        migrate(engine)
        sink = LedgerSink(session_factory(engine), Settings(home=work / "home"))
        sink.prepare()
        t0 = time.perf_counter()
        unbilled, events = build(sink, args.requests, args.missing)
        print(f"built {args.requests:,} finished requests, {args.missing:,} unbilled, "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

        scan = statistics.median(join_scan(sink) for _ in range(args.repeat))
        row_rate = per_row(sink, args.per_row)
        print(f"baselines: join count(*) {scan * 1000:.0f} ms ({args.requests / scan:,.0f} requests/s); "
              f"per-row queries {row_rate:,.0f} requests/s", flush=True)  # fmt: skip

        times = []
        for _ in range(args.repeat):
            report = reconcile(sink)
            times.append(report.seconds)
            found = {d.request_id for d in report.examples[Category.missing]}
            assert report.counts[Category.missing] == args.missing, report.counts
            assert found <= unbilled and report.facts == args.requests
            assert report.counts[Category.mispriced] == report.counts[Category.duplicated] == 0
        median = statistics.median(times)
        rate = args.requests / median
        print(f"reconcile: {median * 1000:.0f} ms median of {args.repeat} "
              f"({rate:,.0f} requests/s; {median / scan:.1f}× the join count, "
              f"{rate / row_rate:.0f}× the per-row way)", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        _, fixed = repair(sink)
        repair_total = time.perf_counter() - t0
        assert (fixed.repaired, fixed.already, fixed.rejected) == (args.missing, 0, []), fixed
        clean = reconcile(sink)
        assert clean.clean and clean.charges == args.requests
        t0 = time.perf_counter()
        _, noop = repair(sink)
        noop_s = time.perf_counter() - t0
        assert noop.missing == 0
        print(f"repair: {fixed.repaired:,} billed in {repair_total * 1000:.0f} ms "
              f"({fixed.seconds * 1000:.0f} ms writing, the rest scanning); then clean in "
              f"{clean.seconds * 1000:.0f} ms; a repair with nothing to do (a start-up's) "
              f"{noop_s * 1000:.0f} ms", flush=True)  # fmt: skip
        both = None
        if not args.no_results:
            both = with_results(sink, events, work, args.repeat)
            print(f"reconcile with the result store ({args.requests:,} stored events): "
                  f"{both * 1000:.0f} ms ({args.requests / both:,.0f} requests/s)", flush=True)  # fmt: skip
        result = {
            "reconcile_requests_per_s": round(rate),
            "reconcile_ms": round(median * 1000, 1),
            "join_count_ms": round(scan * 1000, 1),
            "ratio_to_join_count": round(median / scan, 2),
            "per_row_requests_per_s": round(row_rate),
            "ratio_to_per_row": round(rate / row_rate, 1),
            "repair_write_ms": round(fixed.seconds * 1000, 1),
            "repair_total_ms": round(repair_total * 1000, 1),
            "repaired": fixed.repaired,
            "clean_reconcile_ms": round(clean.seconds * 1000, 1),
            "noop_repair_ms": round(noop_s * 1000, 1),
            "with_results_requests_per_s": None if both is None else round(args.requests / both),
            "requests": args.requests,
            "missing": args.missing,
            "database": url.split(":", 1)[0],
            "cpus": os.cpu_count(),
            "loadavg_1m_at_start": round(load, 2),
        }
    finally:
        engine.dispose()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

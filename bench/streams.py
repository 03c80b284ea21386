"""Stream-processor benchmark: token events → ledger, end to end, on a real broker and a
real ``tokenmill streams`` worker process.

In one run, on a private Tansu broker and a fresh ledger (SQLite in a temporary home,
or ``--database-url``):

1. publish ``--events`` varied ``finished`` events (a backlog);
2. baseline: drain the backlog with a bare aiokafka consumer (``raw_consume_per_s``);
3. baseline: a faust agent on faust's public API only (``stream.take_events``, each
   batch through the same :class:`BatchProcessor` into a ledger of its own) drains the
   backlog (``faust_public_events_per_s``; ``--no-faust`` skips it);
4. start a ``tokenmill streams`` worker (a group of its own, a fresh ledger) and time it
   draining the same backlog into the ledger, from the first ledger row to the last
   (``events_per_s``; its CPU time per event too; ``ratio_to_faust_public``);
   3 and 4 alternate ``--runs`` times (default 3); the medians are reported;
5. with the last worker caught up, publish at ``--lag-rate`` events/s for ``--lag-seconds``,
   each stamped ``finished_at`` = its send time, and poll the ledger every 20 ms: lag is
   the time a row became visible minus its ``finished_at`` (``ledger_lag_p50_ms``/``p99``);
6. ``bench/reconcile.py`` over a 100k-request ledger (``reconcile_requests_per_s``).

    python bench/streams.py [--events 50000] [--lag-rate 1000] [--lag-seconds 10]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tokenmill import kafka
from tokenmill.stack import processes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "streams"))
import streams_helpers as t

TOPIC = "bench.token-events"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_consume(bootstrap: str, n: int) -> float:
    """Messages/s of a bare aiokafka consumer draining ``n`` messages (first to last)."""
    consumer = kafka.consumer(bootstrap, TOPIC, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
                              max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)  # fmt: skip
    await kafka.start(consumer, "raw consumer")
    try:
        got, first = 0, None
        async with asyncio.timeout(120):
            while got < n:
                batch = await consumer.getmany(timeout_ms=200, max_records=10000)
                for records in batch.values():
                    if records and first is None:
                        first = time.perf_counter()
                    got += len(records)
        assert first is not None
        return n / (time.perf_counter() - first)
    finally:
        await consumer.stop()


class LedgerPoller:
    """Sees new usage rows cheaply: by rowid on SQLite, by ``recorded_at`` on PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: request id → when the poller first saw it, per prefix polled for
        self.seen: dict[str, dict[str, float]] = {}
        if url.startswith("sqlite"):
            self.conn: Any = sqlite3.connect(url.split("sqlite:///", 1)[1], timeout=30)
            self.last_rowid = 0
        else:
            import psycopg

            self.conn = psycopg.connect(
                url.replace("postgresql+psycopg", "postgresql"), autocommit=True
            )
        self.sqlite = url.startswith("sqlite")

    def poll(self, prefix: str) -> int:
        """Look for new rows; returns how many rows with ``prefix`` have been seen."""
        now = time.time()
        seen = self.seen.setdefault(prefix, {})
        if self.sqlite:
            rows = self.conn.execute(
                "SELECT rowid, request_id FROM usage_records WHERE rowid > ?", (self.last_rowid,)
            ).fetchall()
            for rowid, rid in rows:
                self.last_rowid = max(self.last_rowid, rowid)
                if rid.startswith(prefix):
                    seen.setdefault(rid, now)
        else:
            rows = self.conn.execute(
                "SELECT request_id FROM usage_records WHERE recorded_at > now() - interval '3 seconds'"
                " AND request_id LIKE %s", (prefix + "%",)
            ).fetchall()  # fmt: skip
            for (rid,) in rows:
                seen.setdefault(rid, now)
        return len(seen)


async def lag_phase(bootstrap: str, poller: LedgerPoller, rate: int, seconds: float) -> list[float]:
    """Publish at ``rate`` events/s; return each event's lag (ms) into the ledger."""
    producer = kafka.producer(bootstrap, linger_ms=1)
    await kafka.start(producer, "lag producer")
    sent: dict[str, float] = {}
    n = int(rate * seconds)
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    try:
        start = time.perf_counter()
        i = 0
        while i < n:
            due = start + (i // per_tick) * tick
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(min(per_tick, n - i)):
                now = time.time()
                ev = t.finished_event(f"lag-{i:07d}", tenant=t.TENANTS[i % 3], finished_at=now,
                                      completion_tokens=20 + i % 50)  # fmt: skip
                await producer.send(TOPIC, t.encode(ev), key=ev["tenant"].encode())
                sent[ev["request_id"]] = now
                i += 1
            poller.poll("lag-")
        await producer.flush()
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while poller.poll("lag-") < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    seen = poller.seen["lag-"]
    return [(seen[rid] - at) * 1000.0 for rid, at in sent.items() if rid in seen]


def drain(
    procs: list[Any], url: str, n: int, prefix: str, timeout_s: float
) -> tuple[float, float, LedgerPoller]:
    """Wait until ``n`` rows with ``prefix`` are in the ledger at ``url``; returns the
    rate (events/s, first row to last), the processes' CPU µs per event, and the poller."""
    poller: LedgerPoller | None = None
    db_file = Path(url.split("sqlite:///", 1)[1]) if url.startswith("sqlite") else None
    first = cpu0 = None
    count = first_count = 0
    deadline = time.monotonic() + timeout_s
    while count < n:
        for p in procs:
            if not p.alive():
                raise SystemExit("consumer died:\n" + p.log()[-3000:])
        if time.monotonic() > deadline:
            raise SystemExit(f"recorded {count} of {n} in {timeout_s:.0f} s")
        if poller is None and (db_file is None or db_file.exists()):
            poller = LedgerPoller(url)
        if poller is not None:
            try:
                count = poller.poll(prefix)
            except Exception:  # noqa: BLE001  (tables not migrated yet)
                count = 0
        if count and first is None:
            first, first_count = time.perf_counter(), count
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        time.sleep(0.02)
    assert first is not None and cpu0 is not None and poller is not None
    elapsed = time.perf_counter() - first
    rate = (n - first_count) / elapsed if elapsed > 0 else float("nan")
    cpu_us = (sum(cpu_seconds(p.pid) for p in procs) - cpu0) / max(n - first_count, 1) * 1e6
    return rate, cpu_us, poller


def faust_drain(
    work: Path, bootstrap: str, n: int, run: int, timeout_s: float
) -> tuple[float, float]:
    """The faust public-API baseline drains the backlog into a ledger of its own."""
    url = f"sqlite:///{work / f'faust-home{run}' / 'ledger.db'}"
    env = t.worker_env(home=work / f"faust-home{run}", bootstrap=bootstrap, database_url=url,
                       app_id=f"bench-faust-{run}", topic=TOPIC)  # fmt: skip
    agent = FaustAgent(env, work / f"faust{run}.log").start()
    try:
        rate, cpu_us, _ = drain([agent], url, n, "bench-", timeout_s)
    finally:
        agent.stop()
    return rate, cpu_us


class FaustAgent(t.WorkerProcess):
    """This script as a child running :func:`faust_agent_main`."""

    def start(self) -> FaustAgent:
        self.proc = processes.start([sys.executable, __file__, "--faust-agent"], self.log_path,
                                    env=self.env)  # fmt: skip
        return self


def faust_agent_main() -> None:
    """The baseline: the cheapest consumer faust's public API offers for this job, an
    agent taking events in batches (``stream.take_events``), each batch recorded through
    the stream processor's own :class:`BatchProcessor` (one transaction per batch; faust
    acknowledges a batch's events when the agent asks for the next). Configured from the
    worker's environment (``TOKENMILL_*``, as :func:`streams_helpers.worker_env` sets it)."""
    import faust
    from faust.worker import Worker
    from tokenmill.config import load_settings
    from tokenmill.ledger.db import make_engine, migrate, session_factory
    from tokenmill.ledger.streams import BatchProcessor, LedgerSink, Record, StreamsConfig
    from tokenmill.ledger.streams.app import KafkaPublisher

    from tokenmill.stack import endpoints

    settings = load_settings()
    ends = endpoints(settings)
    config = StreamsConfig()
    engine = make_engine(ends.database_url)
    migrate(engine)
    sink = LedgerSink(session_factory(engine), settings)
    sink.prepare()
    bootstrap = ends.kafka_bootstrap
    app = faust.App(
        config.app_id, broker=f"kafka://{bootstrap}", datadir=str(settings.home / "faust"),
        autodiscover=False, web_enabled=False, store="memory://",
        processing_guarantee="at_least_once", topic_replication_factor=1,
        topic_disable_leader=True, topic_partitions=config.partitions,
        broker_session_timeout=6, broker_rebalance_timeout=6, broker_heartbeat_interval=0.5,
        broker_max_poll_records=config.batch_max, consumer_auto_offset_reset="earliest",
    )  # fmt: skip
    topic = app.topic(config.topic, key_serializer="raw", value_serializer="raw")
    processor = BatchProcessor(sink, config, KafkaPublisher(bootstrap))

    @app.agent(topic)
    async def ledger(stream: Any) -> None:
        async for events in stream.take_events(config.batch_max, within=0.2):
            await processor.process([Record(e.message.topic, e.message.partition,
                                            e.message.offset, e.message.key, e.message.value)
                                     for e in events])  # fmt: skip

    Worker(app, loglevel="warn", quiet=True).execute_from_commandline()


def reconcile_figures() -> dict[str, Any]:
    """``bench/reconcile.py`` (its one home) over a 100k-request ledger: its JSON line."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("reconcile.py")), "--no-results", "--repeat", "3"],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"reconcile over {figures['requests']:,} requests: {figures['reconcile_requests_per_s']:,} "
          f"requests/s ({figures['ratio_to_per_row']}× one query per request)", flush=True)  # fmt: skip
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--lag-rate", type=int, default=1000)
    ap.add_argument("--lag-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1, help="stream-processor processes (one group)")
    ap.add_argument("--runs", type=int, default=3,
                    help="faust/processor drain pairs, alternated; medians reported")  # fmt: skip
    ap.add_argument("--no-faust", action="store_true", help="skip the faust public-API baseline")
    ap.add_argument("--faust-timeout", type=float, default=300.0,
                    help="give up on the faust baseline after this many seconds")  # fmt: skip
    ap.add_argument("--faust-agent", action="store_true", help=argparse.SUPPRESS)  # the child
    ap.add_argument(
        "--database-url", default=None, help="an empty or migrated ledger (default: SQLite)"
    )
    args = ap.parse_args()
    if args.database_url and args.runs != 1:
        ap.error("--database-url needs --runs 1: each run drains into a fresh ledger")
    if args.faust_agent:
        faust_agent_main()
        return

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="tm-bench-streams-"))
    port = processes.free_port()
    broker = processes.spawn("kafka broker", processes.kafka_argv(port), work / "broker.log",
                             lambda: processes.port_open(port))  # fmt: skip
    bootstrap = f"{processes.LOOPBACK}:{port}"
    base_url = args.database_url or f"sqlite:///{work / 'home' / 'ledger.db'}"
    workers: list[t.WorkerProcess] = []
    try:
        events = t.mixed_events(args.events, prefix="bench", finished_at=time.time())
        started = time.perf_counter()
        t.publish_events(bootstrap, TOPIC, events)
        produce_rate = args.events / (time.perf_counter() - started)
        print(f"published {args.events:,} finished events at {produce_rate:,.0f}/s", flush=True)

        raw = asyncio.run(raw_consume(bootstrap, args.events))
        print(f"baseline: bare aiokafka consumer drains {raw:,.0f} msgs/s", flush=True)

        # A/B/A/B: the machine's speed drifts, so each pair runs back to back and the
        # medians are reported (per-run figures too).
        runs: list[tuple[float, float]] = []
        faust_runs: list[tuple[float, float]] = []
        poller: LedgerPoller | None = None
        for run in range(args.runs):
            if not args.no_faust:
                faust_runs.append(faust_drain(work, bootstrap, args.events, run,
                                              args.faust_timeout))  # fmt: skip
                print(f"baseline: faust public-API agent drains {faust_runs[-1][0]:,.0f} "
                      f"events/s into the ledger ({faust_runs[-1][1]:.0f} µs CPU per event)",
                      flush=True)  # fmt: skip
            for w in workers:  # the previous run's (the last run's stay for the lag phase)
                w.stop()
            url = base_url if run == 0 else f"sqlite:///{work / f'home{run}' / 'ledger.db'}"
            home = work / ("home" if run == 0 else f"home{run}")
            env = t.worker_env(home=home, bootstrap=bootstrap, database_url=url,
                               app_id=f"bench-streams-{run}", topic=TOPIC)  # fmt: skip
            workers = [t.WorkerProcess(env, work / f"worker{run}-{i}.log").start()
                       for i in range(args.workers)]  # fmt: skip
            rate, cpu_us, poller = drain(workers, url, args.events, "bench-", 600)
            runs.append((rate, cpu_us))
            totals = t.ledger_totals(url)
            assert totals.usage_records == totals.charges == args.events, totals
            vs = f"; {rate / faust_runs[-1][0]:.1f}× the faust agent" if faust_runs else ""
            print(f"stream processor: {rate:,.0f} events/s into the ledger "
                  f"({rate / raw:.1%} of the raw consume rate{vs}; "
                  f"{cpu_us:.0f} µs worker CPU per event)", flush=True)  # fmt: skip
        drained = [b for w in workers for b in w.batches()]
        rate = statistics.median(r for r, _ in runs)
        cpu_us = statistics.median(c for _, c in runs)
        faust_rate = statistics.median(r for r, _ in faust_runs) if faust_runs else None
        faust_cpu_us = statistics.median(c for _, c in faust_runs) if faust_runs else None
        assert poller is not None

        lags = asyncio.run(lag_phase(bootstrap, poller, args.lag_rate, args.lag_seconds))
        lost = int(args.lag_rate * args.lag_seconds) - len(lags)
        p50, p99 = statistics.median(lags), pct(lags, 0.99)
        print(f"lag finished → ledger at {args.lag_rate:,}/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms"
              + (f" ({lost} not seen in time)" if lost else ""), flush=True)  # fmt: skip
        batches = [b for w in workers for b in w.batches()]
        reconciled = reconcile_figures()
        result = {
            "events_per_s": round(rate),
            "raw_consume_per_s": round(raw),
            "ratio_to_raw": round(rate / raw, 4),
            "faust_public_events_per_s": None if faust_rate is None else round(faust_rate),
            "faust_public_cpu_us_per_event": None
            if faust_cpu_us is None
            else round(faust_cpu_us, 1),
            "ratio_to_faust_public": None if faust_rate is None else round(rate / faust_rate, 2),
            "runs": args.runs,
            "events_per_s_runs": [round(r) for r, _ in runs],
            "faust_public_events_per_s_runs": [round(r) for r, _ in faust_runs],
            "ledger_lag_p50_ms": round(p50, 1),
            "ledger_lag_p99_ms": round(p99, 1),
            "worker_cpu_us_per_event": round(cpu_us, 1),
            "produce_per_s": round(produce_rate),
            "events": args.events,
            "workers": args.workers,
            "lag_rate_per_s": args.lag_rate,
            "mean_batch": round(sum(b["records"] for b in batches) / max(len(batches), 1)),
            "drain_mean_batch": round(sum(b["records"] for b in drained) / max(len(drained), 1)),
            "database": base_url.split(":", 1)[0],
            "reconcile_requests_per_s": reconciled["reconcile_requests_per_s"],
            "cpus": os.cpu_count(),
            "loadavg_1m_at_start": round(load, 2),
        }
    finally:
        for w in workers:
            w.stop()
        processes.stop_pid(broker.pid)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

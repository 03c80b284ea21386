"""Stream-processor benchmark: token events → ledger, end to end, on a real broker and a
real ``tokenmill streams`` worker process.

In one run, on a private Tansu broker and a fresh ledger (SQLite in a temporary home,
or ``--database-url``):

1. publish ``--events`` varied ``finished`` events (a backlog);
2. baseline: drain the backlog with a bare aiokafka consumer (``raw_consume_per_s``);
3. start a worker and time it draining the same backlog into the ledger, from the first
   ledger row to the last (``events_per_s``; its CPU time per event too);
4. with the worker caught up, publish at ``--lag-rate`` events/s for ``--lag-seconds``,
   each stamped ``finished_at`` = its send time, and poll the ledger every 20 ms: lag is
   the time a row became visible minus its ``finished_at`` (``ledger_lag_p50_ms``/``p99``).

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
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tokenmill.ledger.streams import testing as t

from tokenmill import kafka
from tokenmill.stack import processes

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--lag-rate", type=int, default=1000)
    ap.add_argument("--lag-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1, help="stream-processor processes (one group)")
    ap.add_argument(
        "--database-url", default=None, help="an empty or migrated ledger (default: SQLite)"
    )
    args = ap.parse_args()

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="tm-bench-streams-"))
    port = processes.free_port()
    broker = processes.spawn("kafka broker", processes.kafka_argv(port), work / "broker.log",
                             lambda: processes.port_open(port))  # fmt: skip
    bootstrap = f"{processes.LOOPBACK}:{port}"
    url = args.database_url or f"sqlite:///{work / 'home' / 'ledger.db'}"
    workers: list[t.WorkerProcess] = []
    try:
        events = t.mixed_events(args.events, prefix="bench", finished_at=time.time())
        started = time.perf_counter()
        t.publish_events(bootstrap, TOPIC, events)
        produce_rate = args.events / (time.perf_counter() - started)
        print(f"published {args.events:,} finished events at {produce_rate:,.0f}/s", flush=True)

        raw = asyncio.run(raw_consume(bootstrap, args.events))
        print(f"baseline: bare aiokafka consumer drains {raw:,.0f} msgs/s", flush=True)

        env = t.worker_env(home=work / "home", bootstrap=bootstrap, database_url=url,
                           app_id="bench-streams", topic=TOPIC)  # fmt: skip
        workers = [
            t.WorkerProcess(env, work / f"worker{i}.log").start() for i in range(args.workers)
        ]
        poller: LedgerPoller | None = None
        db_file = Path(url.split("sqlite:///", 1)[1]) if url.startswith("sqlite") else None
        first = cpu0 = None
        count = 0
        deadline = time.monotonic() + 600
        while count < args.events:
            for w in workers:
                if not w.alive():
                    raise SystemExit("worker died:\n" + w.log()[-3000:])
            if time.monotonic() > deadline:
                raise SystemExit(f"worker recorded {count} of {args.events} in time")
            if poller is None and (db_file is None or db_file.exists()):
                poller = LedgerPoller(url)
            if poller is not None:
                try:
                    count = poller.poll("bench-")
                except Exception:  # noqa: BLE001  (tables not migrated yet)
                    count = 0
            if count and first is None:
                first, first_count = time.perf_counter(), count
                cpu0 = sum(cpu_seconds(w.pid) for w in workers)
            time.sleep(0.02)
        assert first is not None and cpu0 is not None
        elapsed = time.perf_counter() - first
        rate = (args.events - first_count) / elapsed if elapsed > 0 else float("nan")
        cpu_us = (
            (sum(cpu_seconds(w.pid) for w in workers) - cpu0)
            / max(args.events - first_count, 1)
            * 1e6
        )
        drained = [b for w in workers for b in w.batches()]
        totals = t.ledger_totals(url)
        assert totals.usage_records == totals.charges == args.events, totals
        print(f"stream processor: {rate:,.0f} events/s into the ledger "
              f"({rate / raw:.1%} of the raw consume rate; {cpu_us:.0f} µs worker CPU per event)",
              flush=True)  # fmt: skip

        assert poller is not None
        lags = asyncio.run(lag_phase(bootstrap, poller, args.lag_rate, args.lag_seconds))
        lost = int(args.lag_rate * args.lag_seconds) - len(lags)
        p50, p99 = statistics.median(lags), pct(lags, 0.99)
        print(f"lag finished → ledger at {args.lag_rate:,}/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms"
              + (f" ({lost} not seen in time)" if lost else ""), flush=True)  # fmt: skip
        batches = [b for w in workers for b in w.batches()]
        result = {
            "events_per_s": round(rate),
            "raw_consume_per_s": round(raw),
            "ratio_to_raw": round(rate / raw, 4),
            "ledger_lag_p50_ms": round(p50, 1),
            "ledger_lag_p99_ms": round(p99, 1),
            "worker_cpu_us_per_event": round(cpu_us, 1),
            "produce_per_s": round(produce_rate),
            "events": args.events,
            "workers": args.workers,
            "lag_rate_per_s": args.lag_rate,
            "mean_batch": round(sum(b["records"] for b in batches) / max(len(batches), 1)),
            "drain_mean_batch": round(sum(b["records"] for b in drained) / max(len(drained), 1)),
            "database": url.split(":", 1)[0],
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

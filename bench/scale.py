"""Scale-out benchmark: one copy of every service against two, scheduler failover, and
the ceiling of one scheduler — on this machine's cores, with the zero-cost SIMULATED
engine, every service a real process (``tests/harness/scale_stack.py``) on loopback Kafka
(embedded Tansu), Redis and a SQLite ledger.

* ``requests_per_s_1x`` / ``_2x``: requests/s end to end with one copy of each service,
  then with two of each (gateway, stream processor, batch runner, webhook worker, sim
  worker, and the scheduler as active + standby). The same cores run both, so the ratio
  shows what coordination costs (consumer groups, leases, presence), not more hardware.
  One round's workload, all at once: chat completions over HTTP spread over the
  gateways; requests through ``POST /v1/tokenmill/requests`` (each with a webhook),
  done when every result is in the result store; and a batch through the Files and
  Batches API, done when it completed. Rounds alternate 1x, 2x, 1x, 2x (``--rounds``)
  so drift on a shared machine hits both; the figure of each is the median of its
  rounds, after one uncounted warm-up round at each size.
* ``webhooks_per_s_1x`` / ``_2x``: the requests' webhooks (and the batch's), delivered
  to a receiver in this process, per second from the round's start to the last one.
  Timed apart from the requests: delivery runs at a much lower rate of its own, and
  would otherwise be all the end-to-end figure measures. ``webhook_duplicates``: the
  same ``webhook-id`` received twice (a retry, or work done twice).
* ``failover_p50_s`` / ``_p99_s``: SIGKILL of the active scheduler → the first
  dispatch by the standby, over ``--kills`` kills (a new standby is started after each).
  Needs a standby (``scheduler/leader.py``): while a second scheduler announces no
  "standby" role, the figures are null and ``failover_mode`` says why.
* ``scheduler_ceiling_requests_per_s``: the one active scheduler's sustained dispatch
  rate (one decision = read from Kafka, enqueue, pick, reserve, mark, send to Celery):
  end to end on its real Kafka and Redis, with worker capacity offered by a heartbeat of
  a pool no real worker serves (1,000,000 free slots), because on two cores real sim
  workers, which share the cores, would be the bottleneck. Requests are preloaded into
  Kafka before the capacity appears; the rate is measured from the first dispatch to
  the last. Completions (settling) are not part of this figure.

    python bench/scale.py [--quick] [--rounds 4] [--kills 10]

``--quick`` is a smoke run (small sizes, one round each, no warm-up, 2 kills). A copy
that exits on its own is started again, as a deployment's restart policy would, and
counted in ``restarts``. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/harness
from harness.scale_stack import CEILING_MODEL, MODEL, TENANTS, Copy, ScaleStack, api_key, wait_for
from pipeline import pct

from gateway import _exchange, _request
from tokenmill import loops
from tokenmill.errors import StackError

#: every replicable service; the scheduler's second copy is its standby
SERVICES = ("scheduler", "worker", "gateway", "streams", "batch-runner", "webhook-worker")
FAILOVER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sizes:
    chat: int
    requests: int
    batch: int
    rounds: int
    kills: int
    ceiling: int
    connections: int = 256


FULL = Sizes(chat=8000, requests=500, batch=8000, rounds=4, kills=10, ceiling=60_000)
QUICK = Sizes(chat=1000, requests=100, batch=500, rounds=2, kills=2, ceiling=5000, connections=64)
#: the first round at each size: topics, consumer groups, connections, files made once
WARM_UP = Sizes(chat=64, requests=20, batch=20, rounds=1, kills=0, ceiling=0, connections=16)


# -- the webhook receiver -------------------------------------------------------------


class Receiver:
    """A bare HTTP/1.1 server on loopback that answers 204 to every POST and keeps
    each message's ``webhook-id`` (a retry repeats its id; a second copy of a delivery
    sent twice shows up as a duplicate)."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}  #: webhook-id → event type
        self.duplicates = 0
        self.changed = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def close(self) -> None:
        self.server.close()
        for writer in list(self._writers):
            writer.close()  # keep-alive connections of the webhook workers
        await self.server.wait_closed()

    def count(self, prefix: str) -> int:
        return sum(1 for t in self.ids.values() if t.startswith(prefix))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = (line.decode("latin-1") for line in head.split(b"\r\n")[1:] if line)
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                wid = headers.get("webhook-id", "")
                if wid in self.ids:
                    self.duplicates += 1
                else:
                    self.ids[wid] = json.loads(body).get("type", "?")
                self.changed.set()
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def wait(self, what: str, done: Any, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


# -- one round of the end-to-end workload -----------------------------------------------


def _chat_body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"p{i}"}], "max_tokens": 1}


async def _chat_load(url: str, n: int, connections: int, tenant: str) -> None:
    """``n`` non-streamed chat completions over ``connections`` keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    raws = [
        _request(
            f"{host}:{port}",
            "/v1/chat/completions",
            json.dumps(_chat_body(i)).encode(),
            api_key(tenant),
        )
        for i in range(n)
    ]
    next_i = 0
    failures: list[str] = []

    async def one_connection() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_i < len(raws):
                i, next_i = next_i, next_i + 1
                status, body = await _exchange(reader, writer, raws[i])
                if status != 200:
                    failures.append(f"{status}: {body[:200]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    if failures:
        raise SystemExit(
            f"{len(failures)} of {n} chat completions failed at {url}, first: {failures[0]}"
        )


async def _submit_with_webhooks(
    urls: list[str], n: int, hook: str, tenant: str, stack: ScaleStack
) -> None:
    """``n`` requests through tokenmill's request API, 500 per call, each with a webhook;
    returns once every one has its result in the result store."""
    import httpx
    import redis.asyncio as aredis
    from tokenmill.workers import keys

    items = [
        {"endpoint": "/v1/chat/completions", "body": _chat_body(i), "webhook": hook}
        for i in range(n)
    ]
    ids: list[str] = []
    async with httpx.AsyncClient(
        timeout=60, headers={"Authorization": f"Bearer {api_key(tenant)}"}
    ) as client:
        for k, start in enumerate(range(0, n, 500)):
            r = await client.post(
                f"{urls[k % len(urls)]}/v1/tokenmill/requests",
                json={"requests": items[start : start + 500]},
            )
            if r.status_code != 202:
                raise SystemExit(f"request API answered {r.status_code}: {r.text[:300]}")
            ids += [item["id"] for item in r.json()["data"]]
    # Their results, read where every gateway copy reads them; the webhooks are timed apart.
    store = aredis.Redis.from_url(stack.redis_url)
    results = [keys.result(i) for i in ids]
    try:
        async with asyncio.timeout(300):
            while (
                sum(
                    await asyncio.gather(
                        *(
                            store.exists(*results[s : s + 1000])
                            for s in range(0, len(results), 1000)
                        )
                    )
                )
                < n
            ):
                await asyncio.sleep(0.05)
    finally:
        await store.aclose()


async def _run_batch(url: str, n: int, hook: str, tenant: str) -> None:
    import openai

    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=api_key(tenant), max_retries=0, timeout=300
    )
    data = b"".join(
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": _chat_body(i),
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )
    f = await client.files.create(file=("scale.jsonl", data), purpose="batch")
    batch = await client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"webhook": hook},
    )
    async with asyncio.timeout(600):
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.1)  # polling the API: the batch's own progress is the condition
            batch = await client.batches.retrieve(batch.id)
    counts = batch.request_counts
    if batch.status != "completed" or counts is None or counts.completed != n:
        raise SystemExit(f"batch {batch.id} ended {batch.status} with {counts}")
    await client.close()


async def one_round(stack: ScaleStack, sizes: Sizes) -> dict[str, Any]:
    """Run one round's workload on whatever copies run now; requests/s and checks."""
    gateways = [c.address for c in stack.of("gateway") if c.address]
    receiver = Receiver()
    hook = await receiver.start()
    chat_t, req_t, batch_t = TENANTS[0], TENANTS[1], TENANTS[2]
    total = sizes.chat + sizes.requests + sizes.batch
    t0 = time.perf_counter()
    parts: dict[str, float] = {}

    async def timed(name: str, work: Any) -> None:
        await work
        parts[name] = time.perf_counter() - t0

    try:
        per_gateway = [
            sizes.chat // len(gateways) + (i < sizes.chat % len(gateways))
            for i in range(len(gateways))
        ]
        chats = [
            _chat_load(g, k, max(1, sizes.connections // len(gateways)), chat_t)
            for g, k in zip(gateways, per_gateway)
        ]
        await asyncio.gather(
            timed("chat", asyncio.gather(*chats)),
            timed("requests", _submit_with_webhooks(gateways, sizes.requests, hook, req_t, stack)),
            timed("batch", _run_batch(gateways[-1], sizes.batch, hook, batch_t)),
        )
        elapsed = time.perf_counter() - t0
        # Every request's webhook and the batch's, timed apart: delivery has a rate of its own.
        await receiver.wait(
            "webhooks", lambda: len(receiver.ids) >= sizes.requests + 1, timeout_s=600
        )
        parts["webhooks"] = time.perf_counter() - t0
    finally:
        await receiver.close()
    batch_hooks = receiver.count("batch.")
    if batch_hooks != 1 or len(receiver.ids) != sizes.requests + 1:
        raise SystemExit(
            f"webhooks: {len(receiver.ids)} distinct ({batch_hooks} of batches), "
            f"wanted {sizes.requests} of requests and 1 of the batch"
        )
    return {
        "requests_per_s": total / elapsed,
        "seconds": elapsed,
        "webhook_duplicates": receiver.duplicates,
        "webhooks_per_s": sizes.requests / parts["webhooks"],
        "parts": parts,
    }


def set_copies(stack: ScaleStack, n: int) -> None:
    """``n`` copies of every replicable service (started side by side)."""
    for service in SERVICES:
        while len(stack.of(service)) > n:
            stack.stop(stack.of(service)[-1])
    missing = [s for s in SERVICES for _ in range(n - len(stack.of(s)))]
    if missing:
        stack.start_many(missing)


# -- failover ---------------------------------------------------------------------------


def scheduler_roles(stack: ScaleStack) -> dict[str, Copy]:
    """The running scheduler copies by the role they announce (``active``, ``standby``)."""
    roles: dict[str, Copy] = {}
    for copy in stack.of("scheduler"):
        inst = stack.announced(copy.pid)
        if inst is not None and copy.alive():
            roles.setdefault(inst.role, copy)
    return roles


def scheduler_leads(stack: ScaleStack, copy: Copy) -> bool:
    """``copy`` is the active scheduler: it announces so, or (a scheduler that announces
    nothing) its pid is in the key a consuming scheduler keeps set."""
    inst = stack.announced(copy.pid)
    return (inst is not None and inst.role == "active") or stack.alive_key_is(copy.pid)


def has_standby(stack: ScaleStack, timeout_s: float) -> bool:
    try:
        wait_for(
            "an active and a standby scheduler",
            lambda: {"active", "standby"} <= scheduler_roles(stack).keys(),
            timeout_s,
            every_s=0.2,
        )
        return True
    except StackError:
        return False


async def measure_failover(stack: ScaleStack, kills: int) -> list[float]:
    """SIGKILL the active scheduler ``kills`` times; seconds from each kill to the
    standby's first dispatch.

    "First dispatch" is observed as the dispatched mark (``tokenmill:dispatched:<id>``,
    written by the scheduler in the same Redis call that records the request in flight)
    of a probe request published right after the kill. The probe is published *after*
    the kill so that only the standby can dispatch it — a request published before
    could have been dispatched by the dying scheduler, or sit read but undispatched in
    its memory — and publishing takes milliseconds, so the probe is waiting in Kafka
    long before any standby could take over. The mark is what the scheduler writes at
    dispatch itself, whereas the worker's first token event adds Celery's delivery; the
    probe's result is awaited too, to show the dispatch really reached a worker.
    """
    import redis.asyncio as aredis
    from tokenmill.producers.trusted import TrustedProducer
    from tokenmill.workers import keys

    times: list[float] = []
    client = aredis.Redis.from_url(stack.redis_url)
    async with TrustedProducer(TENANTS[3]) as producer:
        warm = await producer.submit_many([producer.build(MODEL, prompt="warm", max_tokens=1)])
        await producer.result(warm[0], timeout=60)
        for i in range(kills):
            active = scheduler_roles(stack)["active"]
            probe = producer.build(
                MODEL, prompt=f"probe {i} {uuid.uuid4()}", max_tokens=1, priority="interactive"
            )
            t_kill = time.monotonic()
            stack.kill(active)
            await producer.submit_many([probe])
            async with asyncio.timeout(FAILOVER_TIMEOUT_S):
                while not await client.exists(keys.dispatched(probe.id)):
                    await asyncio.sleep(0.005)
            times.append(time.monotonic() - t_kill)
            await producer.result(probe.id, timeout=60)
            print(
                f"  kill {i + 1}/{kills}: first dispatch by the standby after {times[-1]:.2f} s",
                flush=True,
            )
            stack.start("scheduler", timeout_s=60)  # the next standby
            if not has_standby(stack, 30):
                raise SystemExit("after a failover, no active + standby scheduler pair within 30 s")
    await client.aclose()
    return times


# -- the scheduler's ceiling --------------------------------------------------------------


async def measure_ceiling(stack: ScaleStack, n: int) -> float:
    """Dispatches/s of the one active scheduler with 1,000,000 free slots (see the
    module docstring)."""
    import redis.asyncio as aredis
    from tokenmill.producers.trusted import TrustedProducer
    from tokenmill.workers import heartbeat, keys

    from tokenmill.wire import WorkerHeartbeat

    client = aredis.Redis.from_url(stack.redis_url)
    ids: list[str] = []
    for t, tenant in enumerate(TENANTS):
        async with TrustedProducer(tenant) as producer:
            reqs = [
                producer.build(CEILING_MODEL, prompt=f"c{t}-{i}", max_tokens=1)
                for i in range(n // len(TENANTS))
            ]
            for start in range(0, len(reqs), 1000):
                ids += await producer.submit_many(reqs[start : start + 1000])
    marks = [keys.dispatched(i) for i in ids]

    async def dispatched() -> int:
        counts = await asyncio.gather(
            *(client.exists(*marks[s : s + 5000]) for s in range(0, len(marks), 5000))
        )
        return sum(counts)

    if await dispatched():
        raise SystemExit("ceiling: requests were dispatched before any capacity was offered")
    stop = asyncio.Event()

    async def offer_capacity() -> None:
        while not stop.is_set():
            beat = WorkerHeartbeat(
                worker="scale-bench-capacity",
                pool=CEILING_MODEL,
                models=(CEILING_MODEL,),
                engine="sim",
                simulated=True,
                capacity=1_000_000,
                in_flight=0,
            )
            pipe = client.pipeline(transaction=False)
            heartbeat.stage(pipe, beat)
            await pipe.execute()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    beats = asyncio.create_task(offer_capacity())
    try:
        async with asyncio.timeout(600):
            first = 0
            while not first:  # until the scheduler has seen the capacity and dispatched
                await asyncio.sleep(0.02)
                first = await dispatched()
            t0 = time.monotonic()
            done = first
            while done < len(ids):
                await asyncio.sleep(0.2)
                done = await dispatched()
            elapsed = time.monotonic() - t0
    finally:
        stop.set()
        await beats
        await heartbeat.remove(client, CEILING_MODEL, "scale-bench-capacity")
        await client.aclose()
    return (len(ids) - first) / elapsed


# -- main -------------------------------------------------------------------------------------


def throughput_phase(stack: ScaleStack, sizes: Sizes, rounds: int) -> dict[str, Any]:
    """Alternating rounds with 1 and 2 copies of each service; medians per size."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    hooks: dict[int, list[float]] = {1: [], 2: []}
    dupes = 0
    for r in range(rounds):
        copies = 1 if r % 2 == 0 else 2
        set_copies(stack, copies)
        if r < 2 and sizes.rounds > 2:  # not counted; a --quick smoke run skips it
            loops.run(one_round(stack, WARM_UP))
        got = loops.run(one_round(stack, sizes))
        rates[copies].append(got["requests_per_s"])
        hooks[copies].append(got["webhooks_per_s"])
        dupes += got["webhook_duplicates"]
        print(
            f"round {r + 1}/{rounds}: {copies} cop{'y' if copies == 1 else 'ies'} of each service "
            f"{got['requests_per_s']:>7,.0f} requests/s, {got['webhooks_per_s']:>5,.0f} webhooks/s (done at: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in got["parts"].items())
            + ")",
            flush=True,
        )
    out: dict[str, Any] = {
        "requests_per_s_1x": statistics.median(rates[1]),
        "requests_per_s_2x": statistics.median(rates[2]) if rates[2] else None,
        "webhooks_per_s_1x": statistics.median(hooks[1]),
        "webhooks_per_s_2x": statistics.median(hooks[2]) if hooks[2] else None,
        "webhook_duplicates": dupes,
    }
    if out["requests_per_s_2x"] is not None:
        out["scale_2x_over_1x"] = out["requests_per_s_2x"] / out["requests_per_s_1x"]
        print(
            f"end to end: 1 copy {out['requests_per_s_1x']:,.0f} requests/s, 2 copies "
            f"{out['requests_per_s_2x']:,.0f}/s = {out['scale_2x_over_1x']:.2f}× the 1-copy figure "
            f"(target ≥ 0.9×); webhooks {out['webhooks_per_s_1x']:,.0f}/s vs {out['webhooks_per_s_2x']:,.0f}/s"
        )
    return out


def failover_phase(stack: ScaleStack, kills: int) -> dict[str, Any]:
    set_copies(stack, 2)
    out: dict[str, Any] = {"failover_p50_s": None, "failover_p99_s": None}
    if not has_standby(stack, 20):
        out["failover_mode"] = "no standby: a second scheduler announced no 'standby' role"
        print(f"failover: not measured ({out['failover_mode']})")
        return out
    times = loops.run(measure_failover(stack, kills))
    out.update(
        failover_mode="standby",
        failover_p50_s=statistics.median(times),
        failover_p99_s=pct(times, 0.99),
        failover_max_s=max(times),
        failover_kills=len(times),
    )
    print(
        f"failover: SIGKILL of the active scheduler → first dispatch by the standby, {len(times)} kills: "
        f"p50 {out['failover_p50_s']:.2f} s, p99 {out['failover_p99_s']:.2f} s (target p99 ≤ 5 s)"
    )
    return out


def ceiling_phase(stack: ScaleStack, n: int, e2e: float | None) -> dict[str, Any]:
    if not stack.of("scheduler"):
        stack.start("scheduler")
    stack.scale_to("scheduler", 1)
    one = stack.of("scheduler")[0]
    wait_for(
        "the remaining scheduler leading", lambda: scheduler_leads(stack, one), 60, every_s=0.2
    )
    before = stack.restarts.get("scheduler", 0)
    rate = loops.run(measure_ceiling(stack, n))
    # A scheduler that lost its lease mid-run (exit 75, started again) stalled the run.
    restarted = stack.restarts.get("scheduler", 0) - before
    ratio = f" = {rate / e2e:.1f}× the end-to-end 1-copy figure" if e2e else ""
    print(
        f"scheduler ceiling: {rate:,.0f} dispatches/s sustained by one scheduler{ratio}"
        + (f" (it lost its lease and restarted {restarted}× meanwhile)" if restarted else "")
    )
    return {"scheduler_ceiling_requests_per_s": rate, "ceiling_scheduler_restarts": restarted}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: small sizes, no warm-up, 2 kills"
    )
    ap.add_argument(
        "--rounds", type=int, help="rounds of 1x and of 2x (default 4; quick 2), alternating"
    )
    ap.add_argument("--kills", type=int, help="scheduler kills (default 10; quick 2)")
    ap.add_argument(
        "--phases",
        default="throughput,failover,ceiling",
        help="which phases, in order (comma-separated; default all three)",
    )
    args = ap.parse_args()
    if unknown := set(args.phases.split(",")) - {"throughput", "failover", "ceiling"}:
        ap.error(f"--phases: no such phase {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    rounds, kills = args.rounds or sizes.rounds, args.kills or sizes.kills
    started = time.monotonic()
    figures: dict[str, Any] = {}
    with ScaleStack() as stack:
        print(f"stack in {stack.dir} (logs there)", flush=True)
        phases = {
            "throughput": lambda: throughput_phase(stack, sizes, rounds),
            "failover": lambda: failover_phase(stack, kills),
            "ceiling": lambda: ceiling_phase(
                stack, sizes.ceiling, figures.get("requests_per_s_1x")
            ),
        }
        for name in args.phases.split(","):
            t0 = time.monotonic()
            figures.update(phases[name]())
            print(f"  ({name} phase: {time.monotonic() - t0:.0f} s)", flush=True)
        # Copies that exited on their own (a scheduler that lost its lease exits to come
        # back as a standby): each one stalled the work it held, so they belong to the figures.
        figures["restarts"] = dict(stack.restarts)
    figures["targets_met"] = {
        "scale_2x_ge_0.9x": bool(
            figures.get("scale_2x_over_1x") and figures["scale_2x_over_1x"] >= 0.9
        ),
        "failover_p99_le_5s": figures.get("failover_p99_s") is not None
        and figures["failover_p99_s"] <= 5.0,
    }
    figures["run_s"] = time.monotonic() - started
    print(f"run time {figures['run_s']:.0f} s")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()

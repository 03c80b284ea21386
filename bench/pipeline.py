"""End-to-end pipeline benchmark: producer → Kafka → scheduler → Celery worker → result.

Requests are published by the in-cluster trusted producer (``TrustedProducer``), so the
figures are the pipeline behind the gateway (``bench/gateway.py`` measures the HTTP door).

Measures on a fresh local stack (started in a temporary home, stopped at the end):

* ``e2e_requests_per_s``: requests/s from submit to result through the whole pipeline
  with the zero-cost SIMULATED engine (so the figure is tokenmill's control plane);
* ``added_latency_p50_ms`` / ``_p99_ms``: at low load, from submit to the engine
  starting the request (the worker's ``dispatched`` event);
* baselines in the same run: raw aiokafka produce→consume messages/s, and Celery no-op
  task round trips/s on the same Redis;
* ``vllm_pipeline_efficiency``: output tokens/s through the whole pipeline with the
  vLLM CPU engine over direct ``LLM.generate`` on the same prompts, measured after the
  sim stack is down (``bench/pipeline_vllm.py``; ``--no-vllm`` skips it: null).

    python bench/pipeline.py [--requests 20000] [--no-vllm]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tokenmill import wire
from tokenmill.config import EXAMPLE_CONFIG

BENCH_MODELS = """
[models.bench]
engine = "sim"
max_in_flight = 2048

[[price_cards]]
model = "bench"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "0.10"
output_per_million = "0.40"
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LocalStack:
    def __init__(self, models: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tm-bench-"))
        self.home = self.dir / "home"
        config = self.dir / "tokenmill.toml"
        config.write_text(EXAMPLE_CONFIG.read_text() + BENCH_MODELS)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        self.env.update(TOKENMILL_HOME=str(self.home), TOKENMILL_CONFIG=str(config))
        self.models = models

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "tokenmill", *args], env=self.env, check=True,
                       capture_output=True, timeout=300)

    def __enter__(self) -> LocalStack:
        args = ["up"]
        for m in self.models:
            args += ["--model", m]
        self.cli(*args)
        state = json.loads((self.home / "stack.json").read_text())
        addr = {s["name"]: s["address"] for s in state["services"]}
        self.kafka, self.redis = addr["kafka"], addr["redis"]
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("TOKENMILL_")})
        os.environ["TOKENMILL_KAFKA_URL"], os.environ["TOKENMILL_REDIS_URL"] = self.kafka, self.redis
        return self

    def __exit__(self, *exc: object) -> None:
        self.cli("down")


# -- baselines -----------------------------------------------------------------------


async def kafka_baseline(bootstrap: str, n: int = 50_000) -> float:
    topic = f"bench-raw-{time.time_ns()}"
    payload = b"x" * 400
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                fetch_max_wait_ms=50, enable_auto_commit=False)
    await producer.start()
    t0 = time.perf_counter()
    futures = [await producer.send(topic, payload, key=b"k%d" % (i % 8)) for i in range(n)]
    await asyncio.gather(*futures)
    await consumer.start()
    got = 0
    async with asyncio.timeout(120):
        while got < n:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            got += sum(len(v) for v in batch.values())
    elapsed = time.perf_counter() - t0
    await consumer.stop()
    await producer.stop()
    return n / elapsed


def celery_baseline(redis_url: str, n: int = 2000) -> float:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery("bench", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True, broker_connection_retry_on_startup=True)

    @app.task(name="bench.noop")
    def noop() -> int:
        return 1

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"):
        noop.delay().get(timeout=30)  # warm
        t0 = time.perf_counter()
        results = [noop.delay() for _ in range(n)]
        for r in results:
            r.get(timeout=120)
        return n / (time.perf_counter() - t0)


# -- the pipeline ------------------------------------------------------------------------


async def e2e_throughput(n: int) -> float:
    from tokenmill.producers.trusted import TrustedProducer

    async with TrustedProducer("alpha") as producer:
        warm = await producer.submit_many([producer.build("bench", prompt="warm", max_tokens=1)])
        await producer.result(warm[0], timeout=60)
        reqs = [producer.build("bench", prompt=f"p{i}", max_tokens=1) for i in range(n)]
        t0 = time.perf_counter()
        ids = []
        for start in range(0, n, 1000):
            ids += await producer.submit_many(reqs[start : start + 1000])
        results = await asyncio.gather(*(producer.result(i, timeout=600) for i in ids))
        elapsed = time.perf_counter() - t0
    bad = [r for r in results if r.status is not wire.ResultStatus.succeeded]
    if bad:
        raise SystemExit(f"{len(bad)} requests did not succeed: {bad[0]}")
    return n / elapsed


async def added_latency(kafka_bootstrap: str, n: int = 200, rate: float = 20.0) -> list[float]:
    """Submit → the worker starting the request, at ``rate`` requests/s."""
    from tokenmill.producers.trusted import TrustedProducer

    consumer = AIOKafkaConsumer(wire.TOKEN_EVENTS_TOPIC, bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="latest", fetch_max_wait_ms=10, enable_auto_commit=False)
    await consumer.start()
    await consumer.getmany(timeout_ms=500)  # join before submitting
    started: dict[str, float] = {}
    submitted: dict[str, float] = {}
    async with TrustedProducer("beta") as producer:
        for i in range(n):
            req = producer.build("bench", prompt=f"l{i}", max_tokens=1, priority="interactive")
            submitted[req.id] = req.submitted_at
            await producer.submit_many([req])
            await asyncio.sleep(1 / rate)
        async with asyncio.timeout(60):
            while len(started) < n:
                batch = await consumer.getmany(timeout_ms=200)
                for msgs in batch.values():
                    for m in msgs:
                        ev = wire.decode(wire.TokenEvent, m.value)
                        if ev.kind is wire.EventKind.dispatched and ev.request_id in submitted:
                            started[ev.request_id] = ev.ts
    await consumer.stop()
    return [(started[r] - submitted[r]) * 1000 for r in submitted]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM efficiency runs")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    with LocalStack(["bench"]) as stack:
        print(f"local stack up in {stack.home}")
        figures["kafka_msgs_per_s"] = asyncio.run(kafka_baseline(stack.kafka))
        print(f"baseline: raw aiokafka produce→consume  {figures['kafka_msgs_per_s']:>10,.0f} msgs/s")
        figures["celery_tasks_per_s"] = celery_baseline(stack.redis)
        print(f"baseline: Celery no-op round trips      {figures['celery_tasks_per_s']:>10,.0f} tasks/s")
        figures["e2e_requests_per_s"] = asyncio.run(e2e_throughput(args.requests))
        print(f"pipeline: end to end (sim engine)       {figures['e2e_requests_per_s']:>10,.0f} requests/s"
              f"  = {figures['e2e_requests_per_s'] / figures['celery_tasks_per_s']:.1f}× Celery no-op tasks/s")
        lat = asyncio.run(added_latency(stack.kafka))
        figures["added_latency_p50_ms"] = statistics.median(lat)
        figures["added_latency_p99_ms"] = pct(lat, 0.99)
        print(f"pipeline: added latency at 20 req/s     p50 {figures['added_latency_p50_ms']:.1f} ms, "
              f"p99 {figures['added_latency_p99_ms']:.1f} ms")
    figures["vllm_pipeline_efficiency"] = None
    if not args.no_vllm:
        from pipeline_vllm import measure

        vllm = measure()
        figures["vllm_pipeline_efficiency"] = vllm["vllm_pipeline_efficiency"]
        print(f"pipeline: vLLM CPU through the pipeline {vllm['pipeline_tokens_per_s']:>10,.0f} tok/s"
              f"  = {vllm['vllm_pipeline_efficiency']:.3f}× direct LLM.generate"
              f" ({vllm['direct_tokens_per_s']:,.0f} tok/s)")
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()

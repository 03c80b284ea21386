"""What the MiniLM tests and ``bench/embeddings.py`` compare the pipeline with, in a
process of its own (vLLM loads torch and the model; the caller's stack runs meanwhile).

    python tests/harness/minilm_reference.py MODEL_DIR INPUTS.json OUT.json [ENGINE_ARGS.json]

1. Loads MiniLM with vLLM's ``LLM`` (pooling runner, the engine arguments given) and
   embeds the inputs once to warm up, then again timed, with ``LLM.embed``; counts each
   input's tokens with the model's own tokenizer (special tokens included, as the
   engine adds them). Writes ``{"vectors", "tokens", "seconds"}`` to OUT.json and prints
   ``@@ ready``.
2. Then, for each path read from stdin, validates every JSON line of that file as
   vLLM's own ``BatchRequestOutput`` and prints ``@@ {"rows": N, "invalid": [...]}``.

Answers start with ``@@ `` (vLLM logs to stdout too).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    model_dir, inputs_path, out_path = sys.argv[1:4]
    engine_args = json.loads(Path(sys.argv[4]).read_text()) if len(sys.argv) > 4 else {}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    with open(inputs_path) as fh:
        inputs: list[str] = json.load(fh)
    args = {"runner": "pooling", "dtype": "float32", "enforce_eager": True, "max_model_len": 256,
            "gpu_memory_utilization": 0.1, **engine_args, "model": model_dir}
    llm = LLM(**args)
    llm.embed(inputs[:64], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.embed(inputs, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(out_path, "w") as fh:
        json.dump({"vectors": [o.outputs.embedding for o in outs],
                   "tokens": [len(tok(t)["input_ids"]) for t in inputs], "seconds": seconds}, fh)
    print("@@ ready", flush=True)
    for line in sys.stdin:
        invalid = []
        with open(line.strip()) as fh:
            rows = [json.loads(x) for x in fh if x.strip()]
        for row in rows:
            try:
                BatchRequestOutput.model_validate(row)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                invalid.append(f"{row.get('custom_id')!r}: {exc}"[:500])
        print("@@ " + json.dumps({"rows": len(rows), "invalid": invalid}), flush=True)


if __name__ == "__main__":
    main()

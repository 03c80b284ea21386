"""Run by test_prompt_tokens in a process of its own (vLLM's offline CPU environment):
each body's prompt tokens as the vLLM engine counts them and as tokenmill.tokens does.

Usage: python vllm_prompt_counts.py MODEL_DIR STATE_DIR BODIES_JSON -> JSON [[engine, ours], ...]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from tokenmill.workers.tiny_model import OFFLINE_CPU_ENV


async def main(model: Path, bodies: list[dict]) -> list[list[int]]:
    from tokenmill.config.models import ModelConfig
    from tokenmill.workers.engines.vllm_engine import VllmEngine

    from tokenmill.tokens import counter_for
    from tokenmill.wire import Endpoint, InferenceRequest

    cfg = ModelConfig(
        engine="vllm",
        engine_args={
            "model": str(model),
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 2048,
            "max_num_seqs": 4,
            "frontend": "inproc",
        },
    )
    # off the loop: on one, counter_for reserves a bound while the tokenizer loads
    count = await asyncio.to_thread(counter_for, "tiny", cfg, model)
    engine = VllmEngine.from_config("tiny", cfg, home=model)
    await engine.start()
    out = []
    try:
        for i, body in enumerate(bodies):
            endpoint = Endpoint.chat_completions if "messages" in body else Endpoint.completions
            req = InferenceRequest(
                id=f"r{i}",
                tenant="t",
                model="tiny",
                endpoint=endpoint,
                body={"model": "tiny", **body},
                max_tokens=1,
                prompt_tokens_estimate=0,
                submitted_at=time.time(),
            )
            last = None
            async for step in engine.generate(req):
                last = step
            assert last is not None
            out.append([last.prompt_tokens, count(body)])
    finally:
        await engine.shutdown()
    return out


if __name__ == "__main__":
    os.environ.update(OFFLINE_CPU_ENV, TMPDIR=sys.argv[2], VLLM_CACHE_ROOT=sys.argv[2])
    result = asyncio.run(main(Path(sys.argv[1]), json.loads(sys.argv[3])))
    print("COUNTS " + json.dumps(result))

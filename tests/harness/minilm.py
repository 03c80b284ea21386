"""The MiniLM embedding model end to end, for ``tests/batch/test_minilm_batch.py`` and
``bench/embeddings.py``: a local stack serving ``minilm`` (the example config's
all-MiniLM-L6-v2 on vLLM) beside the sim model, the reference process that computes the
same inputs with vLLM's ``LLM.embed`` (:mod:`minilm_reference`), deterministic inputs,
and batches run through the gateway with the ``openai`` SDK.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

from tokenmill.config import EXAMPLE_CONFIG, load_settings

ALPHA_KEY = "tm-alpha-demo-key"
REFERENCE = Path(__file__).with_name("minilm_reference.py")
_WORDS = ("queue", "token", "tenant", "batch", "engine", "ledger", "kafka", "redis", "worker", "vector",
          "budget", "window", "stream", "priority", "model", "sentence", "embedding", "cosine", "shard",
          "replica", "latency", "throughput", "fair", "share", "price", "card", "gateway", "webhook")


def passages(n: int, words: int, seed: int = 17) -> list[str]:
    """``n`` distinct pseudo-sentences of about ``words`` words each (deterministic)."""
    rng = random.Random(seed)
    return [f"passage {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "." for i in range(n)]


def minilm_engine_args() -> dict[str, Any]:
    """The example config's engine arguments for ``minilm`` that the reference shares
    (vLLM's own, without the model path and tokenmill's front-end keys)."""
    args = dict(load_settings().models["minilm"].engine_args)
    for key in ("model", "frontend", "stream_interval", "batch_interval"):
        args.pop(key, None)
    args.setdefault("max_num_seqs", load_settings().models["minilm"].max_in_flight)
    return args


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


class Reference:
    """The reference process (see :mod:`minilm_reference`): started at once, read later."""

    def __init__(self, inputs: list[str], workdir: Path, *, omp_threads: int | None = None) -> None:
        """``omp_threads``: the engine's OpenMP threads (a tokenmill worker runs vLLM with
        one, ``OMP_NUM_THREADS=1``); None: vLLM's default."""
        from tokenmill.workers.minilm import ensure_minilm

        model = ensure_minilm(workdir / "home")
        (workdir / "inputs.json").write_text(json.dumps(inputs))
        (workdir / "args.json").write_text(json.dumps(minilm_engine_args()))
        self.out = workdir / "reference.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(REFERENCE), str(model), str(workdir / "inputs.json"), str(self.out),
             str(workdir / "args.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(workdir / "reference.log").open("wb"),
            text=True, env={**os.environ, "TMPDIR": str(workdir),
                            **({"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else {})},
        )  # fmt: skip
        self.log = workdir / "reference.log"
        self._result: dict[str, Any] | None = None

    def result(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """``{"vectors", "tokens", "seconds"}`` once the reference has them (read once)."""
        if self._result is None:
            line = _readline(self.proc, timeout_s)
            assert line.strip() == "ready", f"reference failed: {line!r}\n{self.log.read_text()[-3000:]}"
            self._result = json.loads(self.out.read_text())
        return self._result

    def validate(self, path: Path, timeout_s: float = 60.0) -> dict[str, Any]:
        """``{"rows", "invalid"}``: ``path``'s lines checked as vLLM's ``BatchRequestOutput``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        got: dict[str, Any] = json.loads(_readline(self.proc, timeout_s))
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _readline(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The process's next answer (a stdout line starting ``@@ ``; vLLM logs there too),
    without the marker; fails after ``timeout_s`` (a thread reads)."""
    import concurrent.futures

    assert proc.stdout is not None
    out = proc.stdout

    def answer() -> str:
        for line in out:
            if line.startswith("@@ "):
                return line[3:]
        return ""  # the process ended

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(answer)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            proc.kill()
            raise AssertionError(f"no answer from the reference process within {timeout_s:g}s") from None


class MiniLMStack:
    """``tokenmill up --model minilm`` (and the sim worker) in a temporary home with the
    example config; leaving runs ``tokenmill down``."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = root or Path(tempfile.mkdtemp(prefix="tm-minilm-"))
        self.home = self.dir / "home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
        self.env.update(TOKENMILL_HOME=str(self.home), TOKENMILL_CONFIG=str(EXAMPLE_CONFIG),
                        TMPDIR=str(self.dir))

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tokenmill", *args], env=self.env, check=False,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def __enter__(self) -> Self:
        up = self.cli("up", "--no-supervise", "--model", "minilm")
        if up.returncode != 0:
            self.cli("down")
            raise AssertionError(f"tokenmill up failed:\n{up.stdout}\n{up.stderr}")
        state = json.loads((self.home / "stack.json").read_text())
        self.gateway = next(s["address"] for s in state["services"] if s["name"] == "gateway")
        return self

    def __exit__(self, *exc: object) -> None:
        self.cli("down")

    def sdk(self, key: str = ALPHA_KEY) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=key, max_retries=0)

    def run_batch(self, data: bytes, endpoint: str | None, out_dir: Path, *, timeout_s: float = 300.0,
                  name: str = "batch") -> tuple[dict[str, Any], Path, Path]:
        """Upload ``data``, create a batch (``endpoint`` None: lines may mix, tokenmill's
        extension), wait for it to end; returns the batch object and the output and error
        files written to ``out_dir``."""
        import httpx

        client = self.sdk()
        f = client.files.create(file=(f"{name}.jsonl", data), purpose="batch")
        body: dict[str, Any] = {"input_file_id": f.id, "completion_window": "24h"}
        if endpoint is not None:
            body["endpoint"] = endpoint
        headers = {"Authorization": f"Bearer {ALPHA_KEY}"}
        created = httpx.post(f"{self.gateway}/v1/batches", json=body, headers=headers, timeout=60)
        assert created.status_code == 200, created.text
        batch = created.json()
        deadline = time.monotonic() + timeout_s
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"batch {batch['id']} still {batch['status']} after {timeout_s:g}s"
            time.sleep(0.2)
            batch = httpx.get(f"{self.gateway}/v1/batches/{batch['id']}", headers=headers, timeout=30).json()
        out, errs = out_dir / f"{name}_output.jsonl", out_dir / f"{name}_errors.jsonl"
        out.write_bytes(client.files.content(batch["output_file_id"]).content if batch["output_file_id"] else b"")
        errs.write_bytes(client.files.content(batch["error_file_id"]).content if batch["error_file_id"] else b"")
        return batch, out, errs


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

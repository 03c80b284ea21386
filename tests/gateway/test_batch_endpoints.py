"""Batch files as broad as OpenAI's and vLLM's, on the whole local stack (sim engine): one
file mixing chat, completions, embeddings, Responses lines, endpoints tokenmill does not
run and broken lines — every line exactly once in the output or the error file, every
row in the shape the ``openai`` package's types parse."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import httpx
import pytest
from batch_stack import Stack, wait_for
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from tokenmill.producers.batch_parser import entry_id
from tokenmill.workers.engines.sim import sim_embedding

from tokenmill.tokens import sim_prompt_tokens


def line(cid: str | None, url: str, **body: object) -> dict:
    out: dict = {"method": "POST", "url": url, "body": body}
    if cid is not None:
        out["custom_id"] = cid
    return out


MIXED = [
    line("chat", "/v1/chat/completions", model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=3),
    line("cmpl", "/v1/completions", model="sim", prompt="once upon a time", max_tokens=2),
    line("emb-one", "/v1/embeddings", model="sim", input="the quick brown fox"),
    line("emb-many", "/v1/embeddings", model="sim", input=["the quick brown fox", "jumps"],
         encoding_format="base64"),
    line("emb-ids", "/v1/embeddings", model="sim", input=[[1, 2, 3], [4, 5]]),
    line("resp-str", "/v1/responses", model="sim", input="tell me a story", instructions="be brief",
         max_output_tokens=3),
    line("resp-items", "/v1/responses", model="sim", max_output_tokens=4, metadata={"k": "v"},
         input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
                {"role": "user", "content": "and again"}]),
    line("score", "/v1/score", model="sim", text_1="What is the capital of France?",
         text_2=["The capital of Brazil is Brasilia.", "The capital of France is Paris."]),
    line("rerank", "/v1/rerank", model="sim", query="capital of France?", documents=["Paris", "Brasilia"]),
    line(None, "/v1/embeddings", model="sim", input="no custom_id"),
    b'{"custom_id": "torn", "method": "POST", "url": "/v1/embe',
    line("emb-chat-model", "/v1/embeddings", model="smollm2", input="a chat model does not embed"),
    line("chat-emb-model", "/v1/chat/completions", model="minilm", messages=[{"role": "user", "content": "x"}]),
    line("emb-dims", "/v1/embeddings", model="sim", input="x", dimensions=16),
    line("resp-tools", "/v1/responses", model="sim", input="x", tools=[]),
    line("resp-image", "/v1/responses", model="sim",
         input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]),
]
#: line number -> (file, error code) of each line that fails; the others succeed
FAILS = {
    8: "unsupported_endpoint", 9: "unsupported_endpoint", 10: "missing_custom_id", 11: "invalid_json",
    12: "invalid_body", 13: "invalid_body", 14: "invalid_body", 15: "invalid_body", 16: "invalid_body",
}
PARAMS = {8: "url", 9: "url", 12: "body.model", 13: "body.model", 14: "body.dimensions", 15: "body.tools",
          16: "body.input[0].content[0].type"}


def _jsonl(items: list) -> bytes:
    return b"\n".join(i if isinstance(i, bytes) else json.dumps(i).encode() for i in items) + b"\n"


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict], list[dict]]:
    """The mixed file run through the CLI (no --endpoint: lines may mix endpoints)."""
    root = tmp_path_factory.mktemp("mixed")
    src, out, errs = root / "in.jsonl", root / "out.jsonl", root / "errs.jsonl"
    src.write_bytes(_jsonl(MIXED))
    env = stack.client_env()
    proc = stack.cli("batch", "submit", str(src), "--tenant", "alpha", "--wait", "--json",
                     "--output", str(out), "--errors", str(errs), timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr, env)
    return json.loads(proc.stdout), _read(out), _read(errs)


def test_every_line_once_in_output_or_errors(mixed: tuple[dict, list[dict], list[dict]]) -> None:
    batch, output, errors = mixed
    bid = batch["id"]
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": len(MIXED), "completed": len(MIXED) - len(FAILS),
                                       "failed": len(FAILS)}
    ids = {entry_id(bid, n): n for n in range(1, len(MIXED) + 1)}
    lines = sorted(ids[e["id"]] for e in output + errors)
    assert lines == list(range(1, len(MIXED) + 1)), "each line exactly once"
    assert {ids[e["id"]] for e in errors} == set(FAILS)
    for e in errors:
        n = ids[e["id"]]
        assert e["response"] is None and e["error"]["line"] == n
        assert (e["error"]["code"], e["error"]["param"]) == (FAILS[n], PARAMS.get(n, e["error"]["param"]))
        assert e["custom_id"] == (MIXED[n - 1].get("custom_id", "") if isinstance(MIXED[n - 1], dict) else "")
    by_line = {e["error"]["line"]: e["error"]["message"] for e in errors}
    assert "unsupported endpoint '/v1/score'" in by_line[8]
    assert "'smollm2' is a text generation model: it does not serve /v1/embeddings" in by_line[12]
    assert "'minilm' is an embedding model" in by_line[13]
    # The batch object lists the same refused lines, by line number.
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == sorted(FAILS.items())


def test_rows_parse_with_the_openai_types(mixed: tuple[dict, list[dict], list[dict]]) -> None:
    _, output, _ = mixed
    rows = {e["custom_id"]: e["response"] for e in output}
    assert all(r["status_code"] == 200 for r in rows.values())
    chat = ChatCompletion.model_validate(rows["chat"]["body"])
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    assert Completion.model_validate(rows["cmpl"]["body"]).choices[0].text

    one = CreateEmbeddingResponse.model_validate(rows["emb-one"]["body"])
    (vec,) = [d.embedding for d in one.data]
    assert vec == sim_embedding("the quick brown fox", 384)
    assert math.isclose(math.fsum(x * x for x in vec), 1.0, rel_tol=1e-9)
    assert one.usage.prompt_tokens == one.usage.total_tokens == sim_prompt_tokens("the quick brown fox")

    # base64 rows: the float32 bytes, which the openai SDK decodes before its type sees them
    raw = rows["emb-many"]["body"]
    decoded = [list(struct.unpack("<384f", base64.b64decode(d["embedding"]))) for d in raw["data"]]
    many = CreateEmbeddingResponse.model_validate(
        {**raw, "data": [{**d, "embedding": v} for d, v in zip(raw["data"], decoded)]})
    assert [d.index for d in many.data] == [0, 1]
    assert max(abs(a - b) for a, b in zip(decoded[0], vec)) < 1e-6, "the same vector as float32"
    assert many.usage.prompt_tokens == 4 + 1

    ids = CreateEmbeddingResponse.model_validate(rows["emb-ids"]["body"])
    assert [len(d.embedding) for d in ids.data] == [384, 384]
    assert ids.usage.prompt_tokens == 3 + 2, "token ids count as given"

    short = Response.model_validate(rows["resp-str"]["body"])
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.usage is not None and short.usage.output_tokens == 3 and short.output_text
    # instructions + one user message: words + 4 a message + 2 for the reply (the sim count)
    assert short.usage.input_tokens == (2 + 4) + (4 + 4) + 2
    items = Response.model_validate(rows["resp-items"]["body"])
    assert items.metadata == {"k": "v"} and items.usage is not None
    assert items.usage.input_tokens == (2 + 4) + (1 + 4) + (2 + 4) + 2



def test_batch_usage_is_the_ledgers_sum_of_its_lines(stack: Stack, mixed: tuple[dict, list[dict], list[dict]]) -> None:
    batch, output, _ = mixed
    bodies = [e["response"]["body"] for e in output]
    prompt = sum(b["usage"].get("prompt_tokens", b["usage"].get("input_tokens", 0)) for b in bodies)
    out = sum(b["usage"].get("completion_tokens", b["usage"].get("output_tokens", 0)) for b in bodies)
    assert prompt > 0 and out > 0

    def usage() -> tuple[int, int] | None:
        got = httpx.get(f"{stack.address('gateway')}/v1/batches/{batch['id']}",
                        headers={"Authorization": "Bearer tm-alpha-demo-key"}, timeout=10).json()["usage"]
        pair = (got["input_tokens"], got["output_tokens"])
        return pair if pair == (prompt, out) else None

    # the stream processor records the lines' usage a moment after the batch ends
    assert wait_for("the ledger's usage of the batch", usage, timeout=30) == (prompt, out)

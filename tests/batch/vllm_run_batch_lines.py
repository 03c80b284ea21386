"""The request lines of vLLM's own run_batch tests (``tests/entrypoints/openai/
test_run_batch.py``: chat, embeddings, score, rerank and an invalid file), rewritten to
this repository's models — ``sim`` for chat, ``minilm`` for embeddings — and, per file,
what each line must become: ``"ok"`` by custom_id, or the error code by line number."""

from __future__ import annotations

import json

CHAT, EMBED = "sim", "minilm"


def _jsonl(*lines: dict) -> str:
    return "\n".join(json.dumps(x) for x in lines)


def _chat(cid: str, system: str, model: str = CHAT, url: str = "/v1/chat/completions", **extra: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": "Hello world!"}],
                     "max_tokens": 1000, **extra}}


def _embed(cid: str, text: str, model: str = EMBED) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": text}}


_SCORE_BODY = {"model": EMBED, "text_1": "What is the capital of France?",
               "text_2": ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]}
_RERANK_BODY = {"model": EMBED, "query": "What is the capital of France?",
                "documents": ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]}

#: name -> (file text, expected outcome per line)
VLLM_FILES: dict[str, tuple[str, dict[object, str]]] = {
    "chat": (_jsonl(
        _chat("request-1", "You are a helpful assistant."),
        _chat("request-2", "You are an unhelpful assistant."),
        _chat("request-3", "You are an unhelpful assistant.", model="NonExistModel"),
        _chat("request-4", "You are an unhelpful assistant.", url="/bad_url"),
        _chat("request-5", "You are an unhelpful assistant.", stream="True"),
    ), {"request-1": "ok", "request-2": "ok", 3: "model_not_found", 4: "invalid_url", 5: "invalid_body"}),
    "embeddings": (_jsonl(
        _embed("request-1", "You are a helpful assistant."),
        _embed("request-2", "You are an unhelpful assistant."),
        _embed("request-3", "Hello world!"),
        _embed("request-4", "Hello world!", model="NonExistModel"),
    ).replace("\n", "\n\n", 1), {"request-1": "ok", "request-2": "ok", "request-3": "ok", 5: "model_not_found"}),
    "score": (_jsonl(
        {"custom_id": "request-1", "method": "POST", "url": "/v1/score", "body": _SCORE_BODY},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/score", "body": _SCORE_BODY},
    ), {1: "unsupported_endpoint", 2: "unsupported_endpoint"}),
    "rerank": (_jsonl(
        {"custom_id": "request-1", "method": "POST", "url": "/rerank", "body": _RERANK_BODY},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/rerank", "body": _RERANK_BODY},
        {"custom_id": "request-3", "method": "POST", "url": "/v2/rerank", "body": _RERANK_BODY},
    ), {1: "unsupported_endpoint", 2: "unsupported_endpoint", 3: "unsupported_endpoint"}),
    "invalid": (_jsonl(
        {**{k: v for k, v in _chat("x", "You are a helpful assistant.").items() if k != "custom_id"},
         "invalid_field": "request-1"},
        _chat("request-2", "You are an unhelpful assistant."),
    ), {1: "missing_custom_id", "request-2": "ok"}),
}

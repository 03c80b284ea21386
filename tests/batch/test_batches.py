"""Batches on the whole local stack (real broker, Redis, scheduler, sim workers, batch
runner): exact output and error files, the client API and CLI through the gateway's
Files and Batches API, cancel, expiry, and the stack stopped and restarted mid-batch."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from batch_stack import Stack, wait_for
from tokenmill.producers.batch_parser import entry_id

from tokenmill import Client
from tokenmill.errors import NotFound, ValidationError
from tokenmill.wire import BatchStatus, batch_request_id


def chat(cid: str, content: str = "hi", model: str = "sim", **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(*items: object) -> bytes:
    return b"\n".join(i if isinstance(i, bytes) else json.dumps(i).encode() for i in items) + b"\n"


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def slow_lines(n: int, tokens: int, prefix: str = "s") -> bytes:
    return jsonl(*(chat(f"{prefix}{i}", f"line {i}", model="slowsim", max_tokens=tokens) for i in range(n)))


def content(stack: Stack, file_id: str, key: str) -> httpx.Response:
    """``GET /v1/files/{id}/content`` with ``key``."""
    return httpx.get(f"{stack.address('gateway')}/v1/files/{file_id}/content",
                     headers={"Authorization": f"Bearer {key}"}, timeout=30)


def assert_every_line_once(output: list[dict], errors: list[dict], custom_ids: list[str]) -> None:
    seen = Counter(e["custom_id"] for e in output + errors)
    assert seen == Counter(custom_ids), "every custom_id exactly once across output and errors"


def test_mixed_batch_output_and_error_files_are_exact(client_env: Stack, tmp_path: Path) -> None:
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(jsonl(
        chat("a", "alpha one", max_tokens=3),                                 # 1
        b"{not json",                                                         # 2
        chat("b", "beta", max_tokens=2),                                      # 3
        chat("a", "again"),                                                   # 4 duplicate custom_id
        chat("c", model="nope"),                                              # 5 unknown model
        {**chat("d"), "url": "/v1/embeddings"},                               # 6 wrong url
        {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions"},  # 7 missing body
        chat("f", "x" * 5000),                                                # 8 oversized line
        {"custom_id": "g", "method": "POST", "url": "/v1/completions",
         "body": {"model": "sim", "prompt": "once upon a time", "max_tokens": 4}},  # 9 not this batch's url
        chat("h", "eta", max_tokens=4),                                       # 10
    ))
    big = len(json.dumps(chat("f", "x" * 5000)))
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    proc = client_env.cli("batch", "submit", str(src), "--tenant", "alpha", "--wait", "--endpoint",
                          "/v1/chat/completions", "--output", str(out), "--errors", str(errs), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    batch = json.loads(proc.stdout)
    bid = batch["id"]
    assert batch["object"] == "batch" and batch["status"] == "completed"
    assert batch["endpoint"] == "/v1/chat/completions"
    assert batch["request_counts"] == {"total": 10, "completed": 3, "failed": 7}
    assert "10 lines, 3 completed, 7 failed" in proc.stderr

    output = read(out)
    assert [(e["id"], e["custom_id"], e["error"]) for e in output] == [
        (entry_id(bid, 1), "a", None), (entry_id(bid, 3), "b", None), (entry_id(bid, 10), "h", None)]
    for e, tokens in zip(output, (3, 2, 4)):
        assert e["response"]["status_code"] == 200
        assert e["response"]["request_id"] == batch_request_id(bid, e["custom_id"])
        assert e["response"]["body"]["object"] == "chat.completion"
        assert e["response"]["body"]["usage"]["completion_tokens"] == tokens
    assert set(output[0]) == {"id", "custom_id", "response", "error"}

    def err(line: int, cid: str, code: str, param: str | None, message: str) -> dict:
        return {"id": entry_id(bid, line), "custom_id": cid, "response": None,
                "error": {"code": code, "message": f"line {line}: {message}", "param": param, "line": line}}

    assert read(errs) == [
        err(2, "", "invalid_json", None,
            "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        err(4, "", "duplicate_custom_id", "custom_id", "custom_id 'a' is already used on line 1"),
        err(5, "c", "model_not_found", "body.model", "unknown model 'nope' (known: minilm, sim, slowsim, smollm2)"),
        err(6, "d", "invalid_url", "url", "url must be /v1/chat/completions in this batch, not '/v1/embeddings'"),
        err(7, "e", "missing_body", "body", "body is required"),
        err(8, "", "line_too_large", None, f"{big} bytes is over the limit of 4096 bytes a line"),
        err(9, "g", "invalid_url", "url", "url must be /v1/chat/completions in this batch, not '/v1/completions'"),
    ]
    # The batch object lists the same refused lines (OpenAI's BatchError shape).
    assert [(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]] == [
        (e["error"]["line"], e["error"]["code"], e["error"]["param"]) for e in read(errs)]
    # The downloaded files are the batch's files; the input is kept as uploaded.
    alpha = "tm-alpha-demo-key"
    assert content(client_env, batch["output_file_id"], alpha).content == out.read_bytes()
    assert content(client_env, batch["error_file_id"], alpha).content == errs.read_bytes()
    assert content(client_env, batch["input_file_id"], alpha).content == src.read_bytes()


def test_client_api_create_retrieve_list_cancel_download(client_env: Stack, tmp_path: Path) -> None:
    with Client(tenant="beta") as beta, Client(tenant="gamma") as gamma:
        created = beta.batches.create(jsonl(*(chat(f"c{i}", max_tokens=2) for i in range(20))),
                                      metadata={"job": "nightly"})
        assert created.status is BatchStatus.validating and created.request_counts.total == 20
        assert created.metadata == {"job": "nightly"} and created.errors is None
        done = beta.batches.wait(created.id, timeout=60)
        assert done.status is BatchStatus.completed
        assert done.request_counts.model_dump() == {"total": 20, "completed": 20, "failed": 0}
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.output_file_id and done.error_file_id
        assert created.id in [b.id for b in beta.batches.list()]
        assert created.id not in [b.id for b in gamma.batches.list()]
        # Another tenant's batch and files answer as unknown ones.
        for call in (gamma.batches.retrieve, gamma.batches.cancel, gamma.batches.download, gamma.batches.results):
            with pytest.raises(NotFound):
                call(created.id)
        assert content(client_env, done.output_file_id, "tm-gamma-demo-key").status_code == 404
        assert beta.batches.cancel(created.id).status is BatchStatus.completed  # ended: unchanged
        out, errs = beta.batches.download(created.id, output=tmp_path / "o.jsonl", errors=tmp_path / "e.jsonl")
        assert [e["custom_id"] for e in read(out)] == [f"c{i}" for i in range(20)] and read(errs) == []
    status = client_env.cli("batch", "status", created.id, "--tenant", "beta", "--json")
    assert json.loads(status.stdout)["status"] == "completed"
    listed = client_env.cli("batch", "list", "--tenant", "beta", "--json")
    assert created.id in [b["id"] for b in json.loads(listed.stdout)]
    other = client_env.cli("batch", "status", created.id, "--tenant", "gamma")
    assert other.returncode == 1 and "No such batch" in other.stderr
    dl = client_env.cli("batch", "download", created.id, "--tenant", "beta", "--output", str(tmp_path / "x.jsonl"),
                        "--errors", str(tmp_path / "x-errors.jsonl"))
    assert dl.returncode == 0 and (tmp_path / "x.jsonl").read_bytes() == out.read_bytes()
    anonymous = client_env.cli("batch", "list")
    assert anonymous.returncode == 1 and "API key" in anonymous.stderr


def test_create_takes_a_path_bytes_or_binary_file(client_env: Stack, tmp_path: Path) -> None:
    src = tmp_path / "lines.jsonl"
    src.write_bytes(jsonl(chat("x", max_tokens=1), chat("y", max_tokens=1)))
    with Client(tenant="alpha") as c:
        with src.open("rb") as fh:
            made = [c.batches.create(src), c.batches.create(src.read_bytes()), c.batches.create(fh)]
        assert [b.request_counts.total for b in made] == [2, 2, 2]
        with src.open() as text, pytest.raises(ValidationError) as exc:
            c.batches.create(text)  # type: ignore[arg-type]
        assert exc.value.field == "file"
        with pytest.raises(ValidationError) as missing:
            c.batches.create(tmp_path / "nope.jsonl")
        assert missing.value.field == "file"
        with pytest.raises(ValidationError) as window:
            c.batches.create(src, completion_window="soon")
        assert window.value.field == "completion_window"
        slow = c.batches.create(slow_lines(8, 50))
        with pytest.raises(ValidationError) as running:  # files exist once a batch ended
            c.batches.download(slow.id)
        assert running.value.field == "batch_id"
        c.batches.cancel(slow.id)
        for b in made:
            assert c.batches.wait(b.id, timeout=60).status is BatchStatus.completed


def test_cancel_mid_run_keeps_partial_results(client_env: Stack) -> None:
    ids = [f"s{i}" for i in range(40)]
    with Client(tenant="beta") as c:
        b = c.batches.create(slow_lines(40, 50))  # ~1 s a line, 4 at a time: ~10 s in all
        wait_for("some lines done", lambda: c.batches.retrieve(b.id).request_counts.completed >= 4)
        cancelling = c.batches.cancel(b.id)
        assert cancelling.status is BatchStatus.cancelling and cancelling.cancelling_at
        started = time.monotonic()
        done = c.batches.wait(b.id, timeout=30)
        assert time.monotonic() - started < 8, "running lines were not stopped"
        output, errors = c.batches.results(b.id)
    assert done.status is BatchStatus.cancelled and done.cancelled_at
    assert 4 <= len(output) < 30
    assert_every_line_once(output, errors, ids)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert done.request_counts.completed == len(output) and done.request_counts.failed == len(errors)


def test_expiry_ends_unfinished_lines_and_keeps_the_rest(client_env: Stack) -> None:
    ids = [f"s{i}" for i in range(40)]
    with Client(tenant="gamma") as c:
        b = c.batches.create(slow_lines(40, 50), completion_window="3s")
        done = c.batches.wait(b.id, timeout=40)
        output, errors = c.batches.results(b.id)
    assert done.status is BatchStatus.expired and done.expired_at
    assert 1 <= len(output) < 40 and all(e["response"]["status_code"] == 200 for e in output)
    assert_every_line_once(output, errors, ids)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


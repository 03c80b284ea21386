"""Batches on the whole local stack (real broker, Redis, scheduler, sim workers, batch
runner): exact output and error files, the client API and CLI, cancel, expiry, and the
stack stopped and restarted mid-batch."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from batch_stack import Stack, wait_for
from tokenmill.producers.batch_parser import entry_id

from tokenmill import Client
from tokenmill.errors import NotFound
from tokenmill.wire import BatchStatus, RequestState, batch_request_id


def chat(cid: str, content: str = "hi", model: str = "sim", **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(*items: object) -> bytes:
    return b"\n".join(i if isinstance(i, bytes) else json.dumps(i).encode() for i in items) + b"\n"


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def slow_lines(n: int, tokens: int, prefix: str = "s") -> bytes:
    return jsonl(*(chat(f"{prefix}{i}", f"line {i}", model="slowsim", max_tokens=tokens) for i in range(n)))


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
         "body": {"model": "sim", "prompt": "once upon a time", "max_tokens": 4}},  # 9
    ))
    big = len(json.dumps(chat("f", "x" * 5000)))
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    proc = client_env.cli("batch", "submit", str(src), "--tenant", "alpha", "--wait",
                          "--output", str(out), "--errors", str(errs), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    batch = json.loads(proc.stdout)
    bid = batch["id"]
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 9, "completed": 3, "failed": 6}
    assert "9 lines, 3 accepted, 6 invalid" in proc.stderr

    output = read(out)
    assert [(e["id"], e["custom_id"], e["error"]) for e in output] == [
        (entry_id(bid, 1), "a", None), (entry_id(bid, 3), "b", None), (entry_id(bid, 9), "g", None)]
    for e, tokens, obj in zip(output, (3, 2, 4), ("chat.completion", "chat.completion", "text_completion")):
        assert e["response"]["status_code"] == 200
        assert e["response"]["request_id"] == batch_request_id(bid, e["custom_id"])
        assert e["response"]["body"]["object"] == obj
        assert e["response"]["body"]["usage"]["completion_tokens"] == tokens
    assert set(output[0]) == {"id", "custom_id", "response", "error"}

    def err(line: int, cid: str | None, code: str, param: str | None, message: str) -> dict:
        return {"id": entry_id(bid, line), "custom_id": cid, "response": None,
                "error": {"code": code, "message": f"line {line}: {message}", "param": param, "line": line}}

    assert read(errs) == [
        err(2, None, "invalid_json", None,
            "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        err(4, None, "duplicate_custom_id", "custom_id", "custom_id 'a' is already used on line 1"),
        err(5, "c", "model_not_found", "body.model", "unknown model 'nope' (known: sim, slowsim, smollm2)"),
        err(6, "d", "invalid_url", "url",
            "url must be /v1/chat/completions or /v1/completions, not '/v1/embeddings'"),
        err(7, "e", "missing_body", "body", "body is required"),
        err(8, None, "line_too_large", None, f"{big} bytes is over the limit of 4096 bytes a line"),
    ]
    # The runner's copies are the same files; the input is kept as submitted.
    assert Path(batch["output_file"]).read_bytes() == out.read_bytes()
    assert Path(batch["input_file"]).read_bytes() == src.read_bytes()


def test_client_api_create_retrieve_list_cancel_download(client_env: Stack, tmp_path: Path) -> None:
    with Client(tenant="beta") as beta, Client(tenant="gamma") as gamma:
        created = beta.batches.create(jsonl(*(chat(f"c{i}", max_tokens=2) for i in range(20))),
                                      metadata={"job": "nightly"})
        assert created.status is BatchStatus.validating and created.request_counts.total == 20
        assert created.metadata == {"job": "nightly"}
        done = beta.batches.wait(created.id, timeout=60)
        assert done.status is BatchStatus.completed
        assert done.request_counts.model_dump(exclude={"schema_version"}) == {"total": 20, "completed": 20, "failed": 0}
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert created.id in [b.id for b in beta.batches.list()]
        assert created.id not in [b.id for b in gamma.batches.list()]
        with pytest.raises(NotFound):
            gamma.batches.retrieve(created.id)
        with pytest.raises(NotFound):
            gamma.batches.cancel(created.id)
        assert beta.batches.cancel(created.id).status is BatchStatus.completed  # ended: unchanged
        out, errs = beta.batches.download(created.id, output=tmp_path / "o.jsonl", errors=tmp_path / "e.jsonl")
        assert [e["custom_id"] for e in read(out)] == [f"c{i}" for i in range(20)] and read(errs) == []
    status = client_env.cli("batch", "status", created.id, "--tenant", "beta", "--json")
    assert json.loads(status.stdout)["status"] == "completed"
    listed = client_env.cli("batch", "list", "--tenant", "beta", "--json")
    assert created.id in [b["id"] for b in json.loads(listed.stdout)]
    other = client_env.cli("batch", "status", created.id, "--tenant", "gamma")
    assert other.returncode == 1 and "not found" in other.stderr
    dl = client_env.cli("batch", "download", created.id, "--tenant", "beta", "--output", str(tmp_path / "x.jsonl"))
    assert dl.returncode == 0 and (tmp_path / "x.jsonl").read_bytes() == out.read_bytes()


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


def test_stack_stopped_and_restarted_mid_batch_completes_every_line_once(client_env: Stack) -> None:
    from tokenmill.config import load_settings
    from tokenmill.ledger import RequestRow, shared_factory, transaction
    from tokenmill.producers.batches import Batches

    ids = [f"r{i}" for i in range(60)]
    batches = Batches(load_settings(), "alpha")  # the ledger API: works while the stack is down
    b = batches.create(slow_lines(60, 60, prefix="r"))  # ~1.2 s a line, 4 at a time: ~18 s
    wait_for("a few lines done", lambda: batches.retrieve(b.id).request_counts.completed >= 8)
    client_env.down()
    stopped = batches.retrieve(b.id)
    assert stopped.status is BatchStatus.in_progress and stopped.request_counts.completed < 60
    client_env.up()
    done = batches.wait(b.id, timeout=90)
    output, errors = batches.results(b.id)
    assert done.status is BatchStatus.completed and errors == []
    assert [e["custom_id"] for e in output] == ids
    assert_every_line_once(output, errors, ids)
    with transaction(shared_factory(load_settings().ledger_url)) as s:
        states = Counter(r.state for r in s.query(RequestRow).filter(RequestRow.batch_id == b.id))
    assert states == Counter({RequestState.FINISHED: 60})

"""The Files and Batches API through the gateway of a real local stack, with the official
``openai`` SDK: every answer parses as the SDK's own types with no field missing, each
tenant sees only its own files and batches, bad input is a 4xx naming the field, and a
batch runs to output and error files reachable by file id; its output can be read
progressively while it runs (HTTP, the client, the CLI), and expires as asked. Also,
without a stack: a batch that cannot be created leaves nothing on disk, and the batch
runner copies no other tenant's result into a batch."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pydantic
import pytest
from batch_stack import Stack, running_stack, stack_config, use_stack, wait_for
from openai.types import Batch, FileDeleted, FileObject
from tokenmill.config.settings import load_settings
from tokenmill.producers import batch_runner
from tokenmill.producers.batch_lease import BatchLeases
from tokenmill.producers.batch_runner import BatchRunner
from tokenmill.producers.batches import Batches, expire_outputs

from tokenmill.errors import LedgerError, ValidationError
from tokenmill.wire import RequestState, Result, ResultStatus, Usage, batch_request_id

#: the stack's upload limit, small so an oversize upload is cheap (and room for a
#: 2,000-line batch)
MAX_BYTES = 512 * 1024
SDK = Callable[[str], openai.OpenAI]
HTTP = Callable[[str | None], httpx.Client]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = stack_config()
    assert "[batch]\n" in config
    config = config.replace("[batch]\n", f"[batch]\nmax_bytes = {MAX_BYTES}\n", 1)
    with running_stack(tmp_path_factory.mktemp("files-batches-stack"), config) as s:
        yield s


def chat(cid: str, content: str = "hi", model: str = "sim", **body: object) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def deep(cid: str, depth: int = 500) -> dict[str, Any]:
    """A line whose body nests ``depth`` levels deep (the validator allows 32)."""
    line = chat(cid)
    line["body"]["metadata"] = json.loads("[" * depth + "]" * depth)
    return line


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def complete(obj: pydantic.BaseModel) -> None:
    """Every field of the SDK's type was in the answer (None counts, absence does not)."""
    missing = set(type(obj).model_fields) - obj.model_fields_set
    assert not missing, f"{type(obj).__name__} lacks {sorted(missing)}"


def strict(model: type[pydantic.BaseModel], data: dict[str, Any]) -> pydantic.BaseModel:
    """The raw JSON validated as the SDK's type, complete."""
    obj = model.model_validate(data)
    complete(obj)
    return obj


def upload(client: openai.OpenAI, data: bytes, name: str = "in.jsonl") -> FileObject:
    f = client.files.create(file=(name, data), purpose="batch")
    complete(f)
    return f


def wait_status(client: openai.OpenAI, batch_id: str, done: set[str], timeout: float = 60.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in done:
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} still {b.status} after {timeout}s"
        time.sleep(0.2)


def error_of(exc: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    body = cast(dict[str, Any], exc.value.body)
    assert set(body) == {"message", "type", "param", "code"}, body  # the SDK unwraps "error"
    return body


def rows(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in content.splitlines() if x.strip()]


# -- files -----------------------------------------------------------------------------------


def test_files_create_retrieve_list_content_delete(sdk: SDK, http: HTTP, stack: Stack) -> None:
    alpha = sdk("alpha")
    datas = [jsonl(chat(f"f{i}")) for i in range(3)]
    made = [upload(alpha, d, f"part{i}.jsonl") for i, d in enumerate(datas)]
    assert all(f.purpose == "batch" and f.status == "uploaded" and f.object == "file" for f in made)
    assert [f.bytes for f in made] == [len(d) for d in datas]
    assert [f.filename for f in made] == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]
    assert all(f.id.startswith("file-") for f in made) and len({f.id for f in made}) == 3

    got = alpha.files.retrieve(made[0].id)
    complete(got)
    assert got == made[0]
    assert alpha.files.content(made[1].id).content == datas[1]

    ids = {f.id for f in made}
    listed = alpha.files.list(purpose="batch", limit=1)  # the SDK pages on with `after`
    assert ids <= {f.id for f in listed}
    page = alpha.files.list(limit=2, order="asc", after=made[0].id)
    assert [x.id for x in page.data] == [made[1].id, made[2].id] and page.has_more is False
    raw = http("alpha").get("/v1/files", params={"limit": 1, "order": "desc", "after": made[2].id}).json()
    assert set(raw) == {"object", "data", "first_id", "last_id", "has_more"} and raw["object"] == "list"
    assert [x["id"] for x in raw["data"]] == [made[1].id] and raw["has_more"] is True
    assert raw["first_id"] == raw["last_id"] == made[1].id
    strict(FileObject, raw["data"][0])
    assert http("alpha").get("/v1/files", params={"purpose": "fine-tune"}).json()["data"] == []

    gone = alpha.files.delete(made[2].id)
    complete(gone)
    assert isinstance(gone, FileDeleted) and gone.deleted and gone.id == made[2].id
    with pytest.raises(openai.NotFoundError) as exc:
        alpha.files.retrieve(made[2].id)
    assert error_of(exc)["param"] == "file_id"
    assert made[2].id not in {f.id for f in alpha.files.list()}
    stored = {p.name for p in (stack.home / "files").iterdir()}
    assert {made[0].id, made[1].id} <= stored and made[2].id not in stored
    assert not [n for n in stored if n.startswith(".")], "no partial uploads left behind"


def test_upload_refusals(sdk: SDK, http: HTTP, stack: Stack) -> None:
    alpha = sdk("alpha")
    before = sorted(p.name for p in (stack.home / "files").iterdir())

    with pytest.raises(openai.BadRequestError) as bad:
        alpha.files.create(file=("x.jsonl", jsonl(chat("a"))), purpose="fine-tune")
    assert error_of(bad)["param"] == "purpose"

    for size in (MAX_BYTES + 1, MAX_BYTES + (2 << 20)):  # refused while reading; by Content-Length
        with pytest.raises(openai.APIStatusError) as big:
            alpha.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
        assert big.value.status_code == 413 and error_of(big)["param"] == "file"
    # streamed without a Content-Length: refused while reading, all the same
    def chunks() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n\r\n'
        for _ in range(MAX_BYTES // 1024 + 2):
            yield b"y" * 1024
        yield b"\r\n--b--\r\n"
    streamed = http("alpha").post("/v1/files", content=chunks(),
                                  headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and streamed.json()["error"]["param"] == "file"

    no_file = http("alpha").post("/v1/files", data={"purpose": "batch"}, files={"other": ("o", b"1")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    no_purpose = http("alpha").post("/v1/files", files={"file": ("f.jsonl", b"{}")})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    not_multipart = http("alpha").post("/v1/files", json={"purpose": "batch"})
    assert not_multipart.status_code == 400 and set(not_multipart.json()["error"]) == {
        "message", "type", "param", "code"}
    assert http(None).post("/v1/files", files={"file": ("f", b"{}")}, data={"purpose": "batch"}).status_code == 401

    assert sorted(p.name for p in (stack.home / "files").iterdir()) == before, "a refused upload left a file"
    at_limit = upload(alpha, b"z" * MAX_BYTES)
    assert at_limit.bytes == MAX_BYTES


# -- batches ---------------------------------------------------------------------------------


def test_batch_runs_to_completed_with_output_and_error_files(sdk: SDK, http: HTTP) -> None:
    alpha = sdk("alpha")
    lines = [chat(f"c{i}", f"line {i}", max_tokens=3) for i in range(6)]
    data = jsonl(*lines[:3], deep("too-deep"), *lines[3:])  # the deep one is line 4
    f = upload(alpha, data)
    created = alpha.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"job": "nightly"})
    complete(created)
    assert created.object == "batch" and created.input_file_id == f.id
    assert created.status in ("validating", "in_progress") and created.metadata == {"job": "nightly"}
    assert created.request_counts is not None and created.request_counts.total == 7
    assert created.errors is not None and created.errors.object == "list"
    [err] = created.errors.data or []
    assert (err.line, err.code, err.param) == (4, "invalid_body", "body.metadata")
    assert created.output_file_id is None and created.error_file_id is None

    done = wait_status(alpha, created.id, {"completed", "failed", "expired", "cancelled"})
    assert done.status == "completed"
    complete(done)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at
    assert done.model == "sim"
    assert done.usage is not None and done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    raw = http("alpha").get(f"/v1/batches/{done.id}").json()
    strict(Batch, raw)
    assert all(isinstance(raw[k], int) for k in ("created_at", "expires_at", "completed_at"))
    for key, model in (("usage", openai.types.BatchUsage), ("request_counts", openai.types.BatchRequestCounts)):
        strict(model, raw[key])
    assert raw["errors"]["object"] == "list"
    strict(openai.types.BatchError, raw["errors"]["data"][0])

    assert done.output_file_id and done.error_file_id
    out = rows(alpha.files.content(done.output_file_id).content)
    assert [r["custom_id"] for r in out] == [f"c{i}" for i in range(6)]
    for r in out:
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["object"] == "chat.completion" and r["id"].startswith("batch_req_")
    errs = rows(alpha.files.content(done.error_file_id).content)
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errs] == [
        ("too-deep", "invalid_body", 4)]
    output_file = alpha.files.retrieve(done.output_file_id)
    complete(output_file)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    assert {done.output_file_id, done.error_file_id} <= {x.id for x in alpha.files.list(purpose="batch_output")}
    assert alpha.batches.retrieve(done.id).output_file_id == done.output_file_id  # the same id every time

    listed = alpha.batches.list(limit=1)  # pages on with `after`
    assert done.id in [b.id for b in listed]
    page = http("alpha").get("/v1/batches", params={"limit": 1}).json()
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"} and page["object"] == "list"
    assert page["first_id"] == page["last_id"] == page["data"][0]["id"]
    strict(Batch, page["data"][0])
    after = http("alpha").get("/v1/batches", params={"after": page["last_id"], "limit": 100}).json()
    assert page["last_id"] not in [x["id"] for x in after["data"]] and after["has_more"] is False


def test_batch_of_only_a_deep_line_fails_with_its_error_row(sdk: SDK) -> None:
    alpha = sdk("alpha")
    f = upload(alpha, jsonl(deep("only")))
    b = alpha.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    complete(b)
    assert b.status == "failed" and b.failed_at and b.errors and b.errors.data
    assert [(e.line, e.param) for e in b.errors.data] == [(1, "body.metadata")]
    assert b.output_file_id and b.error_file_id
    assert alpha.files.content(b.output_file_id).content == b""
    [row] = rows(alpha.files.content(b.error_file_id).content)
    assert row["custom_id"] == "only" and row["error"]["param"] == "body.metadata"


def test_batch_cancel(sdk: SDK) -> None:
    beta = sdk("beta")
    f = upload(beta, jsonl(*(chat(f"s{i}", model="slowsim", max_tokens=50) for i in range(20))))
    b = beta.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = beta.batches.cancel(b.id)
    complete(cancelling)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_status(beta, b.id, {"cancelled"}, timeout=60)
    assert done.cancelled_at and done.error_file_id and done.output_file_id
    assert done.request_counts is not None
    out, errs = (rows(beta.files.content(x).content) for x in (done.output_file_id, done.error_file_id))
    assert sorted(r["custom_id"] for r in out + errs) == sorted(f"s{i}" for i in range(20))
    assert errs and {e["error"]["code"] for e in errs} == {"batch_cancelled"}
    assert beta.batches.cancel(b.id).status == "cancelled"  # ended: answered as it is


def test_batch_create_refusals(sdk: SDK, http: HTTP, stack: Stack) -> None:
    alpha = sdk("alpha")
    f = upload(alpha, jsonl(chat("a")))
    good: dict[str, Any] = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"input_file_id": "file-" + "0" * 32}, 404, "input_file_id"),
        ({"endpoint": "/v1/score"}, 400, "endpoint"),
        ({"completion_window": "forever"}, 400, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, 400, "output_expires_after"),
    ]
    for change, status, param in cases:
        with pytest.raises(openai.APIStatusError) as exc:
            alpha.batches.create(**{**good, **change})
        assert exc.value.status_code == status, change
        assert error_of(exc)["param"] == param, change
    for missing in ("input_file_id", "completion_window"):
        resp = http("alpha").post("/v1/batches", json={k: v for k, v in good.items() if k != missing})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == missing
    empty = upload(alpha, b"\n\n")
    with pytest.raises(openai.BadRequestError) as exc:
        alpha.batches.create(**{**good, "input_file_id": empty.id})
    assert error_of(exc)["param"] == "input_file_id"
    kept = alpha.batches.create(**good, output_expires_after={"anchor": "created_at", "seconds": 3600})
    assert kept.status == "validating"
    known = {b.id for tenant in ("alpha", "beta", "gamma") for b in sdk(tenant).batches.list()}
    assert {p.name for p in (stack.home / "batches").iterdir()} == known, "a refused batch left a directory"


def test_tenant_isolation(sdk: SDK, http: HTTP) -> None:
    alpha, beta = sdk("alpha"), sdk("beta")
    f = upload(alpha, jsonl(chat("mine", max_tokens=2)))
    b = alpha.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_status(alpha, b.id, {"completed"})
    assert done.output_file_id and done.error_file_id
    unknown_file, unknown_batch = "file-" + "f" * 32, "batch_" + "f" * 32

    def refused(call: Callable[[], object]) -> dict[str, Any]:
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        return error_of(exc)

    for file_id in (f.id, done.output_file_id, done.error_file_id):
        for call in (beta.files.retrieve, beta.files.content, beta.files.delete):
            assert refused(functools.partial(call, file_id))["param"] == "file_id"
    # another tenant's id answers exactly as an unknown one does
    calls: list[tuple[Callable[[str], object], str, str]] = [
        *((call, f.id, unknown_file) for call in (beta.files.retrieve, beta.files.content, beta.files.delete)),
        *((call, b.id, unknown_batch) for call in (beta.batches.retrieve, beta.batches.cancel)),
    ]
    for call, theirs, nobodys in calls:
        answer = json.dumps(refused(functools.partial(call, theirs))).replace(theirs, "ID")
        assert answer == json.dumps(refused(functools.partial(call, nobodys))).replace(nobodys, "ID")
    theirs_out, nobodys_out = (http("beta").get(f"/v1/batches/{x}/output") for x in (b.id, unknown_batch))
    assert theirs_out.status_code == nobodys_out.status_code == 404
    assert theirs_out.text.replace(b.id, "ID") == nobodys_out.text.replace(unknown_batch, "ID")
    assert http("alpha").get(f"/v1/batches/{b.id}/output").status_code == 200
    with pytest.raises(openai.NotFoundError) as exc:
        beta.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert error_of(exc)["param"] == "input_file_id"
    for kind in ("files", "batches"):
        seen = http("beta").get(f"/v1/{kind}", params={"limit": 100}).text
        for alphas in (f.id, b.id, done.output_file_id, done.error_file_id):
            assert alphas not in seen
    assert alpha.files.retrieve(f.id).id == f.id  # beta's delete did nothing
    assert alpha.batches.retrieve(b.id).status == "completed"


# -- progressive output and expiry ---------------------------------------------------------


def test_progressive_output_while_a_batch_runs(sdk: SDK, http: HTTP, stack: Stack, gateway: str,
                                               tmp_path: Path) -> None:
    """A 2,000-line batch: 1,988 lines on the zero-cost `sim`, 10 on `slowsim` (4 at a
    time, 20 ms a token, staggered lengths: the batch runs a few seconds), 2 invalid.
    Read from cursor 0 three times while it runs, each read is a prefix of the next and
    of the final one; reads resumed from each cursor (the client) add up to the same;
    the CLI, run mid-batch and then again with --after, writes exactly the two files'
    rows; no line twice."""
    from tokenmill import Client

    alpha, api = sdk("alpha"), http("alpha")
    slow_at = {100 + 180 * k: 15 * (k + 1) for k in range(10)}  # line index -> max_tokens
    lines = [chat(f"p{i}", model="slowsim", max_tokens=slow_at[i]) if i in slow_at
             else chat(f"p{i}", max_tokens=1) for i in range(1998)]  # fmt: skip
    data = jsonl(*lines[:500], deep("bad-1"), *lines[500:], deep("bad-2"))  # lines 501 and 2000
    f = upload(alpha, data)
    b = alpha.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.request_counts is not None and b.request_counts.total == 2000

    def read(after: int = 0) -> tuple[list[bytes], httpx.Response]:
        # a fresh connection each read: a kept-alive one idle past the server's keep-alive
        # timeout (the waits below) may be closed just as a request goes out on it
        resp = httpx.get(f"{gateway}/v1/batches/{b.id}/output", params={"after": after, "limit": 10_000},
                         headers={"Authorization": api.headers["Authorization"]}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/jsonl")
        got = resp.content.splitlines(keepends=True)
        h = resp.headers
        assert int(h["x-tokenmill-next-after"]) == after + len(got) and h["x-tokenmill-has-more"] == "false"
        outputs = [x for x in got if json.loads(x)["error"] is None]
        assert (int(h["x-tokenmill-output-rows"]), int(h["x-tokenmill-error-rows"])) == (
            len(outputs), len(got) - len(outputs))
        return got, resp

    reads: list[list[bytes]] = []
    resumed: list[tuple[str, bytes]] = []
    cursor = 0
    cli_out, cli_err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    cli_after: int | None = None
    with Client(api_key="tm-alpha-demo-key", base_url=gateway) as client:

        def grown() -> bool:
            nonlocal cursor
            got, resp = read()
            assert resp.headers["x-tokenmill-batch-ended"] == "false", "ended before three reads saw it grow"
            page = client.batches.partial(b.id, after=cursor)  # resumed where the last read stopped
            resumed.extend(page.lines)
            cursor = page.next_after
            if len(got) > (len(reads[-1]) if reads else 2):  # past the two invalid lines
                reads.append(got)
                return True
            return False

        for n in range(3):
            wait_for(f"read {n + 1} to grow", grown, timeout=30, every=0.02)
        cli = stack.cli("batch", "download", b.id, "--tenant", "alpha", "--partial", "--output", str(cli_out),
                        "--errors", str(cli_err), "--json")  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        cli_after = json.loads(cli.stdout)["after"]

        done = wait_status(alpha, b.id, {"completed", "failed", "expired", "cancelled"}, timeout=60)
        assert done.status == "completed"
        final, resp = read()
        assert resp.headers["x-tokenmill-batch-ended"] == "true"
        assert resp.headers["x-tokenmill-batch-status"] == "completed"
        while True:  # pages of the gateway's default limit (1,000 rows)
            page = client.batches.partial(b.id, after=cursor)
            resumed.extend(page.lines)
            cursor = page.next_after
            if not page.has_more:
                break
        assert page.ended and cursor == len(final)
        first = client.batches.partial(b.id, limit=600)
        assert [x for _, x in first.lines] == final[:600] and first.has_more and first.next_after == 600

    for earlier, later in zip(reads, [*reads[1:], final]):
        assert later[: len(earlier)] == earlier, "every read is a prefix of the next"
    assert [x for _, x in resumed] == final, "reads resumed from their cursors add up to the whole"
    assert all(kind == ("output" if json.loads(x)["error"] is None else "error") for kind, x in resumed)
    assert [json.loads(x)["error"]["line"] for x in final[:2]] == [501, 2000], "the invalid lines first"
    assert len({json.loads(x)["custom_id"] for x in final[2:]}) == len(final) - 2 == 1998, "no line twice"

    assert done.output_file_id and done.error_file_id
    output = alpha.files.content(done.output_file_id).content.splitlines(keepends=True)
    errors = alpha.files.content(done.error_file_id).content.splitlines(keepends=True)
    assert sorted(x for x in final if json.loads(x)["error"] is None) == sorted(output)
    assert sorted(x for x in final if json.loads(x)["error"] is not None) == sorted(errors)
    assert len(final) == len(output) + len(errors) == 2000
    assert [json.loads(x)["custom_id"] for x in output][:3] == ["p0", "p1", "p2"], "the files: input order"

    again = stack.cli("batch", "download", b.id, "--tenant", "alpha", "--partial", "--after", str(cli_after),
                      "--output", str(cli_out), "--errors", str(cli_err), "--json")  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads(again.stdout)
    assert summary["ended"] is True and summary["after"] == 2000 and summary["status"] == "completed"
    assert sorted(cli_out.read_bytes().splitlines(keepends=True)) == sorted(output)
    assert sorted(cli_err.read_bytes().splitlines(keepends=True)) == sorted(errors)


def test_expired_output_is_removed_and_says_so(sdk: SDK, http: HTTP, stack: Stack,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Output files expire ``output_expires_after`` after they were made: the batch
    object and the file objects show when; once passed (here: set back in the ledger),
    the cleanup removes them, reading them answers 404 ``file_expired``, the batch shows
    ``output_expired_at`` — and another tenant's batches are untouched."""
    from sqlalchemy import update
    from tokenmill.ledger import shared_factory, transaction
    from tokenmill.ledger.models import BatchRow, FileRow

    expiry = {"anchor": "created_at", "seconds": 3600}
    made = []
    for tenant, expires in (("alpha", expiry), ("beta", expiry), ("beta", None)):
        client = sdk(tenant)
        f = upload(client, jsonl(chat("e0", max_tokens=2), chat("e1", max_tokens=2), deep("e2")))
        extra = {} if expires is None else {"output_expires_after": expires}
        made.append((client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h", **extra)))  # fmt: skip
    done = [wait_status(c, b.id, {"completed"}) for c, b in made]
    mine, theirs, never = done
    raw = http("alpha").get(f"/v1/batches/{mine.id}").json()
    strict(Batch, raw)
    assert raw["output_expires_after"] == expiry and raw["output_expired_at"] is None
    assert raw["output_expires_at"] == raw["completed_at"] + 3600, "counted from the files' creation"
    alpha = made[0][0]
    assert mine.output_file_id and mine.error_file_id
    assert alpha.files.retrieve(mine.output_file_id).expires_at == raw["output_expires_at"]
    assert http("beta").get(f"/v1/batches/{never.id}").json()["output_expires_at"] is None

    use_stack(stack, monkeypatch)
    settings = load_settings()
    past = time.time() - 1
    with transaction(shared_factory(settings.ledger_url)) as s:  # an hour and more has passed
        s.execute(update(BatchRow).where(BatchRow.id == mine.id).values(output_expires_at=utc_dt(past)))
        s.execute(update(FileRow).where(FileRow.id.in_([mine.output_file_id, mine.error_file_id]))
                  .values(expires_at=utc_dt(past)))  # fmt: skip
    assert alpha.batches.retrieve(mine.id).status == "completed"
    for file_id in (mine.output_file_id, mine.error_file_id):  # expired, though not yet removed
        with pytest.raises(openai.NotFoundError) as exc:
            alpha.files.content(file_id)
        assert error_of(exc)["code"] == "file_expired" and "expired at" in error_of(exc)["message"]
    # (the stack's runner looks every minute too: it may have been first)
    assert expire_outputs(settings) in ([mine.id], [])
    assert expire_outputs(settings) == [], "once"
    folder = stack.home / "batches" / mine.id
    assert not {"output.jsonl", "errors.jsonl", "results.jsonl"} & {p.name for p in folder.iterdir()}
    raw = http("alpha").get(f"/v1/batches/{mine.id}").json()
    strict(Batch, raw)
    assert raw["output_expired_at"] is not None and raw["output_file_id"] == mine.output_file_id
    for call in (alpha.files.retrieve, alpha.files.content):
        with pytest.raises(openai.NotFoundError) as exc:
            call(mine.output_file_id)
        assert error_of(exc)["code"] == "file_expired" and error_of(exc)["param"] == "file_id"
    assert mine.output_file_id not in {x.id for x in alpha.files.list(purpose="batch_output")}
    gone = http("alpha").get(f"/v1/batches/{mine.id}/output")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "batch_output_expired"

    beta = made[1][0]
    for b in (theirs, never):
        assert b.output_file_id and b.error_file_id
        assert len(rows(beta.files.content(b.output_file_id).content)) == 2
        assert len(rows(beta.files.content(b.error_file_id).content)) == 1
        assert http("beta").get(f"/v1/batches/{b.id}").json()["output_expired_at"] is None
        assert len(rows(http("beta").get(f"/v1/batches/{b.id}/output").content)) == 3


def utc_dt(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


# -- without a stack -----------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in [k for k in os.environ if k.startswith("TOKENMILL_")]:
        monkeypatch.delenv(key)
    return load_settings(home=tmp_path)


def test_create_writes_nothing_when_it_raises(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(settings, "alpha")
    root = settings.home.resolve() / "batches"
    with pytest.raises(ValidationError):
        batches.create(b"\n \n")

    def down(*_: object, **__: object) -> None:
        raise LedgerError("the ledger is down")

    monkeypatch.setattr(Batches, "_record", down)
    with pytest.raises(LedgerError):
        batches.create(jsonl(chat("a"), deep("b")))
    assert not root.exists() or not any(root.iterdir())
    monkeypatch.undo()
    made = Batches(settings, "alpha").create(jsonl(deep("b")))
    assert made.status.value == "failed" and [p.name for p in root.iterdir()] == [made.id]


async def test_batch_runner_copies_no_other_tenants_result(
    settings: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenmill.ledger import get_request, shared_factory, transaction
    from tokenmill.workers import keys

    from tokenmill.redis_client import async_redis

    batch = Batches(settings, "alpha").create(jsonl(chat("own"), chat("forged")))
    own, forged = (batch_request_id(batch.id, c) for c in ("own", "forged"))

    def result(rid: str, tenant: str) -> Result:
        return Result(request_id=rid, tenant=tenant, model="sim", status=ResultStatus.succeeded,
                      body={"object": "chat.completion", "choices": []},
                      usage=Usage(prompt_tokens=5, completion_tokens=7))

    warned: list[dict[str, Any]] = []

    class Log:
        def warning(self, _: str, **kw: Any) -> None:
            warned.append(kw)

        def info(self, *_: Any, **__: Any) -> None:
            pass

    monkeypatch.setattr(batch_runner, "log", Log())
    runner = BatchRunner(settings, cast(Any, None))
    runner.factory = shared_factory(settings.ledger_url)
    runner.redis = async_redis(redis_url)
    try:
        await runner.redis.set(keys.result(own), result(own, "alpha").to_bytes())
        await runner.redis.set(keys.result(forged), result(forged, "beta").to_bytes())
        runner.leases = BatchLeases(runner.redis, ttl_s=30.0)
        assert await runner.leases.acquire(batch.id) is not None
        tracker = await runner._load(batch)
        assert tracker is not None
        for _ in range(2):
            await runner._collect(tracker, batch.id, None)
    finally:
        await runner.leases.release_all()
        await runner.redis.delete(keys.result(own), keys.result(forged))
        await runner.redis.aclose()
    assert tracker.done == {own: "succeeded"} and tracker.pending() == [forged]
    assert [w["request_id"] for w in warned] == [forged], "one warning per foreign result"
    assert [json.loads(x)["request_id"] for x in tracker.dir.results.read_text().splitlines()] == [own]
    with transaction(runner.factory) as session:
        mine, theirs = get_request(session, "alpha", own), get_request(session, "alpha", forged)
        assert mine.state is RequestState.FINISHED and mine.prompt_tokens == 5
        assert theirs.state is RequestState.QUEUED and theirs.prompt_tokens is None

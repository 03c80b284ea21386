"""The batch's files: entries in OpenAI's shape, and the runner's recovery from its
results file (a torn last line, a line recorded twice) — each line lands once."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tokenmill.producers.batch_files import (
    CANCELLED,
    EXPIRED,
    BatchDir,
    append_lines,
    dumps,
    outcome_entry,
    request_line,
    write_atomic,
)
from tokenmill.producers.batch_parser import LineError, LineErrorCode, entry_id
from tokenmill.producers.batch_runner import Tracker, assemble

from tokenmill.wire import (
    Batch,
    BatchStatus,
    Endpoint,
    ErrorInfo,
    InferenceRequest,
    Result,
    ResultStatus,
    Usage,
    batch_request_id,
)

BID = "batch_files_test"


def result(cid: str, status: ResultStatus, **kw: object) -> Result:
    return Result(request_id=batch_request_id(BID, cid), tenant="alpha", model="sim", status=status, **kw)


def test_outcome_entries_follow_openai_shapes() -> None:
    ok = result("a", ResultStatus.succeeded, body={"object": "chat.completion"},
                usage=Usage(prompt_tokens=1, completion_tokens=2))
    assert outcome_entry(BID, 3, "a", ok) == ("succeeded", {
        "id": entry_id(BID, 3), "custom_id": "a", "error": None,
        "response": {"status_code": 200, "request_id": f"{BID}:a", "body": {"object": "chat.completion"}},
    })
    failed = result("b", ResultStatus.failed, error=ErrorInfo(code="engine_error", message="boom"))
    status, entry = outcome_entry(BID, 4, "b", failed, ended_as=CANCELLED)  # failed stays failed
    assert status == "failed" and entry["error"] == {"code": "engine_error", "message": "boom"}
    # vLLM's run_batch shape: the reason in error, no body
    assert entry["response"] == {"status_code": 500, "request_id": f"{BID}:b", "body": None}
    assert outcome_entry(BID, 5, "c", result("c", ResultStatus.cancelled))[1]["error"]["code"] == "batch_cancelled"
    assert outcome_entry(BID, 5, "c", result("c", ResultStatus.cancelled), ended_as=EXPIRED)[0] == "expired"
    assert outcome_entry(BID, 6, "d", result("d", ResultStatus.expired))[1]["error"]["code"] == "batch_expired"
    assert outcome_entry(BID, 7, "e", None, ended_as=EXPIRED)[1]["response"] is None


def test_recovery_from_a_torn_and_repeated_results_file(tmp_path: Path) -> None:
    d = BatchDir.of(tmp_path, BID)
    reqs = [InferenceRequest(id=batch_request_id(BID, c), tenant="alpha", model="sim", max_tokens=1,
                             prompt_tokens_estimate=1, body={"prompt": "x"}, endpoint=Endpoint.completions,
                             batch_id=BID, custom_id=c) for c in ("a", "b", "c")]
    write_atomic(d.requests, (request_line(i + 2, r) for i, r in enumerate(reqs)))
    write_atomic(d.invalid, [dumps(LineError(1, LineErrorCode.invalid_json, "bad").entry(BID))])

    def rec(cid: str, line: int, status: str = "succeeded") -> dict:
        st, entry = outcome_entry(BID, line, cid, result(cid, ResultStatus(status)) if status != "expired" else None,
                                  ended_as=EXPIRED)
        return {"line": line, "custom_id": cid, "request_id": batch_request_id(BID, cid), "status": st, "entry": entry}

    append_lines(d.results, [rec("b", 3), rec("a", 2), rec("b", 3)])  # b recorded twice
    with d.results.open("ab") as fh:
        fh.write(b'{"line": 4, "custom_id": "c", "requ')  # a crash mid-append
    batch = Batch(id=BID, tenant="alpha", endpoint=Endpoint.completions, status=BatchStatus.in_progress,
                  input_file="-", created_at=time.time(), expires_at=time.time() + 60)
    t = Tracker.load(batch, d)
    assert t.pending() == [batch_request_id(BID, "c")]
    assert t.counts().model_dump(exclude={"schema_version"}) == {"total": 4, "completed": 2, "failed": 1}
    append_lines(d.results, [rec("c", 4, "expired")])  # after the torn line, on a line of its own
    t = Tracker.load(batch, d)
    assert t.pending() == []
    output, errors = assemble(t)
    assert [e["custom_id"] for e in output] == ["a", "b"]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("", "invalid_json"), ("c", "batch_expired")]
    assert all(json.dumps(e) for e in output + errors)


def test_lines_recorded_in_the_file_only_reach_the_ledger_with_their_usage(tmp_path: Path) -> None:
    """A runner killed between the results file's append and the ledger's commit: the
    next one settles those lines with the usage and finish the file recorded, so the
    ledger (and the reconciler reading it) has the counts the output file shows."""
    from tokenmill.producers.batch_runner import _recovered_outcomes

    from tokenmill.wire import RequestState

    d = BatchDir.of(tmp_path, BID)
    d.root.mkdir(parents=True)
    done = result("a", ResultStatus.succeeded, body={"usage": {"prompt_tokens": 7, "completion_tokens": 11}},
                  usage=Usage(prompt_tokens=7, completion_tokens=11), finished_at=1_800_000_000.5)
    failed = result("b", ResultStatus.failed, error=ErrorInfo(code="engine_error", message="boom"))
    recs = []
    for line, cid, res in ((2, "a", done), (3, "b", failed)):
        st, entry = outcome_entry(BID, line, cid, res)
        recs.append({"line": line, "custom_id": cid, "request_id": res.request_id, "status": st,
                     "entry": entry, "finished_at": res.finished_at})
    append_lines(d.results, recs)
    found = {o.request_id: o for o in _recovered_outcomes(d, {done.request_id, failed.request_id, "other"})}
    a, b = found[done.request_id], found[failed.request_id]
    assert (a.state, a.prompt_tokens, a.completion_tokens) == (RequestState.FINISHED, 7, 11)
    assert a.at is not None and a.at.timestamp() == 1_800_000_000.5
    assert (b.state, b.prompt_tokens, b.completion_tokens) == (RequestState.FAILED, None, None)
    assert set(found) == {done.request_id, failed.request_id}

"""Progressive output (:mod:`tokenmill.producers.batch_partial`): the rows a running
batch has recorded so far, read from a cursor — invalid lines first, then outcomes in
completion order, each line once, a torn last line left out — a prefix of every later
read, and, once the batch's files are written, exactly their rows. The files are built
with the runner's own helpers (``results.jsonl`` records as ``_record`` appends them,
the final files as ``_end`` writes them)."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.producers.batch_files import (
    EXPIRED,
    BatchDir,
    append_lines,
    dumps,
    outcome_entry,
    repair_tail,
    request_line,
    write_atomic,
)
from tokenmill.producers.batch_parser import LineError, LineErrorCode
from tokenmill.producers.batch_partial import PartialRow, kind_of, partial_rows
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

BID = "batch_partial_test"
#: lines 1 and 5 are invalid; the others are accepted, custom_id "c<line>"
INVALID = (1, 5)
ACCEPTED = (2, 3, 4, 6, 7, 8)


def make_batch(root: Path) -> BatchDir:
    """A batch's files as ``Batches.create`` leaves them: requests and invalid lines."""
    d = BatchDir.of(root, BID)
    reqs = [
        (line, InferenceRequest(
            id=batch_request_id(BID, f"c{line}"), tenant="alpha", model="sim", max_tokens=1,
            prompt_tokens_estimate=1, body={"prompt": "x"}, endpoint=Endpoint.completions,
            batch_id=BID, custom_id=f"c{line}"))
        for line in ACCEPTED
    ]  # fmt: skip
    write_atomic(d.requests, (request_line(line, r) for line, r in reqs))
    write_atomic(d.invalid, (dumps(LineError(line, LineErrorCode.invalid_json, "bad é").entry(BID))
                             for line in INVALID))  # fmt: skip
    return d


def record(line: int, status: str = "succeeded") -> dict:
    """A ``results.jsonl`` record of line ``line`` as the runner appends it."""
    cid = f"c{line}"
    rid = batch_request_id(BID, cid)
    res: Result | None = None
    if status == "succeeded":
        res = Result(request_id=rid, tenant="alpha", model="sim", status=ResultStatus.succeeded,
                     body={"object": "text_completion", "choices": [{"text": f"ünï {line}", "logprob": -0.1}]},
                     usage=Usage(prompt_tokens=1, completion_tokens=1), finished_at=1.5)  # fmt: skip
    elif status == "failed":
        res = Result(request_id=rid, tenant="alpha", model="sim", status=ResultStatus.failed,
                     error=ErrorInfo(code="engine_error", message="boom"))
    st_, entry = outcome_entry(BID, line, cid, res, ended_as=EXPIRED if status == "expired" else None)
    return {"line": line, "custom_id": cid, "request_id": rid, "status": st_, "entry": entry,
            "finished_at": None if res is None else res.finished_at, "lease": 1, "by": "test"}


def finish(d: BatchDir) -> tuple[list[bytes], list[bytes]]:
    """The final files as the runner's ``_end`` writes them; their rows."""
    batch = Batch(id=BID, tenant="alpha", endpoint=Endpoint.completions, status=BatchStatus.in_progress,
                  input_file="-", created_at=time.time(), expires_at=time.time() + 60)
    t = Tracker.load(batch, d)
    assert t.pending() == [], "every line recorded"
    output, errors = assemble(t)
    write_atomic(d.output, (dumps(e) for e in output))
    write_atomic(d.errors, (dumps(e) for e in errors))
    return d.output.read_bytes().splitlines(keepends=True), d.errors.read_bytes().splitlines(keepends=True)


def read_all(d: BatchDir) -> list[PartialRow]:
    rows, after = partial_rows(d, 0)
    assert after == len(rows)
    return rows


def customs(rows: list[PartialRow]) -> list[str | None]:
    """Each row's custom_id; None for an invalid line's (which has none of its own)."""
    return [r.row["custom_id"] or None for r in rows]


def test_invalid_lines_first_then_completion_order_equal_to_the_final_files(tmp_path: Path) -> None:
    d = make_batch(tmp_path)
    assert customs(read_all(d)) == [None, None]  # before any result: the invalid lines
    assert [r.row["error"]["line"] for r in read_all(d)] == [1, 5]
    append_lines(d.results, [record(4), record(2, "failed")])
    append_lines(d.results, [record(8, "expired"), record(3), record(7), record(6, "cancelled")])
    rows = read_all(d)
    assert customs(rows) == [None, None, "c4", "c2", "c8", "c3", "c7", "c6"]
    assert [r.kind for r in rows] == ["error", "error", "output", "error", "error", "output", "output", "error"]
    assert all(r.kind == kind_of(r.row) for r in rows), "a row tells its file by its error field"

    output, errors = finish(d)
    assert sorted(r.data for r in rows if r.kind == "output") == sorted(output)
    assert sorted(r.data for r in rows if r.kind == "error") == sorted(errors)
    assert len(rows) == len(output) + len(errors) == len(INVALID) + len(ACCEPTED)
    assert read_all(d) == rows, "the final files change nothing"
    assert "ünï" in output[0].decode() and b"\\u" not in output[0], "the files' own bytes"


def test_a_line_being_written_or_torn_is_left_out(tmp_path: Path) -> None:
    d = make_batch(tmp_path)
    append_lines(d.results, [record(2)])
    whole = dumps(record(3))
    with d.results.open("ab") as fh:  # an append caught half way
        fh.write(whole[:40])
    assert customs(read_all(d)) == [None, None, "c2"]
    with d.results.open("ab") as fh:  # ... and its end, but for the newline
        fh.write(whole[40:-1])
    assert customs(read_all(d)) == [None, None, "c2"], "a line counts once it has its newline"
    with d.results.open("ab") as fh:
        fh.write(b"\n")
    assert customs(read_all(d)) == [None, None, "c2", "c3"]

    with d.results.open("ab") as fh:  # a crash mid-append ...
        fh.write(dumps(record(4))[:55])
    before = read_all(d)
    repair_tail(d.results)  # ... the next runner ends the torn line and appends after it
    append_lines(d.results, [record(4), record(6)])
    after = read_all(d)
    assert after[: len(before)] == before
    assert customs(after) == [None, None, "c2", "c3", "c4", "c6"]


def test_a_line_recorded_twice_is_read_once_first_record_wins(tmp_path: Path) -> None:
    d = make_batch(tmp_path)
    append_lines(d.results, [record(3, "failed"), record(2), record(3), record(2, "expired")])
    rows = read_all(d)
    assert customs(rows) == [None, None, "c3", "c2"]
    assert rows[2].kind == "error" and rows[2].row["error"]["code"] == "engine_error"
    append_lines(d.results, [record(line) for line in (4, 6, 7, 8)])
    output, errors = finish(d)
    rows = read_all(d)
    assert len(rows) == 8 and rows[2].data in errors and rows[2].data not in output


def test_cursor_resumes_where_the_last_read_stopped(tmp_path: Path) -> None:
    d = make_batch(tmp_path)
    got, after = partial_rows(d, 0, limit=1)
    assert customs(got) == [None] and after == 1
    got, after = partial_rows(d, after)
    assert customs(got) == [None] and after == 2
    got, again = partial_rows(d, after)
    assert got == [] and again == after, "nothing new: the same cursor back"
    append_lines(d.results, [record(6), record(2), record(2)])
    got, after = partial_rows(d, after)
    assert customs(got) == ["c6", "c2"] and after == 4
    append_lines(d.results, [record(line) for line in (3, 4, 7, 8)])
    pages = []
    cursor = 0
    while True:
        page, cursor = partial_rows(d, cursor, limit=3)
        if not page:
            break
        pages += page
    assert pages == read_all(d) and cursor == 8
    assert partial_rows(d, 100) == ([], 100)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), chunk=st.integers(1, 4), repeats=st.integers(0, 4),
       crash_at=st.one_of(st.none(), st.integers(0, 5)))  # fmt: skip
def test_every_read_is_a_prefix_of_the_next_and_the_last_is_the_final_files(
    seed: int, chunk: int, repeats: int, crash_at: int | None
) -> None:
    """Lines finish in any order, some recorded twice, maybe a crash tearing an append:
    reads taken between appends (from cursor 0, and resumed from each read's cursor)
    only grow, and at the end hold the final files' rows, each once."""
    import tempfile

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_batch(Path(tmp))
        order = list(ACCEPTED)
        rng.shuffle(order)
        recs = [record(line, rng.choice(["succeeded", "succeeded", "failed", "expired", "cancelled"]))
                for line in order]  # fmt: skip
        recs += [record(rng.choice(ACCEPTED)) for _ in range(repeats)]  # repeats, after the first
        rng.shuffle(recs[len(order) // 2 :])
        reads: list[list[PartialRow]] = [read_all(d)]
        resumed, cursor = list(reads[0]), len(reads[0])
        for n, start in enumerate(range(0, len(recs), chunk)):
            if crash_at == n:
                with d.results.open("ab") as fh:
                    fh.write(dumps(recs[start])[:30])
                reads.append(read_all(d))
                repair_tail(d.results)
            append_lines(d.results, recs[start : start + chunk])
            reads.append(read_all(d))
            page, cursor = partial_rows(d, cursor)
            resumed += page
        for earlier, later in itertools.pairwise(reads):
            assert later[: len(earlier)] == earlier
        final_read = reads[-1]
        assert resumed == final_read
        output, errors = finish(d)
        assert len(final_read) == len({r.row["id"] for r in final_read}) == len(INVALID) + len(ACCEPTED)
        assert sorted(r.data for r in final_read if r.kind == "output") == sorted(output)
        assert sorted(r.data for r in final_read if r.kind == "error") == sorted(errors)
        assert all(json.loads(r.data) == r.row for r in final_read)

"""A batch's files under ``<home>/batches/<batch_id>/``, and the entries in them.

=====================  =============================================================
file                   what
=====================  =============================================================
``input.jsonl``        the file as submitted (kept for the record)
``requests.jsonl``     ``{"line", "request"}``: each accepted line's wire request, so
                       the runner can (re)publish it after any restart
``invalid.jsonl``      error-file entries of the lines refused at validation
``results.jsonl``      ``{"line", "custom_id", "status", "entry"}``: every line's
                       outcome, appended (and fsynced) by the runner before the ledger
                       records it; Redis and Kafka may lose results, this file may not
``output.jsonl``       the output file (successes), in input order, written at the end
``errors.jsonl``       the error file (invalid and unsuccessful lines), in input order
=====================  =============================================================

Whole files are written atomically (temporary file, fsync, rename, fsync of the
directory), so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..wire import InferenceRequest, Result, ResultStatus
from .batch_parser import entry_id

__all__ = [
    "BatchDir",
    "append_lines",
    "outcome_entry",
    "read_jsonl",
    "write_atomic",
]

#: error codes of lines that never ran to an end (OpenAI's)
CANCELLED = ("batch_cancelled", "This request was cancelled before it completed.")
EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")


@dataclass(frozen=True)
class BatchDir:
    """Paths of one batch's files."""

    root: Path

    @classmethod
    def of(cls, home: Path, batch_id: str) -> BatchDir:
        return cls(home.resolve() / "batches" / batch_id)

    @property
    def input(self) -> Path:
        return self.root / "input.jsonl"

    @property
    def requests(self) -> Path:
        return self.root / "requests.jsonl"

    @property
    def invalid(self) -> Path:
        return self.root / "invalid.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def output(self) -> Path:
        return self.root / "output.jsonl"

    @property
    def errors(self) -> Path:
        return self.root / "errors.jsonl"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``path`` all at once or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_lines(path: Path, objs: Iterable[Any]) -> None:
    """Append JSON lines and fsync them."""
    data = b"".join(dumps(o) for o in objs)
    if not data:
        return
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines of ``path`` (none if it does not exist). A torn last line (a
    crash mid-append) is skipped; the runner appends after it on a fresh line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n"):
        if raw.strip():
            try:
                yield json.loads(raw)
            except ValueError:
                continue


def repair_tail(path: Path) -> None:
    """End ``path`` with a newline, so an append after a torn line starts a new one."""
    try:
        with path.open("rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
    except FileNotFoundError:
        return


def request_line(line: int, request: InferenceRequest) -> bytes:
    """A ``requests.jsonl`` line, ``{"line": N, "request": <wire request>}``, with the
    request serialized once by its own (compiled) serializer."""
    return b'{"line":%d,"request":%s}\n' % (line, request.to_bytes())


def outcome_entry(
    batch_id: str, line: int, custom_id: str, result: Result | None, *, ended_as: tuple[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """``(status, entry)``: a line's output-file or error-file entry, OpenAI's shape.

    Parameters:
        result: the request's stored result; None for a line that never ran.
        ended_as: ``(code, message)`` of a line cancelled (or never run) because the
            batch was cancelled or expired (:data:`CANCELLED`, :data:`EXPIRED`).
    """
    eid = entry_id(batch_id, line)
    if result is not None and result.status is ResultStatus.succeeded:
        response = {"status_code": 200, "request_id": result.request_id, "body": result.body}
        return "succeeded", {"id": eid, "custom_id": custom_id, "response": response, "error": None}
    if result is not None and result.status is ResultStatus.failed:
        code = result.error.code if result.error else "server_error"
        message = result.error.message if result.error else "the request failed"
        # The reason goes in ``error``, the body stays null: vLLM's run_batch writes failed
        # lines so (its BatchRequestOutput allows no error body), and OpenAI's readers look
        # at ``error`` first.
        status_code = 400 if code == "invalid_request" else 500
        response = {"status_code": status_code, "request_id": result.request_id, "body": None}
        return "failed", {
            "id": eid, "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message},
        }
    if result is not None and result.status is ResultStatus.expired:
        ended_as = EXPIRED  # the scheduler expires queued lines at the batch's deadline
    ended_as = ended_as or CANCELLED
    status = "expired" if ended_as is EXPIRED else "cancelled"
    code, message = ended_as
    return status, {"id": eid, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}

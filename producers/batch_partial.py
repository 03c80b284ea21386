"""Progressive output: the rows of a batch's output and error files recorded so far,
readable while the batch runs, each line once, in the final files' exact row format.

The rows come in one sequence that only ever grows at its end:

1. the lines refused at validation (``invalid.jsonl``), in input order: that file is
   written, whole, before the batch exists in the ledger, and never changes;
2. then every line's outcome in the order the runner recorded it (``results.jsonl``,
   completion order), each line once: a record that repeats a line already recorded
   is skipped (the first one wins, as the final files take them).

A cursor counts the rows already returned: :func:`partial_rows` with ``after=N``
returns the rows from the ``N``-th on and the cursor to pass next. A read at ``t1``
is a prefix of any later read, and once the batch has ended (its files written) the
whole sequence holds exactly the rows of ``output.jsonl`` and ``errors.jsonl``, each
row's bytes as in those files (the final files hold the same rows in input order).

Each row belongs to the output file (a line that succeeded: ``"error": null``) or the
error file (``"error"`` set: invalid, failed, cancelled or expired lines).

A record is read only once its line is complete (ends with a newline): a line being
appended is left for the next read, and a line torn by a crash (which the runner
ends with a newline before it appends again) is not JSON and is skipped, as the runner
itself skips it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .batch_files import BatchDir, dumps

__all__ = [
    "Kind",
    "PartialRow",
    "invalid_rows",
    "kind_of",
    "partial_rows",
    "recorded_entries",
    "recorded_results",
    "recorded_rows",
]

#: which final file a row belongs to
Kind = Literal["output", "error"]


class PartialRow(NamedTuple):
    """One row: its file, and its bytes exactly as the final file has them (with the
    newline)."""

    kind: Kind
    data: bytes

    @property
    def row(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


def kind_of(row: dict[str, Any]) -> Kind:
    """The file an output-format row belongs to: the output file has the lines that
    succeeded (``"error": null``), the error file every other."""
    return "output" if row.get("error") is None else "error"


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The newline-terminated lines of ``path`` (none if it does not exist): a last
    line still being written (or torn) is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n")
    if end < 0:
        return
    for raw in data[: end + 1].split(b"\n"):
        if raw.strip():
            yield raw


def _objects(path: Path) -> Iterator[dict[str, Any]]:
    for raw in _complete_lines(path):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # torn by a crash, then ended by the runner's repair
        if isinstance(obj, dict):
            yield obj


def recorded_results(
    d: BatchDir, accept: Callable[[dict[str, Any]], bool] | None = None
) -> Iterator[tuple[int, Kind, dict[str, Any]]]:
    """``(line, kind, entry)`` of each line's first outcome in ``results.jsonl``, in the
    order recorded; ``accept`` (the runner's: the line is one of the batch's accepted
    lines) filters records before they claim their line."""
    seen: set[int] = set()
    for rec in _objects(d.results):
        line, entry = rec.get("line"), rec.get("entry")
        if not isinstance(line, int) or not isinstance(entry, dict) or line in seen:
            continue
        if accept is not None and not accept(rec):
            continue
        seen.add(line)
        yield line, ("output" if rec.get("status") == "succeeded" else "error"), entry


def invalid_rows(d: BatchDir) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, entry)`` of the lines refused at validation, in input order."""
    for entry in _objects(d.invalid):
        yield entry["error"]["line"], entry


def recorded_entries(d: BatchDir) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """``(kind, entry)`` of every row recorded so far, in the order of
    :mod:`this module <.batch_partial>`: the invalid lines, then the outcomes in
    completion order."""
    for _, entry in invalid_rows(d):
        yield "error", entry
    for _, kind, entry in recorded_results(d):
        yield kind, entry


def recorded_rows(d: BatchDir) -> Iterator[PartialRow]:
    """:func:`recorded_entries` as rows of the final files' bytes."""
    for kind, entry in recorded_entries(d):
        yield PartialRow(kind, dumps(entry))


def partial_rows(d: BatchDir, after: int = 0, limit: int | None = None) -> tuple[list[PartialRow], int]:
    """The rows recorded so far from the ``after``-th on (at most ``limit``), and the
    cursor to read on from: ``after`` plus the rows returned.

    Raises:
        ValueError: ``after`` or ``limit`` is negative.
    """
    if after < 0 or (limit is not None and limit < 0):
        raise ValueError("after and limit must be >= 0")
    rows: list[PartialRow] = []
    for i, (kind, entry) in enumerate(recorded_entries(d)):
        if i < after:
            continue  # counted, not serialized
        if limit is not None and len(rows) >= limit:
            break
        rows.append(PartialRow(kind, dumps(entry)))
    return rows, after + len(rows)

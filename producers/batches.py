"""Batches on the server: made from a file's bytes, read, listed and cancelled, for one
tenant at a time — the gateway's Batches API (``/v1/batches``) runs on this, and so do
the services and tests that use the ledger directly.

``create`` validates the file line by line (:mod:`.batch_parser`), makes everything
it accepted durable — the files under ``<home>/batches/<id>/`` (fsynced), then the
batch and one request row per accepted line in one ledger transaction — and only
then returns the batch, in status ``validating``. Nothing is sent to Kafka here: the
batch runner (:mod:`.batch_runner`) publishes the lines, collects their results and
writes the output and error files, so a batch survives any restart of the stack.

Every batch has OpenAI file ids: the uploaded file it was made from (or, made from
bytes directly, its own copy of them registered as a file), and once it ends its
output and error files, registered with the terminal status change (ids derived from
the batch id, :func:`~tokenmill.ledger.batch_file_id`).
"""

from __future__ import annotations

import builtins
import itertools
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import Settings
from ..errors import NotFound, ValidationError
from ..ledger import batch_file_id
from ..wire import Batch, BatchStatus, Endpoint, Priority, RequestCounts
from .batch_files import BatchDir, dumps, read_jsonl, request_line, write_atomic
from .batch_parser import parse_batch
from .batch_partial import PartialRow, partial_rows
from .requests import check_webhook_url

if TYPE_CHECKING:
    from ..ledger import BatchSummary, StoredFile

__all__ = [
    "BatchView",
    "Batches",
    "OutputExpired",
    "PartialOutput",
    "batch_data",
    "expire_outputs",
    "new_batch_id",
    "output_file_records",
    "parse_window",
    "usage_json",
]

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: OpenAI's limits on metadata
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
#: OpenAI's bounds of ``output_expires_after.seconds`` (an hour to 30 days)
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 2_592_000
#: validation errors shown in a batch object; the error file has every one
MAX_LISTED_ERRORS = 1000


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def parse_window(window: str) -> float:
    """``"24h"`` → seconds (``s``, ``m``, ``h`` or ``d``; OpenAI offers ``24h``).

    Raises:
        ValidationError: not a positive duration.
    """
    m = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)] if m else 0.0
    if seconds <= 0:
        raise ValidationError(
            f"completion_window: must be a duration like 24h, 90m or 30s, got {window!r}",
            field="completion_window",
        )
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs of strings, keys ≤ 64 and values ≤ 512 characters.

    Raises:
        ValidationError: (``field="metadata"``) anything else.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_PAIRS or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY
        and len(v) <= MAX_METADATA_VALUE for k, v in metadata.items()
    ):
        raise ValidationError(
            f"metadata: at most {MAX_METADATA_PAIRS} pairs of strings, keys up to {MAX_METADATA_KEY} "
            f"and values up to {MAX_METADATA_VALUE} characters", field="metadata",
        )
    return dict(metadata)


def check_expires_after(value: Any) -> dict[str, Any] | None:
    """OpenAI's ``output_expires_after``: ``{"anchor": "created_at", "seconds": N}``,
    N from an hour to 30 days.

    Raises:
        ValidationError: (``field="output_expires_after"``) anything else.
    """
    if value is None:
        return None
    seconds = value.get("seconds") if isinstance(value, Mapping) else None
    if (
        not isinstance(value, Mapping) or set(value) != {"anchor", "seconds"} or value["anchor"] != "created_at"
        or isinstance(seconds, bool) or not isinstance(seconds, int)
        or not MIN_EXPIRES_AFTER_S <= seconds <= MAX_EXPIRES_AFTER_S
    ):
        raise ValidationError(
            "output_expires_after: must be {\"anchor\": \"created_at\", \"seconds\": N} with N from "
            f"{MIN_EXPIRES_AFTER_S} to {MAX_EXPIRES_AFTER_S}", field="output_expires_after",
        )
    return {"anchor": "created_at", "seconds": seconds}


def output_file_records(batch: Batch, at: float, *, expires_at: float | None = None) -> list[StoredFile]:
    """The file rows of an ended batch's output and error files: the batch's tenant's,
    with ids derived from the batch id, so recording them twice records them once;
    ``expires_at``: when they expire (``output_expires_after`` from ``at``)."""
    from ..ledger import FilePurpose, FileStatus, StoredFile, batch_file_id

    found = []
    kinds: tuple[tuple[Literal["output", "error"], str | None], ...] = (
        ("output", batch.output_file), ("error", batch.error_file))
    for kind, path in kinds:
        if path is not None:
            found.append(StoredFile(
                id=batch_file_id(batch.id, kind), tenant=batch.tenant, purpose=FilePurpose.batch_output,
                filename=f"{batch.id}_{kind}.jsonl", bytes=Path(path).stat().st_size, created_at=at,
                path=path, status=FileStatus.processed, expires_at=expires_at,
            ))  # fmt: skip
    return found


class OutputExpired(NotFound):
    """A batch's output and error files have expired (``output_expires_after``)."""

    def __init__(self, message: str, *, expired_at: float) -> None:
        super().__init__(message)
        self.expired_at = expired_at


@dataclass(frozen=True, slots=True)
class PartialOutput:
    """A page of a batch's progressive output (:meth:`Batches.partial`)."""

    #: the batch's status, read before the rows
    status: BatchStatus
    #: the rows recorded so far from the cursor on (see :mod:`.batch_partial`)
    rows: list[PartialRow]
    #: the cursor to read on from
    next_after: int
    #: more rows are recorded already (past ``limit``)
    has_more: bool

    @property
    def ended(self) -> bool:
        """The batch had ended before the rows were read: no row will follow the
        ones recorded, and they are exactly its output and error files' rows."""
        return self.status.is_terminal


@dataclass(frozen=True, slots=True)
class BatchView:
    """A batch with what OpenAI's batch object shows beyond the wire :class:`Batch`."""

    batch: Batch
    summary: BatchSummary
    #: the first :data:`MAX_LISTED_ERRORS` lines refused at validation, as OpenAI's
    #: ``BatchError`` (``code``, ``line``, ``message``, ``param``)
    errors: list[dict[str, Any]]


class Batches:
    """A tenant's batches (call from a worker thread in asyncio code: it blocks on the ledger).

    Parameters:
        settings: the loaded settings (ledger URL, state directory, models, limits).
        tenant: whose batches; every call is scoped to it.
    """

    def __init__(self, settings: Settings, tenant: str) -> None:
        self.settings = settings
        self.tenant = tenant
        self._factory: Any = None

    @property
    def factory(self) -> Any:
        if self._factory is None:
            from ..ledger import shared_factory

            self._factory = shared_factory(self.settings.ledger_url)
        return self._factory

    def _dir(self, batch_id: str) -> BatchDir:
        return BatchDir.of(self.settings.home, batch_id)

    def create(
        self,
        file: str | Path | bytes,
        *,
        completion_window: str = "24h",
        priority: Priority | str = Priority.batch,
        webhook: str | None = None,
        model: str | None = None,
        endpoint: Endpoint | str | None = None,
        metadata: Mapping[str, str] | None = None,
        input_file_id: str | None = None,
        output_expires_after: Mapping[str, Any] | None = None,
    ) -> Batch:
        """Validate a batch file and accept its valid lines.

        Parameters:
            file: a path to the JSONL file, or its bytes.
            completion_window: how long the batch may run (``24h``; ``90m``, ``30s`` …);
                lines not done by then end as ``batch_expired``.
            priority: the priority class of its requests (default ``batch``).
            webhook: URL to notify when the batch ends (completed, failed, expired,
                cancelled), signed with the tenant's webhook secret.
            model: the model of lines whose body names none.
            endpoint: require every line's url to be this one (default: either).
            metadata: up to 16 string pairs kept with the batch.
            input_file_id: the tenant's uploaded file that ``file`` was read from; None:
                the batch registers its own copy of the bytes as its input file.
            output_expires_after: OpenAI's expiry of the output files, kept with the batch.

        Raises:
            ValidationError: the file as a whole, or an argument, is refused (a bad
                line is not an error: it goes to the error file). Nothing is written then.

        Returns:
            The batch, ``validating`` (``failed`` when no line is valid), with its
            request counts: ``total`` lines, ``failed`` so far = invalid lines.
        """
        try:
            prio = Priority(priority)
        except ValueError:
            raise ValidationError(f"priority: must be one of {', '.join(Priority)}, got {priority!r}",
                                  field="priority") from None
        try:
            only = None if endpoint is None else Endpoint(endpoint)
        except ValueError:
            raise ValidationError(f"endpoint: must be one of {', '.join(Endpoint)}, got {endpoint!r}",
                                  field="endpoint") from None
        window_s = parse_window(completion_window)
        if webhook is not None:
            check_webhook_url(webhook, self.settings, self.tenant)
        kept_metadata = check_metadata(metadata)
        expires_after = check_expires_after(output_expires_after)
        data = self._read(file)
        batch_id, now = new_batch_id(), time.time()
        expires = now + window_s
        parsed = parse_batch(
            data, self.settings, tenant=self.tenant, batch_id=batch_id, priority=prio,
            default_model=model, endpoint=only, deadline=expires,
        )
        if parsed.lines == 0:
            raise ValidationError("file: has no requests", field="file")
        d = self._dir(batch_id)
        try:
            write_atomic(d.input, [data])
            write_atomic(d.requests, (request_line(a.line, a.request) for a in parsed.accepted))
            invalid = [e.entry(batch_id) for e in parsed.errors]
            write_atomic(d.invalid, (dumps(e) for e in invalid))
            failed = not parsed.accepted
            batch = Batch(
                id=batch_id, tenant=self.tenant, endpoint=parsed.endpoint,
                status=BatchStatus.failed if failed else BatchStatus.validating,
                input_file=str(d.input), completion_window=completion_window, created_at=now,
                expires_at=expires, failed_at=now if failed else None,
                request_counts=RequestCounts(total=parsed.lines, completed=0, failed=len(parsed.errors)),
                webhook_url=webhook, metadata=kept_metadata,
            )
            if failed:  # nothing to run: the error file is the whole answer
                write_atomic(d.output, [])
                write_atomic(d.errors, (dumps(e) for e in invalid))
                batch = batch.model_copy(update={"output_file": str(d.output), "error_file": str(d.errors)})
            files_expire = now + expires_after["seconds"] if failed and expires_after else None
            files = output_file_records(batch, now, expires_at=files_expire) if failed else []
            if input_file_id is None:
                own = self._own_input(batch, file, len(data), now)
                files.append(own)
                input_file_id = own.id
            self._record(batch, [a.request for a in parsed.accepted], files, input_file_id, expires_after)
        except BaseException:
            # The ledger never saw the batch (its transaction is one): leave no trace.
            shutil.rmtree(d.root, ignore_errors=True)
            raise
        return batch

    @staticmethod
    def _own_input(batch: Batch, file: str | Path | bytes, size: int, at: float) -> StoredFile:
        """The file row of a batch's copy of the bytes it was made from (no upload)."""
        from ..ledger import FilePurpose, FileStatus, StoredFile, batch_file_id

        return StoredFile(
            id=batch_file_id(batch.id, "input"), tenant=batch.tenant, purpose=FilePurpose.batch,
            filename="input.jsonl" if isinstance(file, bytes) else Path(file).name, bytes=size,
            created_at=at, path=batch.input_file, status=FileStatus.uploaded,
        )  # fmt: skip

    def _read(self, file: str | Path | bytes) -> bytes:
        if isinstance(file, bytes):
            return file
        path = Path(file)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ValidationError(f"file: cannot read {path}: {exc.strerror}", field="file") from None
        limit = self.settings.batch.max_bytes
        if size > limit:
            raise ValidationError(f"file: {size} bytes is over the limit of {limit} bytes", field="file")
        return path.read_bytes()

    def _record(
        self,
        batch: Batch,
        requests: list[Any],
        files: list[StoredFile],
        input_file_id: str,
        output_expires_after: dict[str, Any] | None,
    ) -> None:
        from ..ledger import (
            add_file,
            batch_summaries,
            set_batch_input,
            transaction,
            upsert_batch,
            upsert_requests,
        )
        from ..ledger.batches import record_output_expiry
        from ..workers.webhooks import enqueue_event

        with transaction(self.factory) as session:
            upsert_batch(session, batch)
            set_batch_input(session, batch.id, input_file_id=input_file_id,
                            output_expires_after=output_expires_after)
            upsert_requests(session, requests)
            for f in files:
                add_file(session, f)
            if batch.status is BatchStatus.failed:  # its (error) file is made now
                record_output_expiry(session, batch.id, batch.created_at)
            if batch.status is BatchStatus.failed and batch.webhook_url:
                summary = batch_summaries(session, [batch.id])[batch.id]
                enqueue_event(
                    session, key=f"{batch.id}:failed", tenant=batch.tenant, url=batch.webhook_url,
                    event_type="batch.failed", data=batch_data(batch, summary),
                )

    def retrieve(self, batch_id: str) -> Batch:
        """The batch as it is now.

        Raises:
            NotFound: no such batch for this tenant.
        """
        from ..ledger import get_batch, transaction

        with transaction(self.factory) as session:
            return get_batch(session, self.tenant, batch_id)

    def list(self, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        """The tenant's batches, newest first; ``after`` pages on from a batch id."""
        from ..ledger import list_batches, transaction

        with transaction(self.factory) as session:
            return list_batches(session, self.tenant, limit=limit, after=after)

    def view(self, batch_id: str) -> BatchView:
        """The batch as OpenAI's batch object shows it.

        Raises:
            NotFound: no such batch for this tenant.
        """
        from ..ledger import batch_summaries, get_batch, transaction

        with transaction(self.factory) as session:
            batch = get_batch(session, self.tenant, batch_id)
            summary = batch_summaries(session, [batch_id])[batch_id]
        return BatchView(batch, summary, self._line_errors(batch_id))

    def list_views(self, *, limit: int = 20, after: str | None = None) -> builtins.list[BatchView]:
        """:meth:`list` as OpenAI's batch objects.

        Raises:
            NotFound: ``after`` is not one of this tenant's batches.
        """
        from ..ledger import batch_summaries, list_batches, transaction

        with transaction(self.factory) as session:
            batches = list_batches(session, self.tenant, limit=limit, after=after)
            summaries = batch_summaries(session, [b.id for b in batches])
        return [BatchView(b, summaries[b.id], self._line_errors(b.id)) for b in batches]

    def _line_errors(self, batch_id: str) -> builtins.list[dict[str, Any]]:
        entries = itertools.islice(read_jsonl(self._dir(batch_id).invalid), MAX_LISTED_ERRORS)
        return [
            {k: e["error"].get(k) for k in ("code", "line", "message", "param")}
            for e in entries
        ]

    def partial(self, batch_id: str, *, after: int = 0, limit: int | None = None) -> PartialOutput:
        """The rows of the batch's output and error files recorded so far, from cursor
        ``after`` (the rows already read), at most ``limit``: while the batch runs, and
        after it ended (then every row, as in its files). See :mod:`.batch_partial`.

        Raises:
            NotFound: no such batch for this tenant.
            OutputExpired: its output files have expired (``output_expires_after``).
            ValidationError: ``after`` or ``limit`` is negative.
        """
        from ..ledger import batch_summaries, get_batch, transaction

        if after < 0 or (limit is not None and limit < 0):
            raise ValidationError("after and limit must be >= 0", field="after" if after < 0 else "limit")
        with transaction(self.factory) as session:  # the status before the rows
            batch = get_batch(session, self.tenant, batch_id)
            summary = batch_summaries(session, [batch_id])[batch_id]
        self._check_live(batch_id, summary, time.time())
        rows, _ = partial_rows(self._dir(batch_id), after, None if limit is None else limit + 1)
        # The cleanup removes nothing before the expiry: rows read before it are whole.
        self._check_live(batch_id, summary, time.time())
        page = rows if limit is None else rows[:limit]
        return PartialOutput(batch.status, page, after + len(page), has_more=len(rows) > len(page))

    @staticmethod
    def _check_live(batch_id: str, summary: BatchSummary, now: float) -> None:
        if summary.output_expired(now):
            at = summary.output_expires_at or summary.output_expired_at or now
            raise OutputExpired(f"the output of batch {batch_id} expired at {_iso(at)} "
                                "(its output_expires_after)", expired_at=at)

    def cancel(self, batch_id: str) -> Batch:
        """Ask for the batch to be cancelled: ``cancelling`` now, ``cancelled`` once every
        running line has stopped; results so far are kept. A batch that already ended
        (or is finalizing) is returned as it is.

        Raises:
            NotFound: no such batch for this tenant.
        """
        from ..ledger import lock_batch, transaction, upsert_batch

        with transaction(self.factory) as session:
            batch = lock_batch(session, batch_id)
            if batch.tenant != self.tenant:
                raise NotFound(f"batch {batch_id} not found")
            if batch.status in (BatchStatus.validating, BatchStatus.in_progress):
                batch = batch.model_copy(
                    update={"status": BatchStatus.cancelling, "cancelling_at": time.time()}
                )
                upsert_batch(session, batch)
            return batch


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def expire_outputs(
    settings: Settings, *, now: float | None = None, limit: int = 100, factory: Any = None
) -> list[str]:
    """Remove the output and error files of every ended batch whose
    ``output_expires_after`` has passed (counted from the files' creation), with the
    results they were assembled from, and record it (``output_expired_at``). Their
    Files API rows stay, expired (``expires_at``): reading them answers that they
    expired. The batch runner calls this every ``expire_every_s``; idempotent, so
    copies running it at once remove each file once.

    Returns:
        The ids of the batches whose files were removed now (at most ``limit``).
    """
    from ..ledger import shared_factory, transaction
    from ..ledger.batches import due_output_expiries, mark_outputs_expired

    now = time.time() if now is None else now
    factory = factory or shared_factory(settings.ledger_url)
    with transaction(factory) as session:
        due = due_output_expiries(session, now, limit=limit)
    for b in due:
        d = BatchDir.of(settings.home, b.batch_id)
        for path in (b.output_file, b.error_file, str(d.results)):
            if path is not None:
                Path(path).unlink(missing_ok=True)
    ids = [b.batch_id for b in due]
    with transaction(factory) as session:
        mark_outputs_expired(session, ids, now)
    return ids


def usage_json(summary: BatchSummary) -> dict[str, Any]:
    """OpenAI's batch ``usage``: the ledger's token counts of the batch's requests."""
    return {
        "input_tokens": summary.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": summary.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": summary.input_tokens + summary.output_tokens,
    }


def batch_data(batch: Batch, summary: BatchSummary | None = None) -> dict[str, Any]:
    """The batch for its tenant's webhooks: OpenAI's batch object with file ids — never
    the server's paths, its tenant name or the webhook URL itself. With its ledger
    ``summary`` it adds ``input_file_id``, ``model`` and ``usage`` as the gateway's
    batch object has them."""
    b = batch
    data: dict[str, Any] = {
        "id": b.id, "object": "batch", "endpoint": b.endpoint.value, "status": b.status.value,
        "completion_window": b.completion_window, "created_at": int(b.created_at),
        "expires_at": int(b.expires_at),
        "request_counts": {"total": b.request_counts.total, "completed": b.request_counts.completed,
                           "failed": b.request_counts.failed},
        "output_file_id": batch_file_id(b.id, "output") if b.output_file else None,
        "error_file_id": batch_file_id(b.id, "error") if b.error_file else None,
        "metadata": b.metadata,
    }
    for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at"):
        at = getattr(b, name)
        data[name] = None if at is None else int(at)
    if summary is not None:
        data.update(input_file_id=summary.input_file_id or "", model=summary.model, usage=usage_json(summary))
        if summary.output_expires_at is not None:
            data["output_expires_at"] = int(summary.output_expires_at)
    return data

"""Batch files through the client: ``client.batches.create / retrieve / list / cancel``.

``create`` validates the file line by line (:mod:`.batch_parser`), makes everything
it accepted durable — the files under ``<home>/batches/<id>/`` (fsynced), then the
batch and one request row per accepted line in one ledger transaction — and only
then returns the batch, in status ``validating``. Nothing is sent to Kafka here: the
batch runner (:mod:`.batch_runner`) publishes the lines, collects their results and
writes the output and error files, so a batch survives any restart of the stack.

Shaped like OpenAI's Batch API, but a batch is created from a file directly (no
separate file upload) and its files are paths under the state directory, which the
client and the batch runner must share (the same machine, or a shared volume).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import NotFound, ValidationError
from ..wire import Batch, BatchStatus, Endpoint, Priority, RequestCounts
from .batch_files import BatchDir, dumps, read_jsonl, request_record, write_atomic
from .batch_parser import parse_batch

__all__ = ["AsyncBatches", "Batches", "new_batch_id", "parse_window"]

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def parse_window(window: str) -> float:
    """``"24h"`` → seconds (``s``, ``m``, ``h`` or ``d``; OpenAI offers ``24h``).

    Raises:
        ValidationError: not a positive duration.
    """
    m = _WINDOW.match(window)
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)] if m else 0.0
    if seconds <= 0:
        raise ValidationError(
            f"completion_window: must be a duration like 24h, 90m or 30s, got {window!r}",
            field="completion_window",
        )
    return seconds


def batch_webhook_check(settings: Settings, tenant: str, url: str) -> str:
    """Validate a webhook URL at submission (the delivery checks the address again)."""
    from ..workers.webhooks import check_target

    check_target(url, allow_private=settings.webhooks.allow_private_targets)
    t = settings.tenants[tenant]
    if t.webhook_secret is None:
        raise ValidationError(f"webhook: tenant {tenant!r} has no webhook_secret to sign with", field="webhook")
    return url


class Batches:
    """A tenant's batches (the synchronous API; :class:`AsyncBatches` wraps it).

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
        metadata: dict[str, str] | None = None,
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

        Raises:
            ValidationError: the file as a whole, or an argument, is refused (a bad
                line is not an error: it goes to the error file).

        Returns:
            The batch, ``validating`` (``failed`` when no line is valid), with its
            request counts: ``total`` lines, ``failed`` so far = invalid lines.
        """
        try:
            prio = Priority(priority)
        except ValueError:
            raise ValidationError(f"priority: must be one of {', '.join(Priority)}, got {priority!r}",
                                  field="priority") from None
        window_s = parse_window(completion_window)
        if webhook is not None:
            batch_webhook_check(self.settings, self.tenant, webhook)
        if metadata is not None and (len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        )):
            raise ValidationError("metadata: at most 16 string keys and values", field="metadata")
        data = self._read(file)
        batch_id, now = new_batch_id(), time.time()
        expires = now + window_s
        parsed = parse_batch(
            data, self.settings, tenant=self.tenant, batch_id=batch_id, priority=prio,
            default_model=model, endpoint=endpoint, deadline=expires,
        )
        if parsed.lines == 0:
            raise ValidationError("file: has no requests", field="file")
        d = self._dir(batch_id)
        write_atomic(d.input, [data])
        write_atomic(d.requests, (dumps(request_record(a.line, a.request)) for a in parsed.accepted))
        invalid = [e.entry(batch_id) for e in parsed.errors]
        write_atomic(d.invalid, (dumps(e) for e in invalid))
        failed = not parsed.accepted
        batch = Batch(
            id=batch_id, tenant=self.tenant, endpoint=parsed.endpoint,
            status=BatchStatus.failed if failed else BatchStatus.validating,
            input_file=str(d.input), completion_window=completion_window, created_at=now,
            expires_at=expires, failed_at=now if failed else None,
            request_counts=RequestCounts(total=parsed.lines, completed=0, failed=len(parsed.errors)),
            webhook_url=webhook, metadata=metadata,
        )
        if failed:  # nothing to run: the error file is the whole answer
            write_atomic(d.output, [])
            write_atomic(d.errors, (dumps(e) for e in invalid))
            batch = batch.model_copy(update={"output_file": str(d.output), "error_file": str(d.errors)})
        self._record(batch, [a.request for a in parsed.accepted])
        return batch

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

    def _record(self, batch: Batch, requests: list[Any]) -> None:
        from ..ledger import transaction, upsert_batch, upsert_requests
        from ..workers.webhooks import enqueue_event

        with transaction(self.factory) as session:
            upsert_batch(session, batch)
            upsert_requests(session, requests)
            if batch.status is BatchStatus.failed and batch.webhook_url:
                enqueue_event(
                    session, key=f"{batch.id}:failed", tenant=batch.tenant, url=batch.webhook_url,
                    event_type="batch.failed", data=batch_data(batch),
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

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[Batch], None] | None = None,
    ) -> Batch:
        """Block until the batch ends; ``on_progress`` sees every poll.

        Raises:
            TimeoutError: not ended within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.retrieve(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch.status.is_terminal:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch.status.value} after {timeout:g}s")
            time.sleep(poll_s)

    def download(
        self, batch_id: str, *, output: str | Path | None = None, errors: str | Path | None = None
    ) -> tuple[Path, Path]:
        """Copy an ended batch's output and error files to ``output`` / ``errors``
        (default: leave them where they are); returns where they are.

        Raises:
            NotFound: no such batch for this tenant.
            ValidationError: the batch has not ended yet.
        """
        batch = self.retrieve(batch_id)
        if not batch.status.is_terminal or not batch.output_file or not batch.error_file:
            raise ValidationError(
                f"batch {batch_id} is {batch.status.value}: its files are written when it ends",
                field="batch_id",
            )
        found = []
        for src, dst in ((batch.output_file, output), (batch.error_file, errors)):
            if dst is None:
                found.append(Path(src))
            else:
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                found.append(Path(dst))
        return found[0], found[1]

    def results(self, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """An ended batch's output and error entries, in input order."""
        out, err = self.download(batch_id)
        return list(read_jsonl(out)), list(read_jsonl(err))


def batch_data(batch: Batch, *, exclude_none: bool = True) -> dict[str, Any]:
    """The batch as JSON for people and webhooks (OpenAI's batch object, with paths
    for file ids), without the wire's schema versions."""
    data = {"object": "batch"}
    data.update(batch.model_dump(
        mode="json", exclude_none=exclude_none,
        exclude={"schema_version": True, "request_counts": {"schema_version"}},
    ))
    return data


class AsyncBatches:
    """:class:`Batches` for asyncio code (each call runs in a worker thread)."""

    def __init__(self, settings: Settings, tenant: str) -> None:
        self.sync = Batches(settings, tenant)

    async def create(self, file: str | Path | bytes, **kwargs: Any) -> Batch:
        return await asyncio.to_thread(self.sync.create, file, **kwargs)

    async def retrieve(self, batch_id: str) -> Batch:
        return await asyncio.to_thread(self.sync.retrieve, batch_id)

    async def list(self, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        return await asyncio.to_thread(self.sync.list, limit=limit, after=after)

    async def cancel(self, batch_id: str) -> Batch:
        return await asyncio.to_thread(self.sync.cancel, batch_id)

    async def wait(
        self, batch_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
        on_progress: Callable[[Batch], None] | None = None,
    ) -> Batch:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = await self.retrieve(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch.status.is_terminal:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch.status.value} after {timeout:g}s")
            await asyncio.sleep(poll_s)

    async def download(self, batch_id: str, **kwargs: Any) -> tuple[Path, Path]:
        return await asyncio.to_thread(self.sync.download, batch_id, **kwargs)

    async def results(self, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return await asyncio.to_thread(self.sync.results, batch_id)

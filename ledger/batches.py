"""Batches, stored from and returned as the wire :class:`~tokenmill.wire.Batch`.

Every read is scoped to a tenant: another tenant's batch is :class:`NotFound`,
exactly like one that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from tokenmill.errors import LedgerError, NotFound
from tokenmill.wire import Batch, BatchStatus, RequestCounts

from .errors import translated
from .files import batch_file_id
from .models import BatchRow, FileRow, RequestRow
from .types import utc
from .upsert import insert_ignore

_TIMES = (
    "created_at",
    "expires_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _values(batch: Batch) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": batch.id,
        "tenant": batch.tenant,
        "status": batch.status,
        "endpoint": batch.endpoint,
        "completion_window": batch.completion_window,
        "input_file": batch.input_file,
        "output_file": batch.output_file,
        "error_file": batch.error_file,
        "total_requests": batch.request_counts.total,
        "completed_requests": batch.request_counts.completed,
        "failed_requests": batch.request_counts.failed,
        "webhook_url": batch.webhook_url,
        "metadata": batch.metadata,
    }
    for name in _TIMES:
        ts = getattr(batch, name)
        values[name] = None if ts is None else utc(ts)
    return values


def _epoch(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


def to_wire(row: BatchRow) -> Batch:
    """The wire :class:`Batch` of a stored row."""
    fields: dict[str, Any] = {name: _epoch(getattr(row, name)) for name in _TIMES}
    fields.update(
        id=row.id,
        tenant=row.tenant,
        endpoint=row.endpoint,
        status=row.status,
        input_file=row.input_file,
        completion_window=row.completion_window,
        request_counts=RequestCounts(
            total=row.total_requests,
            completed=row.completed_requests,
            failed=row.failed_requests,
        ),
        output_file=row.output_file,
        error_file=row.error_file,
        webhook_url=row.webhook_url,
        metadata=row.metadata_,
    )
    return Batch(**fields)


@translated
def upsert_batch(session: Session, batch: Batch) -> bool:
    """Insert a batch, or update the stored one to this snapshot of it.

    Parameters:
        session: the caller's transaction.
        batch: the batch as it is now.

    Raises:
        NotFound: the id belongs to another tenant's batch.
        LedgerError: the stored batch is in a terminal status and ``batch`` would change it.

    Returns:
        True if the batch is new.
    """
    values = _values(batch)
    if insert_ignore(session, BatchRow, values, ["id"]):
        return True
    row = session.execute(
        select(BatchRow)
        .where(BatchRow.id == batch.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    if row.tenant != batch.tenant:
        raise NotFound(f"batch {batch.id} not found")
    if row.status.is_terminal and batch.status != row.status:
        raise LedgerError(
            f"batch {batch.id} is {row.status.value}; it cannot become {batch.status.value}"
        )
    for key, value in values.items():
        if key not in ("id", "tenant", "created_at"):
            setattr(row, "metadata_" if key == "metadata" else key, value)
    session.flush()
    return False


@translated
def get_batch(session: Session, tenant: str, batch_id: str) -> Batch:
    """A tenant's batch.

    Raises:
        NotFound: no such batch for this tenant (another tenant's looks the same).
    """
    row = session.execute(
        select(BatchRow).where(BatchRow.id == batch_id, BatchRow.tenant == tenant)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"batch {batch_id} not found")
    return to_wire(row)


@translated
def list_batches(
    session: Session, tenant: str, *, limit: int = 20, after: str | None = None
) -> list[Batch]:
    """A tenant's batches, newest first (OpenAI ``GET /v1/batches`` paging).

    Parameters:
        tenant: whose batches.
        limit: at most this many.
        after: a batch id from a previous page; list the ones created before it.

    Raises:
        NotFound: ``after`` is not one of this tenant's batches.
    """
    query = select(BatchRow).where(BatchRow.tenant == tenant)
    if after is not None:
        cursor = session.execute(
            select(BatchRow.created_at).where(BatchRow.id == after, BatchRow.tenant == tenant)
        ).scalar_one_or_none()
        if cursor is None:
            raise NotFound(f"batch {after} not found")
        query = query.where(
            or_(
                BatchRow.created_at < cursor,
                and_(BatchRow.created_at == cursor, BatchRow.id < after),
            )
        )
    rows = session.execute(
        query.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit)
    ).scalars()
    return [to_wire(row) for row in rows]


#: statuses a batch runner still has work in
ACTIVE_STATUSES = (
    BatchStatus.validating,
    BatchStatus.in_progress,
    BatchStatus.finalizing,
    BatchStatus.cancelling,
)


@translated
def active_batches(session: Session) -> list[Batch]:
    """Every tenant's batches that are not in a terminal status, oldest first (for the
    batch runner; never shown to tenants)."""
    rows = session.execute(
        select(BatchRow)
        .where(BatchRow.status.in_(ACTIVE_STATUSES))
        .order_by(BatchRow.created_at, BatchRow.id)
    ).scalars()
    return [to_wire(row) for row in rows]


@translated
def lock_batch(session: Session, batch_id: str) -> Batch:
    """A batch, locked until the transaction ends, for a read-modify-write with
    :func:`upsert_batch` (services only: not tenant-scoped).

    Raises:
        NotFound: no such batch.
    """
    row = session.execute(
        select(BatchRow)
        .where(BatchRow.id == batch_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"batch {batch_id} not found")
    return to_wire(row)


@translated
def set_batch_input(
    session: Session, batch_id: str, *, input_file_id: str, output_expires_after: dict[str, Any] | None
) -> None:
    """Record the file a batch was made from and the output expiry asked for with it
    (OpenAI fields that the wire :class:`Batch` does not carry)."""
    session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id)
        .values(input_file_id=input_file_id, output_expires_after=output_expires_after)
    )


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """What OpenAI's batch object shows beyond the wire :class:`Batch`."""

    input_file_id: str | None
    #: the model of every accepted line, when they share one
    model: str | None
    #: the ledger's token counts of the batch's requests so far
    input_tokens: int
    output_tokens: int
    #: OpenAI's ``{"anchor", "seconds"}`` asked for at creation (None: never expire)
    output_expires_after: dict[str, Any] | None = None
    #: epoch seconds its output and error files expire (set when they are made)
    output_expires_at: float | None = None
    #: epoch seconds the cleanup removed them
    output_expired_at: float | None = None

    def output_expired(self, now: float) -> bool:
        """Whether the output and error files have expired by ``now`` (removed or not)."""
        return self.output_expired_at is not None or (
            self.output_expires_at is not None and self.output_expires_at <= now
        )


@translated
def batch_summaries(session: Session, batch_ids: Sequence[str]) -> dict[str, BatchSummary]:
    """The :class:`BatchSummary` of each of ``batch_ids`` that exists (services only:
    not tenant-scoped; give ids already checked against the tenant)."""
    if not batch_ids:
        return {}
    usage = {
        row.batch_id: row
        for row in session.execute(
            select(
                RequestRow.batch_id,
                func.coalesce(func.sum(RequestRow.prompt_tokens), 0).label("input_tokens"),
                func.coalesce(func.sum(RequestRow.completion_tokens), 0).label("output_tokens"),
                func.min(RequestRow.model).label("first_model"),
                func.max(RequestRow.model).label("last_model"),
            )
            .where(RequestRow.batch_id.in_(batch_ids))
            .group_by(RequestRow.batch_id)
        )
    }
    found: dict[str, BatchSummary] = {}
    for row in session.execute(
        select(
            BatchRow.id,
            BatchRow.input_file_id,
            BatchRow.output_expires_after,
            BatchRow.output_expires_at,
            BatchRow.output_expired_at,
        ).where(BatchRow.id.in_(batch_ids))
    ):
        u = usage.get(row.id)
        model = u.first_model if u is not None and u.first_model == u.last_model else None
        found[row.id] = BatchSummary(
            input_file_id=row.input_file_id,
            model=model,
            input_tokens=int(u.input_tokens) if u is not None else 0,
            output_tokens=int(u.output_tokens) if u is not None else 0,
            output_expires_after=row.output_expires_after,
            output_expires_at=_epoch(row.output_expires_at),
            output_expired_at=_epoch(row.output_expired_at),
        )
    return found


@translated
def record_output_expiry(session: Session, batch_id: str, files_at: float) -> float | None:
    """Set when a batch's output and error files expire, made at ``files_at`` (epoch
    seconds): OpenAI's ``output_expires_after`` counts from the files' creation. Call
    in the transaction that records the files.

    Returns:
        The expiry in epoch seconds; None for a batch without ``output_expires_after``.
    """
    after = session.execute(
        select(BatchRow.output_expires_after).where(BatchRow.id == batch_id)
    ).scalar_one_or_none()
    if not after:
        return None
    expires = files_at + float(after["seconds"])
    session.execute(
        update(BatchRow).where(BatchRow.id == batch_id).values(output_expires_at=utc(expires))
    )
    return expires


@dataclass(frozen=True, slots=True)
class ExpiredOutput:
    """An ended batch whose output and error files are due for removal."""

    batch_id: str
    tenant: str
    output_file: str | None
    error_file: str | None


@translated
def due_output_expiries(session: Session, now: float, *, limit: int = 100) -> list[ExpiredOutput]:
    """Every tenant's batches whose output files expired by ``now`` and are not yet
    removed, the longest expired first: one query on the
    ``(output_expired_at, output_expires_at)`` index (services only)."""
    rows = session.execute(
        select(BatchRow.id, BatchRow.tenant, BatchRow.output_file, BatchRow.error_file)
        .where(BatchRow.output_expired_at.is_(None), BatchRow.output_expires_at <= utc(now))
        .order_by(BatchRow.output_expires_at)
        .limit(limit)
    )
    return [ExpiredOutput(r.id, r.tenant, r.output_file, r.error_file) for r in rows]


@translated
def mark_outputs_expired(session: Session, batch_ids: Sequence[str], at: float) -> int:
    """Record that the cleanup removed these batches' output files (once: a batch
    marked already keeps its first time), and mark their Files API rows expired by
    ``at`` (whatever the clock of whoever reads them says).

    Returns:
        How many batches were marked now.
    """
    if not batch_ids:
        return 0
    done = session.execute(
        update(BatchRow)
        .where(BatchRow.id.in_(batch_ids), BatchRow.output_expired_at.is_(None))
        .values(output_expired_at=utc(at))
    )
    file_ids = [batch_file_id(b, kind) for b in batch_ids for kind in ("output", "error")]
    session.execute(
        update(FileRow)
        .where(FileRow.id.in_(file_ids), or_(FileRow.expires_at.is_(None), FileRow.expires_at > utc(at)))
        .values(expires_at=utc(at))
    )
    return int(getattr(done, "rowcount", 0) or 0)

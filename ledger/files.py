"""Files (OpenAI's ``file`` objects): metadata here, bytes at the row's ``path``.

Every read is scoped to a tenant: another tenant's file is :class:`NotFound`, exactly
like one that does not exist. Ids are the server's: ``file-<hex>``, random for
uploads (:func:`new_file_id`) and derived from the batch for a batch's own files
(:func:`batch_file_id`), so registering those is idempotent.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from tokenmill.errors import NotFound

from .errors import translated
from .models import FilePurpose, FileRow, FileStatus
from .types import utc
from .upsert import insert_ignore

__all__ = [
    "StoredFile",
    "add_file",
    "batch_file_id",
    "delete_file",
    "get_file",
    "list_files",
    "new_file_id",
]


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    tenant: str
    purpose: FilePurpose
    filename: str
    bytes: int
    #: epoch seconds
    created_at: float
    path: str
    status: FileStatus
    #: epoch seconds the file expires (a batch's output or error file made with
    #: ``output_expires_after``); None: never
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        """Whether the file has expired by ``now`` (its bytes are gone, or soon will be)."""
        return self.expires_at is not None and self.expires_at <= now


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def batch_file_id(batch_id: str, kind: Literal["input", "output", "error"]) -> str:
    """The id of a batch's own input, output or error file (the same on every call)."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


def _stored(row: FileRow) -> StoredFile:
    return StoredFile(
        id=row.id, tenant=row.tenant, purpose=row.purpose, filename=row.filename, bytes=row.bytes,
        created_at=row.created_at.timestamp(), path=row.path, status=row.status,
        expires_at=None if row.expires_at is None else row.expires_at.timestamp(),
    )  # fmt: skip


@translated
def add_file(session: Session, file: StoredFile) -> bool:
    """Record a file unless its id is recorded already.

    Returns:
        True if it was new.
    """
    values = {
        "id": file.id, "tenant": file.tenant, "purpose": file.purpose, "filename": file.filename,
        "bytes": file.bytes, "created_at": utc(file.created_at), "path": file.path,
        "status": file.status, "expires_at": None if file.expires_at is None else utc(file.expires_at),
    }  # fmt: skip
    return insert_ignore(session, FileRow, values, ["id"])


@translated
def get_file(session: Session, tenant: str, file_id: str) -> StoredFile:
    """A tenant's file.

    Raises:
        NotFound: no such file for this tenant (another tenant's looks the same).
    """
    row = session.execute(
        select(FileRow).where(FileRow.id == file_id, FileRow.tenant == tenant)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"file {file_id} not found")
    return _stored(row)


@translated
def list_files(
    session: Session,
    tenant: str,
    *,
    purpose: FilePurpose | None = None,
    limit: int = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    live_at: float | None = None,
) -> list[StoredFile]:
    """A tenant's files by creation time (OpenAI ``GET /v1/files`` paging).

    Parameters:
        purpose: only files of this purpose.
        after: a file id from a previous page; list the ones that follow it in ``order``.
        live_at: leave out the files expired by this time (epoch seconds).

    Raises:
        NotFound: ``after`` is not one of this tenant's files.
    """
    query = select(FileRow).where(FileRow.tenant == tenant)
    if live_at is not None:
        query = query.where(or_(FileRow.expires_at.is_(None), FileRow.expires_at > utc(live_at)))
    if purpose is not None:
        query = query.where(FileRow.purpose == purpose)
    if after is not None:
        cursor = session.execute(
            select(FileRow.created_at).where(FileRow.id == after, FileRow.tenant == tenant)
        ).scalar_one_or_none()
        if cursor is None:
            raise NotFound(f"file {after} not found")
        if order == "desc":
            query = query.where(or_(FileRow.created_at < cursor,
                                    and_(FileRow.created_at == cursor, FileRow.id < after)))
        else:
            query = query.where(or_(FileRow.created_at > cursor,
                                    and_(FileRow.created_at == cursor, FileRow.id > after)))
    if order == "desc":
        query = query.order_by(FileRow.created_at.desc(), FileRow.id.desc())
    else:
        query = query.order_by(FileRow.created_at, FileRow.id)
    rows = session.execute(query.limit(limit)).scalars()
    return [_stored(row) for row in rows]


@translated
def delete_file(session: Session, tenant: str, file_id: str) -> StoredFile:
    """Forget a tenant's file; the caller removes its bytes once this commits.

    Raises:
        NotFound: no such file for this tenant.
    """
    found = get_file(session, tenant, file_id)
    session.execute(delete(FileRow).where(FileRow.id == file_id, FileRow.tenant == tenant))
    return found

"""The Files API, OpenAI's shapes: ``POST /v1/files`` (multipart, ``purpose=batch``),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content`` and
``DELETE /v1/files/{id}``.

An upload is parsed as it arrives (python-multipart's streaming parser) and its bytes
go straight to a temporary file in the files directory, with the size limit
(``batch.max_bytes``) enforced while reading: past it the answer is 413 and the
temporary file is removed, so a 200 MB upload never sits in memory and a refused one
leaves nothing behind. A complete upload is fsynced, renamed to its id and recorded in
the ledger. Batches' output and error files are files here too (the batch runner
records them). Every id is scoped to the caller's tenant; another tenant's answers 404
exactly as an unknown one does.

A batch's output and error files made with ``output_expires_after`` show their
``expires_at``; from then on they are gone from the list, and reading one (its object
or its content) answers 404 ``file_expired`` saying when it expired (the batch runner
removes the bytes soon after). Deleting one still works.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from ..errors import NotFound
from ..ledger import (
    FilePurpose,
    FileStatus,
    StoredFile,
    add_file,
    delete_file,
    get_file,
    list_files,
    new_file_id,
    transaction,
)
from .auth import tenant_of
from .errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["file_json", "router"]

router = APIRouter(prefix="/v1/files")

#: room for the multipart framing and the small fields around the file's bytes (a body
#: declared longer than the limit and this is refused before it is read)
FRAMING_BYTES = 1 << 20
#: the most bytes of a form field other than the file, and the most such fields
FIELD_BYTES, MAX_FIELDS = 4096, 16
#: the upload goes to disk in writes of about this size
WRITE_BYTES = 1 << 20
#: the only purpose a tenant uploads for
UPLOAD_PURPOSE = FilePurpose.batch
_PURPOSES = frozenset(p.value for p in FilePurpose)


def file_json(f: StoredFile) -> dict[str, Any]:
    """OpenAI's ``file`` object."""
    return {
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at),
        "filename": f.filename, "purpose": f.purpose.value, "status": f.status.value,
        "expires_at": None if f.expires_at is None else int(f.expires_at), "status_details": None,
    }  # fmt: skip


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is over the limit of {limit} bytes.", param="file", code="file_too_large")


def _check_purpose(purpose: str) -> None:
    if purpose != UPLOAD_PURPOSE:
        raise ApiError(400, f"purpose: only '{UPLOAD_PURPOSE}' files can be uploaded, got {purpose!r}",
                       param="purpose", code="invalid_value")


def _filename(raw: bytes | None) -> str:
    """The client's file name without any directory part or control characters."""
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:255] or "file"


class _Form:
    """python-multipart's callbacks for one upload: the ``file`` part's bytes are queued
    for the disk as they arrive (past ``limit``: 413), every other field is kept (small);
    ``purpose`` is checked as soon as it is complete, so a wrong one stops the upload."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, str] = {}
        #: the file's name as the client gave it; None until the ``file`` part begins
        self.filename: str | None = None
        self.size = 0
        self.ended = False
        self._queued: list[bytes] = []
        self.queued_bytes = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._in_file = False
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }  # fmt: skip

    def take(self) -> bytes:
        """The file bytes queued since the last call."""
        data = b"".join(self._queued)
        self._queued.clear()
        self.queued_bytes = 0
        return data

    def _part_begin(self) -> None:
        self._disposition, self._value = b"", bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_field).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._in_file = name == "file"
        if self._in_file:
            if self.filename is not None:
                raise ApiError(400, "file: give one file", param="file", code="invalid_value")
            self.filename = _filename(params.get(b"filename"))
        elif name in self.fields or len(self.fields) >= MAX_FIELDS:
            raise ApiError(400, f"{name or 'form'}: too many or repeated form fields",
                           param=name or None, code="invalid_value")
        self._name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.size += end - start
            if self.size > self.limit:
                raise _too_large(self.limit)
            self._queued.append(data[start:end])
            self.queued_bytes += end - start
            return
        self._value += data[start:end]
        if len(self._value) > FIELD_BYTES:
            raise ApiError(400, f"{self._name}: over {FIELD_BYTES} bytes", param=self._name,
                           code="invalid_value")

    def _part_end(self) -> None:
        if self._in_file:
            return
        value = self._value.decode("utf-8", "replace")
        self.fields[self._name] = value
        if self._name == "purpose":
            _check_purpose(value)

    def _end(self) -> None:
        self.ended = True


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, "The request must be multipart/form-data with a 'file' and a 'purpose'.",
                       code="invalid_content_type")
    return boundary


def _write(fh: IO[bytes], data: bytes) -> None:
    fh.write(data)


def _seal(fh: IO[bytes], data: bytes) -> None:
    """The last bytes, then the whole file to disk, closed."""
    with fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _place(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_ledger(request: Request, work: Callable[[Any], Any]) -> Any:
    with transaction(request.app.state.backend.ledger) as session:
        return work(session)


async def _ledger(request: Request, work: Callable[[Any], Any]) -> Any:
    """``work(session)`` in one ledger transaction, off the event loop."""
    return await asyncio.to_thread(_in_ledger, request, work)


@router.post("")
async def create_file(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    settings = request.app.state.settings
    limit: int = settings.batch.max_bytes
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + FRAMING_BYTES:
        raise _too_large(limit)
    files_dir: Path = settings.files_dir.resolve()
    await asyncio.to_thread(files_dir.mkdir, parents=True, exist_ok=True)
    file_id = new_file_id()
    tmp, final = files_dir / f".{file_id}.part", files_dir / file_id
    form = _Form(limit)
    parser = MultipartParser(boundary, form.callbacks())
    fh: IO[bytes] = await asyncio.to_thread(tmp.open, "xb")
    placed = False
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + FRAMING_BYTES:
                raise _too_large(limit)
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise ApiError(400, f"The multipart body is malformed: {exc}", code="invalid_multipart") from None
            if form.queued_bytes >= WRITE_BYTES:
                await asyncio.to_thread(_write, fh, form.take())
        if not form.ended:
            raise ApiError(400, "The multipart body ended before its closing boundary.", code="invalid_multipart")
        if form.filename is None:
            raise ApiError(400, "file: required", param="file", code="missing_required_parameter")
        if "purpose" not in form.fields:
            raise ApiError(400, "purpose: required", param="purpose", code="missing_required_parameter")
        await asyncio.to_thread(_seal, fh, form.take())
        await asyncio.to_thread(_place, tmp, final)
        placed = True
        stored = StoredFile(
            id=file_id, tenant=tenant, purpose=UPLOAD_PURPOSE, filename=form.filename, bytes=form.size,
            created_at=time.time(), path=str(final), status=FileStatus.uploaded,
        )  # fmt: skip
        await _ledger(request, lambda s: add_file(s, stored))
    except BaseException as exc:
        await asyncio.to_thread(_discard, fh, tmp, final if placed else None)
        if isinstance(exc, ClientDisconnect):
            raise ApiError(499, "The client closed the request.", code="client_closed") from None
        raise
    return JSONResponse(file_json(stored))


def _discard(fh: IO[bytes], tmp: Path, final: Path | None) -> None:
    fh.close()
    tmp.unlink(missing_ok=True)
    if final is not None:
        final.unlink(missing_ok=True)


@router.get("")
async def list_tenant_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(default=10_000, ge=1, le=10_000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    tenant: str = Depends(tenant_of),
) -> Response:
    found: list[StoredFile] = []  # stays empty for a purpose that no file here has
    if purpose is None or purpose in _PURPOSES:
        wanted = None if purpose is None else FilePurpose(purpose)
        try:
            found = await _ledger(request, lambda s: list_files(
                s, tenant, purpose=wanted, limit=limit + 1, after=after, order=order, live_at=time.time()))
        except NotFound:
            raise ApiError.not_found("file", after or "", param="after") from None
    page = found[:limit]
    return JSONResponse({
        "object": "list", "data": [file_json(f) for f in page],
        "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
        "has_more": len(found) > limit,
    })  # fmt: skip


async def _owned(request: Request, tenant: str, file_id: str) -> StoredFile:
    try:
        found: StoredFile = await _ledger(request, lambda s: get_file(s, tenant, file_id))
    except NotFound:
        raise ApiError.not_found("file", file_id, param="file_id") from None
    return found


async def _live(request: Request, tenant: str, file_id: str) -> StoredFile:
    """The tenant's file, unless it has expired (404 ``file_expired``, saying when)."""
    found = await _owned(request, tenant, file_id)
    if found.expires_at is not None and found.expired(time.time()):
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.expires_at))
        raise ApiError(404, f"File '{file_id}' expired at {at} (its batch's output_expires_after); "
                       "its content is gone.", param="file_id", code="file_expired")
    return found


@router.get("/{file_id}")
async def retrieve_file(request: Request, file_id: str, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(file_json(await _live(request, tenant, file_id)))


@router.get("/{file_id}/content")
async def file_content(request: Request, file_id: str, tenant: str = Depends(tenant_of)) -> Response:
    found = await _live(request, tenant, file_id)
    if not await asyncio.to_thread(os.path.isfile, found.path):
        raise ApiError.not_found("file", file_id, param="file_id")
    return FileResponse(found.path, media_type="application/octet-stream", filename=found.filename)


@router.delete("/{file_id}")
async def remove_file(request: Request, file_id: str, tenant: str = Depends(tenant_of)) -> Response:
    try:
        gone: StoredFile = await _ledger(request, lambda s: delete_file(s, tenant, file_id))
    except NotFound:
        raise ApiError.not_found("file", file_id, param="file_id") from None
    await asyncio.to_thread(Path(gone.path).unlink, missing_ok=True)
    return JSONResponse({"id": gone.id, "object": "file", "deleted": True})

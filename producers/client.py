"""The Python client: ``AsyncClient`` and its synchronous twin ``Client``, over HTTP.

The client talks to the gateway (the one door tenants use) and needs only its base URL
and an API key; it never reads the server's settings nor touches Kafka, Redis or the
ledger. Requests go through tokenmill's request API (``/v1/tokenmill/requests``): the
gateway checks the key, stamps the tenant, makes the ids and validates every request
again. Batches go through the OpenAI Files and Batches API (``/v1/files``,
``/v1/batches``).

Where it connects:

* ``base_url``, else ``$TOKENMILL_BASE_URL``, else the gateway of the local stack
  that ``tokenmill up`` recorded in ``$TOKENMILL_HOME/stack.json`` (home default
  ``.tokenmill``);
* ``api_key``, else ``$TOKENMILL_API_KEY``; or, instead of a key and on the local
  stack only, ``tenant="alpha"``, which stands for that tenant's demo key (the example
  config's ``tm-alpha-demo-key``) — a name is never a credential anywhere else.

Arguments are validated here first, so a bad one raises
:class:`~tokenmill.errors.ValidationError` naming the field without a round trip.
HTTP errors become tokenmill errors: 400 → ``ValidationError`` (``field`` = the
OpenAI ``param``), 401/403 → ``AuthenticationError``, 404 → ``NotFound`` (another
tenant's id answers exactly as an unknown one), 429 → ``RateLimited`` /
``QuotaExceeded`` (with ``retry_after``), 5xx and connection failures → ``StackError``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict

from .. import __version__, loops, wire
from ..errors import (
    AuthenticationError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    StackError,
    TokenmillError,
    ValidationError,
)
from .bodies import SAMPLING_PARAMS, validate_body
from .requests import deadline_of

__all__ = [
    "DEMO_KEYS",
    "AsyncBatches",
    "AsyncClient",
    "Batch",
    "Batches",
    "Client",
    "Connection",
    "Handle",
    "PartialOutput",
    "PreparedRequest",
    "RequestTimeout",
    "connection",
    "local_gateway",
]

T = TypeVar("T")

#: the local stack's demo keys (``config/example.toml``), for ``tenant=`` there
DEMO_KEYS = {"alpha": "tm-alpha-demo-key", "beta": "tm-beta-demo-key", "gamma": "tm-gamma-demo-key"}
#: the gateway's limit on requests in one submission
MAX_PER_CALL = 1000
#: the gateway's limit on one long poll for a result
MAX_WAIT_S = 60.0
#: the gateway's limit on one event stream
MAX_STREAM_S = 3600.0
#: keep-alive connections to the gateway; calls beyond them wait for a free one
MAX_CONNECTIONS = 64
#: results :meth:`AsyncClient.map` waits for at once (each holds a connection)
MAP_CONCURRENCY = 48
#: on top of a long poll's own wait: the gateway answering it
_SLACK_S = 30.0


class RequestTimeout(TokenmillError):
    """No result within the time asked for; the request may still complete."""


# -- where and as whom ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """The client's settings: the gateway's base URL and the API key (if any)."""

    base_url: str
    api_key: str | None

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        return f"Connection(base_url={self.base_url!r}, api_key={'***' if self.api_key else None})"


def local_gateway(home: str | Path | None = None) -> str | None:
    """The address of the local stack's gateway, if ``tokenmill up`` started one in
    ``home`` (default ``$TOKENMILL_HOME``, else ``.tokenmill``) and it is running."""
    from ..stack import state

    recorded = state.load(Path(home or os.environ.get("TOKENMILL_HOME") or ".tokenmill"))
    record = recorded.service("gateway") if recorded else None
    return record.address if record is not None and record.alive() else None


def connection(api_key: str | None = None, *, base_url: str | None = None,
               tenant: str | None = None) -> Connection:
    """Resolve the base URL and key (see the module docstring).

    Raises:
        ValidationError: ``tenant`` given with a key, off the local stack, or unknown.
        StackError: no base URL given and no local stack running.
    """
    base = base_url or os.environ.get("TOKENMILL_BASE_URL") or local_gateway()
    if base is None:
        raise StackError("no gateway: pass base_url, set TOKENMILL_BASE_URL, or run `tokenmill up`")
    base = base.rstrip("/")
    if tenant is None:
        return Connection(base, api_key or os.environ.get("TOKENMILL_API_KEY") or None)
    if api_key is not None:
        raise ValidationError("tenant: give an API key or a tenant name, not both", field="tenant")
    # A name is no credential: it only stands for the published demo key, and only
    # where that key can mean anything — the local stack this machine started.
    if base != local_gateway():
        raise ValidationError(
            f"tenant: a tenant name works only with the local stack's gateway (tokenmill up), "
            f"not {base}; give an API key (or TOKENMILL_API_KEY)", field="tenant")
    if tenant not in DEMO_KEYS:
        raise ValidationError(f"tenant: no demo key for {tenant!r} (known: {', '.join(DEMO_KEYS)})",
                              field="tenant")
    return Connection(base, DEMO_KEYS[tenant])


# -- what is sent and what comes back ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request validated here, ready for :meth:`AsyncClient.submit_many` (what
    :meth:`AsyncClient.build` returns). The gateway validates it again."""

    endpoint: wire.Endpoint
    body: dict[str, Any]
    priority: wire.Priority = wire.Priority.standard
    #: seconds from now (below 10⁹) or epoch seconds
    deadline: float | None = None
    webhook: str | None = None

    def payload(self) -> dict[str, Any]:
        """The request as the gateway's request API takes it."""
        out: dict[str, Any] = {"endpoint": self.endpoint.value, "body": self.body,
                               "priority": self.priority.value}
        if self.deadline is not None:
            out["deadline"] = self.deadline
        if self.webhook is not None:
            out["webhook"] = self.webhook
        return out


@dataclass(frozen=True, slots=True)
class Handle:
    """What ``submit`` returns: enough to fetch, stream or cancel the request."""

    request_id: str
    model: str
    priority: wire.Priority


def build(
    model: str,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: str | list[str] | None = None,
    input: str | list[str] | list[int] | list[list[int]] | None = None,
    max_tokens: int | None = None,
    priority: wire.Priority | str = wire.Priority.standard,
    deadline: float | datetime | None = None,
    webhook: str | None = None,
    stream: bool = False,
    **sampling: Any,
) -> PreparedRequest:
    """Validate the arguments of ``submit`` into a :class:`PreparedRequest`, with
    nothing but the request itself (no server settings: which models exist is the
    gateway's to say). ``messages`` makes a chat request, ``prompt`` a completion,
    ``input`` an embeddings request (its options: ``encoding_format``, ``dimensions``).

    Raises:
        ValidationError: naming the offending field.
    """
    if input is not None:
        return _embeddings(model, input, priority, deadline, webhook, messages, prompt, max_tokens, stream,
                           sampling)
    prio = _priority(priority)
    unknown = sorted(set(sampling) - SAMPLING_PARAMS)
    if unknown:
        raise ValidationError(f"{unknown[0]}: unknown parameter", field=unknown[0])
    if (messages is None) == (prompt is None):
        raise ValidationError("messages/prompt: give exactly one of them", field="messages")
    body: dict[str, Any] = {"model": model, **sampling}
    if messages is not None:
        # Copied as given: validate_body says what is wrong with a bad one.
        body["messages"] = [dict(m) if isinstance(m, Mapping) else m for m in messages] \
            if isinstance(messages, (list, tuple)) else messages
        endpoint = wire.Endpoint.chat_completions
    else:
        body["prompt"] = prompt
        endpoint = wire.Endpoint.completions
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True  # workers publish text deltas for streaming requests
    validate_body(body, endpoint)
    _encode(body)  # what pydantic lets through may still be no JSON (NaN in response_format)
    deadline_of(deadline, time.time())  # validates; relative seconds are sent as given
    return PreparedRequest(
        endpoint=endpoint, body=body, priority=prio,
        deadline=deadline.timestamp() if isinstance(deadline, datetime) else deadline,
        webhook=_check_webhook(webhook) if webhook is not None else None,
    )


def _priority(priority: wire.Priority | str) -> wire.Priority:
    try:
        return wire.Priority(priority)
    except ValueError:
        raise ValidationError(
            f"priority: must be one of {', '.join(p.value for p in wire.Priority)}, got {priority!r}",
            field="priority",
        ) from None


#: the options of an embeddings request besides model and input
EMBEDDING_OPTIONS = frozenset({"encoding_format", "dimensions", "user"})


def _embeddings(
    model: str, value: Any, priority: wire.Priority | str, deadline: float | datetime | None,
    webhook: str | None, messages: Any, prompt: Any, max_tokens: int | None, stream: bool,
    options: Mapping[str, Any],
) -> PreparedRequest:
    """:func:`build` for ``input``: an embeddings request."""
    if messages is not None or prompt is not None:
        raise ValidationError("messages/prompt/input: give exactly one of them", field="input")
    if max_tokens is not None or stream:
        field = "max_tokens" if max_tokens is not None else "stream"
        raise ValidationError(f"{field}: an embeddings request generates no tokens", field=field)
    unknown = sorted(set(options) - EMBEDDING_OPTIONS)
    if unknown:
        raise ValidationError(f"{unknown[0]}: unknown parameter of an embeddings request", field=unknown[0])
    prio = _priority(priority)
    body: dict[str, Any] = {"model": model, "input": value, **options}
    validate_body(body, wire.Endpoint.embeddings)
    deadline_of(deadline, time.time())
    return PreparedRequest(
        endpoint=wire.Endpoint.embeddings, body=body, priority=prio,
        deadline=deadline.timestamp() if isinstance(deadline, datetime) else deadline,
        webhook=_check_webhook(webhook) if webhook is not None else None,
    )


def _check_webhook(url: object) -> str:
    """An http(s) URL with a host; which targets are allowed is the gateway's policy."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"webhook: must be an http(s) URL, got {url!r}", field="webhook")
    return str(url)


def _encode(value: Any) -> bytes:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"body: cannot be sent as JSON: {exc}", field="body") from None


def _result(data: Mapping[str, Any]) -> wire.Result:
    try:
        return wire.Result.model_validate(data)
    except pydantic.ValidationError as exc:
        raise StackError(f"the gateway answered an unreadable result: {exc}") from None


def error_of(resp: httpx.Response) -> TokenmillError:
    """The tokenmill error for an HTTP error answer (its body already read)."""
    message, param, code = f"HTTP {resp.status_code}", None, None
    try:
        err = resp.json()["error"]
        message, param, code = str(err.get("message") or message), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = resp.text[:300] or message
    status = resp.status_code
    if status in (401, 403):
        return AuthenticationError(message)
    if status == 404:
        return NotFound(message)
    if status == 429:
        try:
            retry_after: float | None = float(resp.headers.get("retry-after", ""))
        except ValueError:
            retry_after = None
        kind = QuotaExceeded if code == "insufficient_quota" else RateLimited
        return kind(message, retry_after=retry_after, code=code)
    if status >= 500:
        return StackError(f"gateway: HTTP {status}: {message}")
    return ValidationError(message, field=param)


def _rid(handle: Handle | str) -> str:
    return quote(handle if isinstance(handle, str) else handle.request_id, safe="")


# -- batches ------------------------------------------------------------------------------


class BatchCounts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    """A batch as the gateway answers it: OpenAI's batch object (fields this model does
    not name are kept as extras)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    object: str = "batch"
    endpoint: str
    status: wire.BatchStatus
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: BatchCounts = BatchCounts()
    metadata: dict[str, str] | None = None
    errors: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class PartialOutput:
    """A page of a batch's progressive output (:meth:`AsyncBatches.partial`)."""

    #: ``(kind, row bytes)``: ``"output"`` or ``"error"``, and the row exactly as the
    #: final output or error file has it (with its newline)
    lines: list[tuple[str, bytes]]
    #: the cursor to pass as ``after`` to read on
    next_after: int
    #: more rows are recorded already (read on at once)
    has_more: bool
    #: the batch's status, read before the rows
    status: wire.BatchStatus

    @property
    def ended(self) -> bool:
        """The batch had ended before these rows were read: once ``has_more`` is
        false too, every row of its output and error files has been read."""
        return self.status.is_terminal

    @property
    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        """``(kind, row)`` of each line, parsed."""
        return [(kind, json.loads(data)) for kind, data in self.lines]


def _batch(data: Any) -> Batch:
    try:
        return Batch.model_validate(data)
    except pydantic.ValidationError as exc:
        raise StackError(f"the gateway answered an unreadable batch: {exc}") from None


BatchFile = str | Path | bytes | IO[bytes]


class AsyncBatches:
    """The tenant's batches through the Files and Batches API (``client.batches``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        file: BatchFile,
        *,
        completion_window: str = "24h",
        endpoint: wire.Endpoint | str | None = wire.Endpoint.chat_completions,
        metadata: Mapping[str, str] | None = None,
        model: str | None = None,
        webhook: str | None = None,
    ) -> Batch:
        """Upload a JSONL batch file (``POST /v1/files``, purpose ``batch``) and create
        a batch of it (``POST /v1/batches``).

        Parameters:
            file: a path, the file's bytes, or a file object opened in binary mode.
            completion_window: how long it may run (``24h``).
            endpoint: the url every line names; None (tokenmill's extension): lines may
                mix endpoints, as ``vllm run-batch`` files may.
            metadata: up to 16 string pairs kept with the batch.
            model: tokenmill's extension: the model of lines whose body names none.
            webhook: tokenmill's extension: URL notified when the batch ends.

        Raises:
            ValidationError: an argument or the file is refused.
        """
        if metadata is not None and (len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        )):
            raise ValidationError("metadata: at most 16 string keys and values", field="metadata")
        if webhook is not None:
            _check_webhook(webhook)
        try:
            url = None if endpoint is None else wire.Endpoint(endpoint).value
        except ValueError:
            raise ValidationError(f"endpoint: must be one of {', '.join(wire.Endpoint)}, got {endpoint!r}",
                                  field="endpoint") from None
        uploaded = await self._upload(file)
        body: dict[str, Any] = {"input_file_id": uploaded, "completion_window": completion_window}
        if url is not None:
            body["endpoint"] = url
        for key, value in (("metadata", metadata), ("model", model), ("webhook", webhook)):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        resp = await self._client._request("POST", "/v1/batches", json=body)
        return _batch(resp.json())

    async def _upload(self, file: BatchFile) -> str:
        if isinstance(file, io.TextIOBase):
            raise ValidationError("file: open it in binary mode ('rb')", field="file")
        if isinstance(file, (str, Path)):
            path = Path(file)
            try:
                fh = path.open("rb")
            except OSError as exc:
                raise ValidationError(f"file: cannot read {path}: {exc.strerror}", field="file") from None
            with fh:
                return await self._post_file(path.name, fh)
        name = "batch.jsonl" if isinstance(file, bytes) else Path(getattr(file, "name", "batch.jsonl")).name
        return await self._post_file(name, file)

    async def _post_file(self, name: str, content: bytes | IO[bytes]) -> str:
        resp = await self._client._request(
            "POST", "/v1/files", data={"purpose": "batch"},
            files={"file": (name, content, "application/jsonl")},
        )
        return str(resp.json()["id"])

    async def retrieve(self, batch_id: str) -> Batch:
        """The batch as it is now (NotFound: no such batch of this tenant)."""
        return _batch((await self._client._request("GET", f"/v1/batches/{quote(batch_id, safe='')}")).json())

    async def cancel(self, batch_id: str) -> Batch:
        """Ask for the batch to be cancelled; results so far are kept."""
        path = f"/v1/batches/{quote(batch_id, safe='')}/cancel"
        return _batch((await self._client._request("POST", path)).json())

    async def wait(self, batch_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
                   on_progress: Callable[[Batch], None] | None = None) -> Batch:
        """Poll until the batch ends; ``on_progress`` sees every poll.

        Raises:
            TimeoutError: not ended within ``timeout`` seconds.
        """
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

    async def download(self, batch_id: str, *, output: str | Path | None = None,
                       errors: str | Path | None = None) -> tuple[Path, Path]:
        """Write an ended batch's output and error files (default
        ``<batch id>_output.jsonl`` / ``_errors.jsonl`` here; an empty file where the
        batch has none); returns their paths.

        Raises:
            ValidationError: the batch has not ended yet.
        """
        batch = await self._ended(batch_id)
        found = []
        for file_id, dst in ((batch.output_file_id, output or f"{batch_id}_output.jsonl"),
                             (batch.error_file_id, errors or f"{batch_id}_errors.jsonl")):
            path = Path(dst)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as fh:
                if file_id is not None:
                    await self._client._download(file_id, fh)
            found.append(path)
        return found[0], found[1]

    async def partial(self, batch_id: str, *, after: int = 0, limit: int | None = None) -> PartialOutput:
        """The rows of the batch's output and error files recorded so far, while it runs
        or after it ended (tokenmill's ``GET /v1/batches/{id}/output``): from cursor
        ``after`` (the rows already read), at most ``limit`` (the gateway's default
        1,000, at most 10,000). The invalid lines come first, then the lines in the order
        they finished, each once; a read is a prefix of every later one, and once the
        batch has ended they are exactly its files' rows.

        Raises:
            NotFound: no such batch of this tenant, or its output has expired.
        """
        params: dict[str, Any] = {"after": after}
        if limit is not None:
            params["limit"] = limit
        resp = await self._client._request("GET", f"/v1/batches/{quote(batch_id, safe='')}/output", params=params)
        try:
            h = resp.headers
            lines = [
                ("output" if json.loads(raw).get("error") is None else "error", raw + b"\n")
                for raw in resp.content.split(b"\n") if raw.strip()
            ]  # fmt: skip
            return PartialOutput(lines, int(h["x-tokenmill-next-after"]), h["x-tokenmill-has-more"] == "true",
                                 wire.BatchStatus(h["x-tokenmill-batch-status"]))  # fmt: skip
        except (KeyError, ValueError, AttributeError) as exc:
            raise StackError(f"the gateway answered an unreadable batch output: {exc!r}") from None

    async def results(self, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """An ended batch's output and error entries."""
        batch = await self._ended(batch_id)
        out: list[list[dict[str, Any]]] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            buf = io.BytesIO()
            if file_id is not None:
                await self._client._download(file_id, buf)
            out.append([json.loads(line) for line in buf.getvalue().splitlines() if line.strip()])
        return out[0], out[1]

    async def _ended(self, batch_id: str) -> Batch:
        batch = await self.retrieve(batch_id)
        if not batch.status.is_terminal:
            raise ValidationError(
                f"batch {batch_id} is {batch.status.value}: its files are written when it ends",
                field="batch_id",
            )
        return batch

    async def list(self, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        """The tenant's batches, newest first; ``after`` pages on from a batch id."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        resp = await self._client._request("GET", "/v1/batches", params=params)
        return [_batch(b) for b in resp.json()["data"]]


# -- the clients ----------------------------------------------------------------------------


class AsyncClient:
    """Submit requests and get their results through the gateway, from asyncio code.

    Parameters:
        api_key: the tenant's key (default ``$TOKENMILL_API_KEY``).
        base_url: the gateway (default ``$TOKENMILL_BASE_URL``, else the local stack's).
        tenant: on the local stack only, a tenant name for its demo key.
        timeout: seconds for one HTTP call (long polls and streams add their own wait).
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None,
                 tenant: str | None = None, timeout: float = 60.0) -> None:
        self.connection = connection(api_key, base_url=base_url, tenant=tenant)
        headers = {"User-Agent": f"tokenmill-python/{__version__}"}
        if self.connection.api_key:
            headers["Authorization"] = f"Bearer {self.connection.api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.connection.base_url, headers=headers,
            # pool=None: a call beyond MAX_CONNECTIONS waits for a free one instead of failing
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )

    @property
    def base_url(self) -> str:
        return self.connection.base_url

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    @cached_property
    def batches(self) -> AsyncBatches:
        """This tenant's batches: ``create``, ``retrieve``, ``list``, ``cancel``, ``wait``,
        ``download``, ``results``, ``partial``."""
        return AsyncBatches(self)

    # -- HTTP ------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StackError(f"gateway {self.base_url}: {type(exc).__name__}: {exc}") from exc
        if resp.is_error:
            raise error_of(resp)
        return resp

    async def _download(self, file_id: str, sink: IO[bytes]) -> None:
        """Copy a file's content (``GET /v1/files/{id}/content``) into ``sink``."""
        try:
            async with self._http.stream("GET", f"/v1/files/{quote(file_id, safe='')}/content") as resp:
                if resp.is_error:
                    await resp.aread()
                    raise error_of(resp)
                async for chunk in resp.aiter_bytes():
                    sink.write(chunk)
        except httpx.HTTPError as exc:
            raise StackError(f"gateway {self.base_url}: {type(exc).__name__}: {exc}") from exc

    # -- submitting ------------------------------------------------------------------

    def build(self, model: str, **kwargs: Any) -> PreparedRequest:
        """Validate a request without sending it (raises ValidationError); the
        arguments are :meth:`submit`'s."""
        return build(model, **kwargs)

    async def submit(self, model: str, **kwargs: Any) -> Handle:
        """Validate and enqueue one request; returns once the gateway accepted it
        (the broker has it).

        Parameters:
            model: a model the gateway serves.
            kwargs: ``messages`` or ``prompt``; ``max_tokens``, ``priority``
                (interactive|standard|batch), ``deadline`` (seconds from now, or a
                datetime), ``webhook`` (URL), ``stream`` (publish deltas for
                :meth:`stream`), and OpenAI sampling parameters.

        Raises:
            ValidationError: naming the offending field (here: nothing was sent).
            NotFound: the gateway serves no such model.
        """
        req = self.build(model, **kwargs)
        resp = await self._request("POST", "/v1/tokenmill/requests", content=_encode(req.payload()),
                                   headers={"Content-Type": "application/json"})
        return _handle(resp.json())

    async def submit_many(self, requests: Iterable[PreparedRequest]) -> list[Handle]:
        """Enqueue built requests, up to :data:`MAX_PER_CALL` a call; returns their
        handles in order once the gateway accepted all. A refused call raises, and
        the calls before it stay accepted."""
        reqs = list(requests)
        handles: list[Handle] = []
        for start in range(0, len(reqs), MAX_PER_CALL):
            payload = {"requests": [r.payload() for r in reqs[start : start + MAX_PER_CALL]]}
            resp = await self._request("POST", "/v1/tokenmill/requests", content=_encode(payload),
                                       headers={"Content-Type": "application/json"})
            handles += [_handle(item) for item in resp.json()["data"]]
        return handles

    # -- results ---------------------------------------------------------------------

    async def result(self, handle: Handle | str, timeout: float = 600.0) -> wire.Result:
        """Wait for the request's result (long polls of at most :data:`MAX_WAIT_S`).

        Raises:
            RequestTimeout: none within ``timeout`` seconds.
            NotFound: no such request of this tenant.
        """
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(deadline - time.monotonic(), MAX_WAIT_S))
            found = await self._get_result(handle, wait)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"request {_rid(handle)}: no result within {timeout:g}s")

    async def poll(self, handle: Handle | str) -> wire.Result | None:
        """The result if there is one yet."""
        return await self._get_result(handle, 0.0)

    async def _get_result(self, handle: Handle | str, wait: float) -> wire.Result | None:
        resp = await self._request("GET", f"/v1/tokenmill/requests/{_rid(handle)}",
                                   params={"wait": round(wait, 3)}, timeout=wait + _SLACK_S)
        data = resp.json()
        return None if data.get("status") == "pending" else _result(data)

    async def stream(self, handle: Handle | str, timeout: float = 600.0) -> AsyncGenerator[str, None]:
        """Yield text deltas as the engine produces them (submit with ``stream=True``);
        ends with the request, or after ``timeout`` seconds (at most an hour)."""
        timeout = min(timeout, MAX_STREAM_S)
        path = f"/v1/tokenmill/requests/{_rid(handle)}/events"
        try:
            async with self._http.stream("GET", path, params={"timeout": timeout},
                                         timeout=httpx.Timeout(timeout + _SLACK_S, pool=None)) as resp:
                if resp.is_error:
                    await resp.aread()
                    raise error_of(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    item = json.loads(data)
                    if item.get("type") == "end":
                        return
                    if item.get("type") == "error":  # a service was lost mid-stream
                        err = item.get("error") or {}
                        raise StackError(f"gateway: {err.get('message') or 'the stream failed'}")
                    if item.get("type") == "delta" and item.get("text"):
                        yield item["text"]
        except httpx.HTTPError as exc:
            raise StackError(f"gateway {self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def cancel(self, handle: Handle | str) -> None:
        """Cancel a queued or running request; its result says ``cancelled``."""
        await self._request("POST", f"/v1/tokenmill/requests/{_rid(handle)}/cancel")

    async def map(
        self,
        model: str,
        items: Iterable[Mapping[str, Any]],
        *,
        timeout: float = 3600.0,
        progress: bool = False,
    ) -> list[wire.Result]:
        """Submit many requests (each a dict of :meth:`submit` arguments; all are
        validated before any is sent) and return their results in order, within
        ``timeout`` seconds in all, with an optional Rich progress bar."""
        handles = await self.submit_many([self.build(model, **dict(item)) for item in items])
        deadline = time.monotonic() + timeout
        gate = asyncio.Semaphore(MAP_CONCURRENCY)

        async def one(h: Handle, tick: Callable[[], None]) -> wire.Result:
            async with gate:
                r = await self.result(h, max(0.0, deadline - time.monotonic()))
            tick()
            return r

        async def run(tick: Callable[[], None]) -> list[wire.Result]:
            tasks = [asyncio.ensure_future(one(h, tick)) for h in handles]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:  # after a failure, stop waiting for the rest
                    t.cancel()

        if not progress:
            return await run(lambda: None)
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task("requests", total=len(handles))
            return await run(lambda: bar.advance(task))


def _handle(data: Mapping[str, Any]) -> Handle:
    return Handle(str(data["id"]), str(data["model"]), wire.Priority(data["priority"]))


class Batches:
    """:class:`AsyncBatches`, blocking (``Client.batches``)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._async = client._async.batches

    def create(self, file: BatchFile, **kwargs: Any) -> Batch:
        return self._client._run(self._async.create(file, **kwargs))

    def retrieve(self, batch_id: str) -> Batch:
        return self._client._run(self._async.retrieve(batch_id))

    def cancel(self, batch_id: str) -> Batch:
        return self._client._run(self._async.cancel(batch_id))

    def wait(self, batch_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: Callable[[Batch], None] | None = None) -> Batch:
        """Block until the batch ends (``on_progress`` is called in this thread).

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

    def download(self, batch_id: str, *, output: str | Path | None = None,
                 errors: str | Path | None = None) -> tuple[Path, Path]:
        return self._client._run(self._async.download(batch_id, output=output, errors=errors))

    def results(self, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return self._client._run(self._async.results(batch_id))

    def partial(self, batch_id: str, *, after: int = 0, limit: int | None = None) -> PartialOutput:
        return self._client._run(self._async.partial(batch_id, after=after, limit=limit))

    def list(self, *, limit: int = 20, after: str | None = None) -> list[Batch]:
        return self._client._run(self._async.list(limit=limit, after=after))


class Client:
    """The synchronous client: the same methods as :class:`AsyncClient`, blocking.

    It runs an event loop in a private thread, so it works inside programs that have
    no loop, and alongside ones that do. ``close`` (or leaving ``with``) stops it.
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None,
                 tenant: str | None = None, timeout: float = 60.0) -> None:
        conn = connection(api_key, base_url=base_url, tenant=tenant)  # before any thread
        self._loop = loops.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tokenmill-client", daemon=True)
        self._thread.start()
        try:
            # Made inside the loop, so its connections belong to it.
            self._async = self._run(_make_async(conn, timeout))
        except BaseException:
            self._stop()
            raise

    @property
    def connection(self) -> Connection:
        return self._async.connection

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self._async.close())
            finally:
                self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    @cached_property
    def batches(self) -> Batches:
        """This tenant's batches: ``create``, ``retrieve``, ``list``, ``cancel``, ``wait``,
        ``download``, ``results``."""
        return Batches(self)

    def build(self, model: str, **kwargs: Any) -> PreparedRequest:
        return build(model, **kwargs)

    def submit(self, model: str, **kwargs: Any) -> Handle:
        return self._run(self._async.submit(model, **kwargs))

    def submit_many(self, requests: Iterable[PreparedRequest]) -> list[Handle]:
        return self._run(self._async.submit_many(list(requests)))

    def result(self, handle: Handle | str, timeout: float = 600.0) -> wire.Result:
        return self._run(self._async.result(handle, timeout))

    def poll(self, handle: Handle | str) -> wire.Result | None:
        return self._run(self._async.poll(handle))

    def cancel(self, handle: Handle | str) -> None:
        self._run(self._async.cancel(handle))

    def map(self, model: str, items: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[wire.Result]:
        return self._run(self._async.map(model, list(items), **kwargs))

    def stream(self, handle: Handle | str, timeout: float = 600.0) -> Iterator[str]:
        agen = self._async.stream(handle, timeout)
        try:
            while True:
                try:
                    yield self._run(_next(agen))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():  # a caller that stops early closes the HTTP stream
                self._run(agen.aclose())


async def _next(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _make_async(conn: Connection, timeout: float) -> AsyncClient:
    # The key is resolved already: a tenant name has become its demo key.
    return AsyncClient(conn.api_key, base_url=conn.base_url, timeout=timeout)

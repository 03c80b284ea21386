"""An existing OpenAI-compatible server (e.g. a running ``vllm serve``) as an engine.

Each request is one streaming HTTP call (``stream: true`` with
``stream_options.include_usage``), so tokens stream back as the server makes them and
the final counts are the *server's* usage. Batching is the server's business; this
engine only bounds how many calls it has open (``capacity``).

Failure handling:

* connect errors, connect timeouts, 429 and 5xx answers **before the first token** are
  retried ``max_retries`` times with exponential backoff (nothing was generated, so a
  retry cannot duplicate work); after the first token nothing is retried — the
  request fails with the reason;
* ``read_timeout_s`` bounds the wait for each chunk; ``total_timeout_s`` the whole call;
* 4xx answers fail the request as invalid, with the server's message;
* a server that sends no usage fails the request (``require_usage``): tokenmill
  bills the engine's own counts and will not guess them.

Abort closes the response; vLLM's server aborts a request whose client disconnects.

``engine_args``: ``base_url`` (``http://host:port/v1``), optional ``model`` (the
served name; default the tokenmill model name), ``api_key_env`` (name of an
environment variable holding the key), timeouts and retry settings below.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ...config.models import ModelConfig
from ...errors import EngineError, ValidationError
from ...wire import Endpoint, InferenceRequest
from .base import EngineStats, EngineStep, WorkDone, sampling_options

__all__ = ["OpenAIRemoteEngine", "RemoteArgs"]

_RETRY_STATUS = {429, 500, 502, 503, 504}


class RemoteArgs(BaseModel):
    """The ``openai`` engine's ``engine_args``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    model: str | None = None
    api_key_env: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    total_timeout_s: float = Field(default=3600.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    require_usage: bool = True
    #: seconds start() waits for ``GET /models`` to answer (0: do not check)
    start_timeout_s: float = Field(default=30.0, ge=0)


class _Retryable(Exception):
    pass


class OpenAIRemoteEngine:
    """Forwards requests to an OpenAI-compatible server (see the module docstring)."""

    name = "openai"
    simulated = False

    def __init__(self, args: RemoteArgs, *, model: str, capacity: int) -> None:
        self.args = args
        self.model = args.model or model
        self.capacity = capacity
        self._client: httpx.AsyncClient | None = None
        self._open: dict[str, httpx.Response] = {}
        self._aborted: set[str] = set()

    @classmethod
    def from_config(cls, model: str, cfg: ModelConfig) -> OpenAIRemoteEngine:
        from .factory import engine_slots

        return cls(RemoteArgs(**cfg.engine_args), model=model, capacity=engine_slots(cfg))

    async def start(self) -> None:
        a = self.args
        headers = {}
        if a.api_key_env:
            key = os.environ.get(a.api_key_env)
            if not key:
                raise EngineError(f"environment variable {a.api_key_env} (the API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=a.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(a.read_timeout_s, connect=a.connect_timeout_s),
            limits=httpx.Limits(max_connections=self.capacity, max_keepalive_connections=self.capacity),
        )
        if a.start_timeout_s > 0:
            await self._wait_for_server(a.start_timeout_s)

    async def _wait_for_server(self, timeout_s: float) -> None:
        assert self._client is not None
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                got = await self._client.get("/models")
                if got.status_code == 200:
                    return
                last = f"HTTP {got.status_code}"
            except httpx.HTTPError as exc:
                last = exc
            await asyncio.sleep(0.5)
        raise EngineError(f"OpenAI-compatible server at {self.args.base_url} not answering: {last!r}")

    async def shutdown(self) -> None:
        for rid in list(self._open):
            await self.abort(rid)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def abort(self, request_id: str) -> WorkDone | None:
        """Close the response; the remote server's counts are not known (its usage comes
        only with the last chunk), so the counts of the chunks received stand."""
        self._aborted.add(request_id)
        resp = self._open.pop(request_id, None)
        if resp is not None:
            await resp.aclose()
        return None

    def payload(self, request: InferenceRequest) -> dict[str, Any]:
        """The body to send: the client's, with our model name, limits and streaming."""
        sampling_options(request)  # refuse what we do not support, before sending
        body = {k: v for k, v in request.body.items() if k not in ("max_completion_tokens", "user")}
        body.update(
            model=self.model,
            max_tokens=request.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        return body

    def stats(self) -> EngineStats | None:
        return None  # a remote server's queue is not ours to see

    async def generate(self, request: InferenceRequest, priority: int = 0) -> AsyncIterator[EngineStep]:
        # ``priority`` is not sent: OpenAI-compatible servers differ on whether they take one
        if self._client is None:
            raise EngineError("openai engine is not started")
        path = "/chat/completions" if request.endpoint is Endpoint.chat_completions else "/completions"
        body = self.payload(request)
        a = self.args
        deadline = time.monotonic() + a.total_timeout_s
        attempt = 0
        try:
            while True:
                produced = False
                try:
                    async for step in self._stream(request, path, body, deadline):
                        produced = True
                        yield step
                    return
                except _Retryable as exc:
                    reason: BaseException = exc
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                    if produced or request.id in self._aborted:
                        raise EngineError(f"connection to the server lost: {exc!r}") from exc
                    reason = exc
                except httpx.ReadTimeout as exc:
                    raise EngineError(f"no token for read_timeout_s={a.read_timeout_s}") from exc
                except httpx.HTTPError as exc:
                    if request.id in self._aborted:
                        return
                    raise EngineError(f"HTTP error from the server: {exc!r}") from exc
                if request.id in self._aborted:
                    return
                if attempt >= a.max_retries:
                    raise EngineError(f"server unavailable after {attempt + 1} tries: {reason!r}")
                await asyncio.sleep(a.retry_backoff_s * (2**attempt))
                attempt += 1
        finally:
            self._open.pop(request.id, None)
            self._aborted.discard(request.id)

    async def _stream(
        self, request: InferenceRequest, path: str, body: dict[str, Any], deadline: float
    ) -> AsyncIterator[EngineStep]:
        assert self._client is not None
        chat = request.endpoint is Endpoint.chat_completions
        req = self._client.build_request("POST", path, json=body)
        resp = await self._client.send(req, stream=True)
        self._open[request.id] = resp
        try:
            if resp.status_code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            if resp.status_code >= 400:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                raise ValidationError(f"server refused the request (HTTP {resp.status_code}): {detail}")
            chunks = 0
            finish: str | None = None
            usage: dict[str, Any] | None = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if time.monotonic() > deadline:
                    raise EngineError(f"not done within total_timeout_s={self.args.total_timeout_s}")
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise EngineError(f"server error mid-stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    finish = choice.get("finish_reason") or finish
                    if text:
                        chunks += 1  # every non-empty chunk holds at least one token
                        yield EngineStep(text=text, completion_tokens=chunks, prompt_tokens=0)
            if request.id in self._aborted:
                return
            if finish is None:
                raise EngineError("the server's stream ended before the request finished")
            if usage is None:
                if self.args.require_usage:
                    raise EngineError("the server reported no usage (stream_options.include_usage)")
                usage = {"prompt_tokens": 0, "completion_tokens": chunks}
            yield EngineStep(
                text="",
                completion_tokens=int(usage.get("completion_tokens", chunks)),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                finish_reason=finish or "stop",
            )
        finally:
            await resp.aclose()

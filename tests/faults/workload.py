"""The fault drill's workload, sent as tenants send it — through the gateway:

* one batch per tenant (official ``openai`` SDK: ``files.create`` + ``batches.create``,
  ``completion_window="24h"``, a batch webhook to the test's receiver);
* interactive requests, concurrent, in two waves: chat completions through ``AsyncOpenAI``
  and, every n-th one, tokenmill's request API with a request webhook, collected by polling.

Every interactive request ends with exactly one :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from fault_stack import KEYS, MODEL
from sizes import Size

TENANTS = tuple(KEYS)
TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}
TERMINAL_RESULT = {"succeeded", "failed", "cancelled", "expired"}
#: an error is clear when it says which part of the stack is gone
NAMES_COMPONENT = re.compile(r"redis|broker|kafka|gateway", re.IGNORECASE)


def _tokens(size: Size, i: int) -> int:
    low, high = size.max_tokens
    return low + i % (high - low + 1)


def _prompt(kind: str, i: int) -> str:
    # Prompt lengths vary (the sim counts words), so token counts differ line to line.
    return f"{kind} question {i}: " + " ".join(["why"] * (1 + i % 7))


# -- batches ---------------------------------------------------------------------------------


def batch_file(size: Size, tenant: str) -> bytes:
    lines = (
        {
            "custom_id": f"{tenant}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": _prompt("batch", i)}],
                "max_tokens": _tokens(size, i),
            },
        }
        for i in range(size.lines_per_tenant)
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def sdk(gateway: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=60.0
    )


@dataclass
class Batches:
    """The three tenants' batches of one case."""

    gateway: str
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)  #: tenant → its SDK client
    ids: dict[str, str] = field(default_factory=dict)  #: tenant → batch id
    custom_ids: dict[str, list[str]] = field(
        default_factory=dict
    )  #: tenant → its lines' custom ids
    hook_paths: dict[str, str] = field(
        default_factory=dict
    )  #: batch id → the receiver path of its webhook
    last: dict[str, Any] = field(default_factory=dict)  #: batch id → the last batch object read

    @classmethod
    def submit(cls, gateway: str, size: Size, receiver_url: str, case: str) -> Batches:
        made = cls(gateway, {t: sdk(gateway, t) for t in TENANTS})
        for tenant, client in made.clients.items():
            data = batch_file(size, tenant)
            upload = client.files.create(file=(f"{case}-{tenant}.jsonl", data), purpose="batch")
            path = f"/{case}/batch/{tenant}"
            batch = client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_body={"webhook": receiver_url + path},
            )
            assert (
                batch.request_counts is None or batch.request_counts.total == size.lines_per_tenant
            )
            made.ids[tenant] = batch.id
            made.custom_ids[tenant] = [f"{tenant}-{i}" for i in range(size.lines_per_tenant)]
            made.hook_paths[batch.id] = path
        return made

    def refresh(self) -> bool:
        """Read every batch again; False if the gateway did not answer (mid-recovery)."""
        try:
            for tenant, batch_id in self.ids.items():
                self.last[batch_id] = self.clients[tenant].batches.retrieve(batch_id)
        except openai.APIError:
            return False
        return True

    def done_share(self) -> float | None:
        """Share of all lines ended (completed or failed), or None when unreadable."""
        if not self.refresh():
            return None
        total = sum(len(c) for c in self.custom_ids.values())
        ended = sum(
            (b.request_counts.completed + b.request_counts.failed) if b.request_counts else 0
            for b in self.last.values()
        )
        return ended / total

    def ended(self) -> bool:
        return self.refresh() and all(b.status in TERMINAL_BATCH for b in self.last.values())

    def files(self) -> dict[str, tuple[list[dict], list[dict]]]:
        """tenant → (output file lines, error file lines) of its ended batch."""
        out: dict[str, tuple[list[dict], list[dict]]] = {}
        for tenant, batch_id in self.ids.items():
            batch, client = self.last[batch_id], self.clients[tenant]
            out[tenant] = (
                _jsonl(client, batch.output_file_id),
                _jsonl(client, batch.error_file_id),
            )
        return out

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    return [
        json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()
    ]


# -- interactive requests --------------------------------------------------------------------


@dataclass
class Outcome:
    """How one interactive request ended, as its caller saw it."""

    index: int
    tenant: str
    wave: int
    via: str  #: "chat" (POST /v1/chat/completions) or "requests" (request API + webhook)
    kind: str = "pending"  #: ok | clear_error | failed | lost | pending
    request_id: str | None = None
    usage: tuple[int, int] | None = None  #: (prompt_tokens, completion_tokens) of a success
    detail: str = ""
    accepted: bool = False  #: the gateway took it (request API: 202; chat: an answer came)
    hook_path: str | None = None
    #: a request API request that ended otherwise for its caller, but whose result can be
    #: collected after all (read once everything is over): (prompt_tokens, completion_tokens)
    late_usage: tuple[int, int] | None = None

    def end(self, kind: str, detail: str = "") -> None:
        self.kind, self.detail = kind, detail[:300]


def _api_error_kind(status: int, message: str) -> str:
    return "clear_error" if status == 503 and NAMES_COMPONENT.search(message) else "lost"


class Interactive:
    """Interactive callers on an event loop of their own (a thread), so the test's main
    thread is free to watch the batches and strike."""

    def __init__(self, gateway: str, size: Size, receiver_url: str, case: str) -> None:
        self.gateway, self.size, self.receiver_url, self.case = gateway, size, receiver_url, case
        self.outcomes: list[Outcome] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks: list[concurrent.futures.Future[None]] = []
        self._clients: dict[str, tuple[openai.AsyncOpenAI, httpx.AsyncClient]] = self._run(
            self._make_clients()
        )

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    async def _make_clients(self) -> dict[str, tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
        timeout = httpx.Timeout(self.size.request_timeout_s + 30.0, connect=10.0)
        limits = httpx.Limits(
            max_connections=self.size.interactive + 50, max_keepalive_connections=100
        )
        made = {}
        for tenant, key in KEYS.items():
            http = httpx.AsyncClient(
                base_url=self.gateway,
                timeout=timeout,
                limits=limits,
                headers={"Authorization": f"Bearer {key}"},
            )
            chat = openai.AsyncOpenAI(
                base_url=self.gateway + "/v1",
                api_key=key,
                max_retries=0,
                # openai 3 types its client as httpx2's; httpx's works the same at run time
                http_client=httpx.AsyncClient(timeout=timeout, limits=limits),  # type: ignore[arg-type]
            )
            made[tenant] = (chat, http)
        return made

    def launch(self, wave: int, count: int) -> list[Outcome]:
        """Start ``count`` requests now (concurrently); returns their outcomes, filled in as they end."""
        started = []
        for _ in range(count):
            i = len(self.outcomes)
            tenant = TENANTS[i % len(TENANTS)]
            hooked = i % self.size.hooked_every == 0
            o = Outcome(i, tenant, wave, "requests" if hooked else "chat")
            if hooked:
                o.hook_path = f"/{self.case}/request/{i}"
            self.outcomes.append(o)
            started.append(o)
            run = self._via_requests(o) if hooked else self._via_chat(o)
            self._tasks.append(asyncio.run_coroutine_threadsafe(run, self._loop))
        return started

    def collect_late(self) -> None:
        """Ask once more for the result of every request API request that did not end ok:
        its caller can still collect a success (which must then be billed)."""
        for o in self.outcomes:
            if o.via != "requests" or o.kind == "ok" or not o.request_id:
                continue
            try:
                got = httpx.get(
                    f"{self.gateway}/v1/tokenmill/requests/{o.request_id}",
                    headers={"Authorization": f"Bearer {KEYS[o.tenant]}"},
                    timeout=10.0,
                )
            except httpx.HTTPError:
                continue
            result = got.json() if got.status_code == 200 else {}
            if result.get("status") == "succeeded":
                usage = result["usage"]
                o.late_usage = (int(usage["prompt_tokens"]), int(usage["completion_tokens"]))

    def pending(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "pending"]

    def wait(self, timeout_s: float) -> None:
        """Until every request has its outcome (bounded: the stragglers are left pending)."""
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

        async def closing() -> None:
            for chat, http in self._clients.values():
                await chat.close()
                await http.aclose()

        try:
            self._run(closing())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- one request -----------------------------------------------------------------------

    def _body(self, o: Outcome) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": _prompt("interactive", o.index)}],
            "max_tokens": _tokens(self.size, o.index),
        }

    async def _via_chat(self, o: Outcome) -> None:
        chat, _ = self._clients[o.tenant]
        try:
            raw = await chat.chat.completions.with_raw_response.create(
                **self._body(o), service_tier="priority"
            )
            o.accepted = True
            o.request_id = raw.headers.get("x-request-id")
            answer = raw.parse()
            assert answer.usage is not None, "a chat completion without usage"
            o.usage = (answer.usage.prompt_tokens, answer.usage.completion_tokens)
            o.end("ok")
        except openai.APIStatusError as exc:
            o.accepted = True
            o.end(
                _api_error_kind(exc.status_code, str(exc.message)),
                f"HTTP {exc.status_code}: {exc.message}",
            )
        except openai.APIError as exc:  # connection lost, timed out
            o.end("lost", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 — every request must end with an outcome
            o.end("lost", f"{type(exc).__name__}: {exc}")

    async def _via_requests(self, o: Outcome) -> None:
        _, http = self._clients[o.tenant]
        try:
            posted = await http.post(
                "/v1/tokenmill/requests",
                json={
                    "endpoint": "/v1/chat/completions",
                    "body": self._body(o),
                    "priority": "interactive",
                    "webhook": self.receiver_url + (o.hook_path or ""),
                },
            )
        except httpx.HTTPError as exc:
            o.end("lost", f"submit: {type(exc).__name__}: {exc}")
            return
        if posted.status_code != 202:
            o.end(
                _api_error_kind(posted.status_code, posted.text),
                f"submit: HTTP {posted.status_code}: {posted.text}",
            )
            return
        o.accepted, o.request_id = True, posted.json()["id"]
        await self._collect(o, http)

    async def _collect(self, o: Outcome, http: httpx.AsyncClient) -> None:
        """Poll the result as a caller does: a dropped connection is retried (the request is
        accepted and durable), a 503 naming the lost component is the answer."""
        deadline = time.monotonic() + self.size.request_timeout_s + 30.0
        while time.monotonic() < deadline:
            try:
                got = await http.get(f"/v1/tokenmill/requests/{o.request_id}", params={"wait": 10})
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            if got.status_code == 503:
                o.end(_api_error_kind(503, got.text), f"poll: HTTP 503: {got.text}")
                return
            if got.status_code != 200:
                o.end("lost", f"poll: HTTP {got.status_code}: {got.text}")
                return
            result = got.json()
            if result.get("status") not in TERMINAL_RESULT:
                continue
            if result["status"] == "succeeded":
                usage = result.get("usage") or {}
                o.usage = (int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
                o.end("ok")
            else:
                error = result.get("error") or {}
                text = f"{error.get('code')}: {error.get('message')}"
                o.end(
                    "clear_error" if NAMES_COMPONENT.search(text) else "failed",
                    f"{result['status']} {text}",
                )
            return
        o.end("lost", f"no result within {self.size.request_timeout_s + 30.0:.0f}s")

"""The request watcher: requests submitted with ``webhook=`` get a ``request.completed``
webhook once their result is stored.

Whoever accepts such a request (the gateway, the trusted client) notes it in a Redis
hash (request id -> tenant and URL, :func:`watch_notes`) before publishing it, so the
note is as durable as the result it waits for; a broker lost with unread requests
cannot lose it. The watcher records the webhook of each noted request whose result
has appeared in the result store, then drops the note. Copies may run side by side:
the webhook's id is derived from the request id, so a double recording records once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from .. import wire
from ..ledger import transaction
from ..logs import get_logger
from ..redis_client import async_redis
from . import keys
from .webhook_events import enqueue_event

__all__ = ["WATCH_KEY", "RequestWatcher", "watch_notes"]

log = get_logger(__name__)

#: Redis hash of plain requests that asked for a webhook: request id -> {tenant, url, at}
WATCH_KEY = keys.PREFIX + "webhook-watch"
#: a note whose request has no result after this long is dropped: results expire
#: (``RESULT_TTL_S``), and a request lost with the broker never gets one
NOTE_TTL_S = 2 * 24 * 3600.0
_POLL_S = 0.25


def watch_notes(requests: Iterable[wire.InferenceRequest]) -> dict[str, str]:
    """The notes (field -> value of :data:`WATCH_KEY`) for the plain requests among
    ``requests`` that asked for a webhook; written before the requests are published."""
    return {
        r.id: json.dumps({"tenant": r.tenant, "url": r.webhook_url, "at": r.submitted_at})
        for r in requests
        if r.webhook_url and r.batch_id is None
    }


class RequestWatcher:
    def __init__(self, factory: sessionmaker[Session], *, redis_url: str) -> None:
        self.factory = factory
        self.redis_url = redis_url

    async def run(self, stop: asyncio.Event) -> None:
        client = async_redis(self.redis_url)
        try:
            while not stop.is_set():
                try:
                    await self._finished_requests(client)
                except Exception as exc:  # noqa: BLE001 - a lost Redis or ledger must not end the service
                    log.error("webhook watcher failed; retrying", error=repr(exc))
                    await _sleep(stop, 1.0)
                    continue
                await _sleep(stop, _POLL_S)
        finally:
            await client.aclose()

    async def _finished_requests(self, client: Any) -> None:
        watched = await client.hgetall(WATCH_KEY)
        if not watched:
            return
        ids = [k.decode() for k in watched]
        raws = await client.mget([keys.result(r) for r in ids])
        done = [(rid, raw) for rid, raw in zip(ids, raws) if raw is not None]
        now = time.time()
        stale = [rid for rid, raw in zip(ids, raws)
                 if raw is None and now - json.loads(watched[rid.encode()]).get("at", now) > NOTE_TTL_S]  # fmt: skip
        if done:
            with transaction(self.factory) as session:
                for rid, raw in done:
                    result = wire.decode(wire.Result, raw)
                    target = json.loads(watched[rid.encode()])
                    enqueue_event(
                        session, key=f"{rid}:request.completed", tenant=target["tenant"], url=target["url"],
                        event_type="request.completed", data=_request_data(result),
                    )
        if done or stale:
            if stale:
                log.warning("webhook notes dropped: no result in time", requests=len(stale))
            await client.hdel(WATCH_KEY, *[rid for rid, _ in done], *stale)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def _request_data(result: wire.Result) -> dict[str, Any]:
    data: dict[str, Any] = {"id": result.request_id, "object": "request", "status": result.status.value,
                            "model": result.model}
    if result.usage is not None:
        data["usage"] = {"prompt_tokens": result.usage.prompt_tokens,
                         "completion_tokens": result.usage.completion_tokens}
    if result.error is not None:
        data["error"] = {"code": result.error.code, "message": result.error.message}
    return data

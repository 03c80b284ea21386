"""The result store in Redis: one :class:`~tokenmill.wire.Result` per request, and a
Redis Stream per request that clients block on.

Writers (the worker host) commit a request's outcome with :meth:`ResultStore.commit`:
one Lua script sets the result *only if none exists* (``SET NX`` — the first outcome
wins, a redelivered request cannot overwrite it), stores the terminal TokenEvent
beside it (so a redelivery re-sends the identical event, same ``event_id``), appends
the stream's ``end`` entry and announces the request id on its tenant's ``done``
stream (what clients' waiters block on), atomically. Streaming requests
(``body.stream``) also get ``delta`` entries (coalesced text) before it.

Readers (clients, the scheduler, the API) use :func:`get_result`,
:func:`wait_result` / :func:`wait_result_async` and :func:`stream_events` /
:func:`stream_events_async`. Keys are in :mod:`tokenmill.workers.keys`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis

from ..wire import Result, TokenEvent, decode
from . import keys

__all__ = [
    "ResultStore",
    "StreamItem",
    "get_result",
    "get_result_async",
    "stored_results_async",
    "stream_events",
    "stream_events_async",
    "wait_result",
    "wait_result_async",
]

RESULT_TTL_S = 7 * 24 * 3600
STREAM_TTL_S = 24 * 3600
STREAM_MAXLEN = 10_000

#: announcements kept per tenant on its ``done`` stream; waiters that fall further
#: behind than this find their results by their periodic sweep instead
DONE_MAXLEN = 100_000

# Per outcome, 4 KEYS: result, final-event, stream, tenant's done stream; 4 ARGV from
# ARGV[5] on: result JSON, event JSON, status, request id. ARGV[1..4]: result ttl,
# stream ttl, stream maxlen, done maxlen. One call commits a whole batch, each outcome
# atomically: the first outcome wins (SET NX).
_COMMIT = """
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k, a = i * 4, 4 + i * 4
  if redis.call('SET', KEYS[k + 1], ARGV[a + 1], 'NX', 'EX', ARGV[1]) then
    redis.call('SET', KEYS[k + 2], ARGV[a + 2], 'EX', ARGV[1])
    redis.call('XADD', KEYS[k + 3], 'MAXLEN', '~', ARGV[3], '*',
               'type', 'end', 'status', ARGV[a + 3])
    redis.call('EXPIRE', KEYS[k + 3], ARGV[2])
    redis.call('XADD', KEYS[k + 4], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[a + 4])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One entry of a request's stream."""

    kind: str  #: ``"delta"`` or ``"end"``
    text: str = ""
    #: cumulative completion tokens at this delta
    completion_tokens: int = 0
    #: the result's status, on ``end``
    status: str | None = None


class ResultStore:
    """The workers' side of the store (asyncio Redis client)."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        result_ttl_s: int = RESULT_TTL_S,
        stream_ttl_s: int = STREAM_TTL_S,
    ) -> None:
        self.client = client
        self.result_ttl_s = result_ttl_s
        self.stream_ttl_s = stream_ttl_s
        self._commit = client.register_script(_COMMIT)

    async def commit(self, result: Result, final_event: TokenEvent) -> bool:
        """Store ``result`` and its terminal event unless an outcome exists.

        Returns:
            True if this call stored them; False if the request already had a result.
        """
        [done] = await self.commit_many([(result, final_event)])
        return done

    async def commit_many(self, outcomes: Sequence[tuple[Result, TokenEvent]]) -> list[bool]:
        """:meth:`commit` for several requests in one script call (each one atomic)."""
        if not outcomes:
            return []
        ks: list[str] = []
        args: list[Any] = [self.result_ttl_s, self.stream_ttl_s, STREAM_MAXLEN, DONE_MAXLEN]
        for result, final_event in outcomes:
            rid = result.request_id
            ks += [keys.result(rid), keys.final_event(rid), keys.stream(rid)]
            ks.append(keys.done(result.tenant))
            args += [result.to_bytes(), final_event.to_bytes(), result.status.value, rid]
        return [bool(done) for done in await self._commit(keys=ks, args=args)]

    async def outcome(self, request_id: str) -> tuple[Result | None, TokenEvent | None, bool]:
        """The stored result, its terminal event, and whether that event was reported."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys.result(request_id))
        pipe.get(keys.final_event(request_id))
        pipe.exists(keys.reported(request_id))
        raw_result, raw_event, reported = await pipe.execute()
        result = decode(Result, raw_result) if raw_result else None
        event = decode(TokenEvent, raw_event) if raw_event else None
        return result, event, bool(reported)

    async def mark_reported(self, request_id: str) -> None:
        await self.client.set(keys.reported(request_id), b"1", ex=self.result_ttl_s)

    def add_delta(self, pipe: Any, request_id: str, text: str, completion_tokens: int) -> None:
        """Queue a ``delta`` stream entry on ``pipe`` (a pipeline of this client)."""
        key = keys.stream(request_id)
        pipe.xadd(
            key,
            {"type": "delta", "text": text, "completion_tokens": completion_tokens},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        pipe.expire(key, self.stream_ttl_s)


# -- readers --------------------------------------------------------------------


def _item(raw: dict[Any, Any]) -> StreamItem:
    # Works with clients with and without ``decode_responses``.
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    if fields.get("type") == "end":
        return StreamItem(kind="end", status=fields.get("status") or None)
    return StreamItem(
        kind="delta",
        text=fields.get("text", ""),
        completion_tokens=int(fields.get("completion_tokens", 0)),
    )


def get_result(client: redis.Redis, request_id: str) -> Result | None:
    """The stored result of ``request_id``, or None while it has none."""
    raw = client.get(keys.result(request_id))
    return decode(Result, raw) if raw else None


async def get_result_async(client: aredis.Redis, request_id: str) -> Result | None:
    raw = await client.get(keys.result(request_id))
    return decode(Result, raw) if raw else None


async def stored_results_async(
    client: aredis.Redis, request_ids: Sequence[str], *, chunk: int = 1000
) -> AsyncIterator[tuple[str, Result]]:
    """``(id, result)`` for those of ``request_ids`` that have a result, in their
    order, one ``MGET`` per ``chunk`` ids (results are decoded chunk by chunk)."""
    for start in range(0, len(request_ids), chunk):
        ids = request_ids[start : start + chunk]
        raws = await client.mget([keys.result(r) for r in ids])
        for rid, raw in zip(ids, raws):
            if raw is not None:
                yield rid, decode(Result, raw)


def stream_events(
    client: redis.Redis, request_id: str, *, timeout_s: float = 600.0
) -> Iterator[StreamItem]:
    """Yield the request's stream entries as they come, ending with its ``end`` entry.

    Deltas exist only for requests with ``body.stream``. Returns without ``end`` when
    ``timeout_s`` passes (or the stream expired).
    """
    key, last, deadline = keys.stream(request_id), "0-0", time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        got = client.xread({key: last}, count=512, block=max(1, int(min(left, 1.0) * 1000)))
        for _, entries in got or ():
            for entry_id, fields in entries:
                last = entry_id
                item = _item(fields)
                yield item
                if item.kind == "end":
                    return


async def stream_events_async(
    client: aredis.Redis,
    request_id: str,
    *,
    timeout_s: float = 600.0,
    stop: Callable[[], bool] | None = None,
) -> AsyncIterator[StreamItem]:
    """Async :func:`stream_events`; also returns without ``end`` once ``stop()`` is true
    (asked after every read, so within about a second)."""
    key, last, deadline = keys.stream(request_id), "0-0", time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        got = await client.xread({key: last}, count=512, block=max(1, int(min(left, 1.0) * 1000)))
        for _, entries in got or ():
            for entry_id, fields in entries:
                last = entry_id
                item = _item(fields)
                yield item
                if item.kind == "end":
                    return
        if stop is not None and stop():
            return


def wait_result(client: redis.Redis, request_id: str, *, timeout_s: float = 600.0) -> Result | None:
    """Block until ``request_id`` has a result (None after ``timeout_s``)."""
    found = get_result(client, request_id)
    if found is not None:
        return found
    for item in stream_events(client, request_id, timeout_s=timeout_s):
        if item.kind == "end":
            break
    return get_result(client, request_id)


async def wait_result_async(
    client: aredis.Redis, request_id: str, *, timeout_s: float = 600.0
) -> Result | None:
    """Async :func:`wait_result`."""
    found = await get_result_async(client, request_id)
    if found is not None:
        return found
    async for item in stream_events_async(client, request_id, timeout_s=timeout_s):
        if item.kind == "end":
            break
    return await get_result_async(client, request_id)

"""Cancellation state of our own, in Redis.

Celery revokes are not enough: a revoke sent while no worker is online is lost,
and a revoke does not reach a request already inside the engine. So a cancel is a
key, ``tokenmill:cancel:<request_id>``, with a TTL:

* the scheduler/client calls :func:`request_cancel` (any time, any process);
* a worker checks it before it starts the request (cancelled before start → a
  ``cancelled`` event and result, the engine never sees it), and polls the keys of
  the requests it runs every ``cancel_poll_s`` (0.25 s by default); a hit aborts
  the engine request, emits ``cancelled`` and stores a ``cancelled`` result.

A request that already has a result is not changed by a late cancel (first outcome wins).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import redis.asyncio as aredis

from . import keys

__all__ = ["cancelled_among", "is_cancel_requested", "request_cancel", "request_cancel_async"]

CANCEL_TTL_S = 7 * 24 * 3600


def request_cancel(client: redis.Redis, request_id: str, *, ttl_s: int = CANCEL_TTL_S) -> None:
    """Ask for ``request_id`` to be cancelled (idempotent; safe before it is dispatched)."""
    client.set(keys.cancel(request_id), b"1", ex=ttl_s)


async def request_cancel_async(
    client: aredis.Redis, request_id: str, *, ttl_s: int = CANCEL_TTL_S
) -> None:
    await client.set(keys.cancel(request_id), b"1", ex=ttl_s)


def is_cancel_requested(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(keys.cancel(request_id)))


async def cancelled_among(client: aredis.Redis, request_ids: Sequence[str]) -> set[str]:
    """The ids of ``request_ids`` with a cancel requested (one MGET)."""
    if not request_ids:
        return set()
    flags = await client.mget([keys.cancel(r) for r in request_ids])
    return {rid for rid, flag in zip(request_ids, flags) if flag}

"""Cancellation state of our own, in Redis.

Celery revokes are not enough: a revoke sent while no worker is online is lost,
and a revoke does not reach a request already inside the engine. So a cancel is a
key, ``tokenmill:cancel:<request_id>``, with a TTL:

* the scheduler/client calls :func:`request_cancel` (any time, any process);
* a worker checks it before it starts the request (cancelled before start → a
  ``cancelled`` event and result, the engine never sees it), and checks the requests
  it runs every ``cancel_poll_s`` (0.25 s by default, :class:`CancelWatch`); a hit
  aborts the engine request, emits ``cancelled`` and stores a ``cancelled`` result.

Every cancel request also bumps one counter, ``tokenmill:cancel-epoch``. A worker
reads only that key at each poll, and reads the flags of all its running requests
(one MGET) only when the counter moved, plus those of requests started since its last
poll. Polling every flag each time was ~10 % of the host thread's work with a few
hundred requests in flight.

A request that already has a result is not changed by a late cancel (first outcome wins).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import redis
import redis.asyncio as aredis

from . import keys

__all__ = [
    "CancelWatch",
    "cancelled_among",
    "is_cancel_requested",
    "request_cancel",
    "request_cancel_async",
    "request_cancel_many_async",
]

CANCEL_TTL_S = 7 * 24 * 3600


def request_cancel(client: redis.Redis, request_id: str, *, ttl_s: int = CANCEL_TTL_S) -> None:
    """Ask for ``request_id`` to be cancelled (idempotent; safe before it is dispatched)."""
    pipe = client.pipeline(transaction=True)  # flag, then epoch: a poll that sees the
    pipe.set(keys.cancel(request_id), b"1", ex=ttl_s)  # new epoch sees the flag
    pipe.incr(keys.CANCEL_EPOCH)
    pipe.execute()


async def request_cancel_async(
    client: aredis.Redis, request_id: str, *, ttl_s: int = CANCEL_TTL_S
) -> None:
    await request_cancel_many_async(client, [request_id], ttl_s=ttl_s)


async def request_cancel_many_async(
    client: aredis.Redis, request_ids: Sequence[str], *, ttl_s: int = CANCEL_TTL_S
) -> None:
    """:func:`request_cancel` for many requests: one transaction, one epoch bump."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=True)
    for rid in request_ids:
        pipe.set(keys.cancel(rid), b"1", ex=ttl_s)
    pipe.incr(keys.CANCEL_EPOCH)
    await pipe.execute()


def is_cancel_requested(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(keys.cancel(request_id)))


async def cancelled_among(client: aredis.Redis, request_ids: Sequence[str]) -> set[str]:
    """The ids of ``request_ids`` with a cancel requested (one MGET)."""
    if not request_ids:
        return set()
    flags = await client.mget([keys.cancel(r) for r in request_ids])
    return {rid for rid, flag in zip(request_ids, flags) if flag}


class CancelWatch:
    """Finds the cancelled among a worker's running requests (see the module docstring):
    one GET per poll while nobody asks for a cancel.

    Correct without locks: a cancel sets its flag and bumps the epoch in one
    transaction. A poll that reads an epoch different from the one it last read checks
    every running request; one that reads the same checks those :meth:`started` since
    the previous poll (their flag may predate the epoch it read). So a cancel is found
    by the first poll that reads its epoch, or, for a request started later, by the
    next poll after the start.
    """

    def __init__(self) -> None:
        self._epoch: bytes | str | None = None  # as GET returns it
        self._unchecked: set[str] = set()

    def started(self, request_id: str) -> None:
        """``request_id`` is running now: check its flag at the next poll."""
        self._unchecked.add(request_id)

    async def poll(self, client: aredis.Redis, running: Collection[str]) -> set[str]:
        """The ids of ``running`` (a set or a dict's keys: tested for membership) with a
        cancel requested. Raises what Redis raises; nothing is then marked checked."""
        epoch = await client.get(keys.CANCEL_EPOCH)
        unchecked, self._unchecked = self._unchecked, set()
        try:
            if epoch != self._epoch:
                targets = list(running)
            else:
                targets = [r for r in unchecked if r in running]
            found = await cancelled_among(client, targets)
        except BaseException:
            self._unchecked |= unchecked
            raise
        self._epoch = epoch
        return found

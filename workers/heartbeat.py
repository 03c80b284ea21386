"""Worker heartbeats in Redis, and the reader the scheduler uses.

Every worker writes, about once a second, in one pipeline:

* ``tokenmill:worker:<name>`` = :class:`~tokenmill.wire.WorkerHeartbeat` JSON with a
  TTL of ``ttl_s`` (a dead worker's record disappears on its own), and
* ``ZADD tokenmill:workers:<pool> <ts> <name>`` (the pool's membership index).

:func:`live_workers` returns the pool's workers whose last heartbeat is younger than
``timeout_s`` and prunes older members from the index (stale workers drop out). A
worker that stops cleanly removes itself at once (:func:`remove`).
"""

from __future__ import annotations

import time

import redis
import redis.asyncio as aredis

from ..errors import SchemaError
from ..wire import WorkerHeartbeat, decode
from . import keys

__all__ = ["live_workers", "live_workers_async", "remove", "stage"]


def stage(pipe: aredis.client.Pipeline, beat: WorkerHeartbeat, *, ttl_s: float = 10.0) -> None:
    """Queue the writes of one heartbeat on ``pipe`` (sent with the caller's other writes)."""
    pipe.set(keys.worker(beat.worker), beat.to_bytes(), px=int(ttl_s * 1000))
    pipe.zadd(keys.pool_workers(beat.pool), {beat.worker: beat.ts})


async def remove(client: aredis.Redis, pool: str, worker: str) -> None:
    """Drop ``worker`` from ``pool`` now (clean shutdown)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.pool_workers(pool), worker)
    pipe.delete(keys.worker(worker))
    await pipe.execute()


def _decode_all(raws: list[bytes | None], oldest: float) -> list[WorkerHeartbeat]:
    beats = []
    for raw in raws:
        if not raw:
            continue
        try:
            beat = decode(WorkerHeartbeat, raw)
        except SchemaError:
            continue
        if beat.ts >= oldest:
            beats.append(beat)
    return sorted(beats, key=lambda b: b.worker)


def live_workers(
    client: redis.Redis, pool: str, *, timeout_s: float = 5.0, now: float | None = None
) -> list[WorkerHeartbeat]:
    """The latest heartbeat of each live worker of ``pool``, by worker name.

    ``free_slots`` of each tells how many more requests it takes now.
    """
    oldest = (time.time() if now is None else now) - timeout_s
    index = keys.pool_workers(pool)
    client.zremrangebyscore(index, "-inf", f"({oldest}")
    names = client.zrangebyscore(index, oldest, "+inf")
    if not names:
        return []
    return _decode_all(client.mget([keys.worker(_s(n)) for n in names]), oldest)


async def live_workers_async(
    client: aredis.Redis, pool: str, *, timeout_s: float = 5.0, now: float | None = None
) -> list[WorkerHeartbeat]:
    """Async :func:`live_workers`."""
    oldest = (time.time() if now is None else now) - timeout_s
    index = keys.pool_workers(pool)
    await client.zremrangebyscore(index, "-inf", f"({oldest}")
    names = await client.zrangebyscore(index, oldest, "+inf")
    if not names:
        return []
    return _decode_all(await client.mget([keys.worker(_s(n)) for n in names]), oldest)


def _s(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name

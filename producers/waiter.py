"""One task per client waits for all of its pending results.

Blocking on a Redis stream per request needs a connection per request; a client
waiting on thousands (``map``, batch files) instead polls their result keys with
``MGET`` in chunks, backing off while nothing arrives.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aredis

from ..wire import Result, decode
from ..workers import keys

CHUNK = 1000
MIN_INTERVAL_S = 0.002
MAX_INTERVAL_S = 0.05


class ResultWaiter:
    def __init__(self, client: aredis.Redis) -> None:
        self._redis = client
        self._pending: dict[str, list[asyncio.Future[Result]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def wait(self, request_id: str, timeout: float) -> Result | None:
        """The request's result, or None after ``timeout`` seconds."""
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(request_id, []).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="tokenmill-result-waiter")
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._pending.get(request_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending[request_id]

    async def _poll(self) -> None:
        interval = MIN_INTERVAL_S
        while self._pending:
            ids = list(self._pending)
            found = 0
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                raws = await self._redis.mget([keys.result(r) for r in chunk])
                for rid, raw in zip(chunk, raws):
                    if raw is None:
                        continue
                    found += 1
                    result = decode(Result, raw)
                    for fut in self._pending.pop(rid, []):
                        if not fut.done():
                            fut.set_result(result)
            interval = MIN_INTERVAL_S if found else min(interval * 2, MAX_INTERVAL_S)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

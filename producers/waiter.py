"""One task per client waits for all of its pending results.

Blocking on a Redis stream per request needs a connection per request, and polling
every pending result key costs O(pending) per poll — quadratic for a client waiting on
thousands (``map``, batch files). Instead, every stored outcome is announced on its
tenant's ``done`` stream, atomically with the result (the store's commit script), and
one task per client blocks on that stream (``XREAD``) and fetches only the announced
results it waits for (``MGET``).

Nothing is missed:

* the task takes its stream position *before* checking everything already pending, so
  a result stored earlier is found by that check and a later one is announced after
  the position;
* a request registered later is checked once on registration (batched), so a result
  stored before it was registered (its announcement already read past) is found too;
* every :data:`SWEEP_S` — and after a Redis error — everything pending is checked
  again, which covers announcements trimmed before they were read (a client further
  than ``DONE_MAXLEN`` behind).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import redis.asyncio as aredis
from redis.exceptions import RedisError

from ..errors import StackError
from ..logs import get_logger
from ..wire import Result
from ..workers import keys
from ..workers.results import stored_results_async

__all__ = ["ResultWaiter"]

log = get_logger(__name__)

#: the longest a blocking read waits before the task looks at its sweep clock
BLOCK_MS = 200
SWEEP_S = 2.0
ERROR_PAUSE_S = 0.2


class ResultWaiter:
    """Waits for results of ``tenant``'s requests (see the module docstring)."""

    def __init__(self, client: aredis.Redis, tenant: str) -> None:
        self._redis = client
        self._done = keys.done(tenant)
        self._pending: dict[str, list[asyncio.Future[Result]]] = {}
        self._fresh: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None

    async def wait(self, request_id: str, timeout: float) -> Result | None:
        """The request's result, or None after ``timeout`` seconds.

        Raises:
            StackError: Redis failed while checking the request.
        """
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(request_id, []).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="tokenmill-result-waiter")
        else:
            self._fresh.add(request_id)
            if self._checker is None or self._checker.done():
                self._checker = asyncio.create_task(
                    self._check_fresh(), name="tokenmill-result-check"
                )
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra future
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters = self._pending.get(request_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending[request_id]

    async def _check_fresh(self) -> None:
        await asyncio.sleep(0)  # let a burst of registrations gather into one MGET
        while self._fresh:
            fresh, self._fresh = list(self._fresh), set()
            try:
                await self._fetch(fresh)
            except RedisError as exc:
                self._fail(fresh, StackError(f"Redis: cannot read results: {exc!r}"))

    async def _follow(self) -> None:
        position: bytes | str | None = None
        sweep_at = 0.0
        while self._pending:
            try:
                if position is None:
                    position = await self._last_id()  # before the sweep: see the docstring
                if time.monotonic() >= sweep_at:
                    await self._fetch(list(self._pending))
                    sweep_at = time.monotonic() + SWEEP_S
                    continue
                got = await self._redis.xread({self._done: position}, count=10_000, block=BLOCK_MS)
                announced: list[str] = []
                for _, entries in got or ():
                    for entry_id, fields in entries:
                        position = entry_id
                        rid = fields[b"id"].decode()  # our own client: bytes replies
                        if rid in self._pending:
                            announced.append(rid)
                if announced:
                    await self._fetch(announced)
            except RedisError as exc:
                log.warning("result announcements unreadable; will sweep", error=repr(exc))
                await asyncio.sleep(ERROR_PAUSE_S)
                sweep_at = 0.0

    async def _last_id(self) -> bytes | str:
        """The id of the stream's newest entry ("0-0" while it has none)."""
        newest = await self._redis.xrevrange(self._done, count=1)
        return newest[0][0] if newest else "0-0"

    async def _fetch(self, request_ids: Iterable[str]) -> None:
        async for rid, result in stored_results_async(self._redis, list(request_ids)):
            for fut in self._pending.pop(rid, []):
                if not fut.done():
                    fut.set_result(result)

    def _fail(self, request_ids: Iterable[str], exc: BaseException) -> None:
        for rid in request_ids:
            for fut in self._pending.pop(rid, []):
                if not fut.done():
                    fut.set_exception(exc)

    async def close(self) -> None:
        tasks = [t for t in (self._task, self._checker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

A caller never waits silently on a lost Redis: once Redis has failed every command for
:data:`UNREACHABLE_S`, every pending wait fails with
:class:`~tokenmill.stack.errors.ServiceUnavailable` naming Redis, and so does every
wait while it stays unreachable. At that point the waiter asks ``reconnect`` (when
given) for a new client — the stack may have restarted Redis on another address — and
it reads results again as soon as Redis answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import redis.asyncio as aredis
from redis.exceptions import RedisError

from ..errors import StackError
from ..logs import get_logger
from ..stack.errors import ServiceUnavailable
from ..wire import Result
from ..workers import keys
from ..workers.results import stored_results_async

__all__ = ["ResultWaiter"]

log = get_logger(__name__)

#: the longest a blocking read waits before the task looks at its sweep clock
BLOCK_MS = 200
SWEEP_S = 2.0
ERROR_PAUSE_S = 0.2
#: how long Redis may fail every command before the waits on it fail: long enough to
#: ride out a blip, short enough that nobody waits on a dead server for long
UNREACHABLE_S = 3.0


class ResultWaiter:
    """Waits for results of ``tenant``'s requests (see the module docstring).

    Parameters:
        client: the Redis client to read with (the caller's; it closes it).
        tenant: whose ``done`` stream to follow.
        reconnect: makes a client for Redis's current address, called once Redis has
            been unreachable for ``unreachable_s``; the waiter closes the clients it
            makes. Without it, ``client`` keeps retrying its own address.
        unreachable_s: see :data:`UNREACHABLE_S`.
    """

    def __init__(
        self,
        client: aredis.Redis,
        tenant: str,
        *,
        reconnect: Callable[[], aredis.Redis] | None = None,
        unreachable_s: float = UNREACHABLE_S,
    ) -> None:
        self._redis = client
        self._own_client = False
        self._reconnect = reconnect
        self._unreachable_s = unreachable_s
        #: since when every Redis command failed (None: the last one succeeded)
        self._failing_since: float | None = None
        self._done = keys.done(tenant)
        self._pending: dict[str, list[asyncio.Future[Result]]] = {}
        self._fresh: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None

    def pending(self) -> list[str]:
        """The request ids someone waits for now."""
        return list(self._pending)

    def fail(self, request_ids: Iterable[str], exc: BaseException) -> None:
        """End the waits for ``request_ids`` with ``exc`` (their results will not come)."""
        self._fail(request_ids, exc)

    async def wait(self, request_id: str, timeout: float) -> Result | None:
        """The request's result, or None after ``timeout`` seconds.

        Raises:
            ServiceUnavailable: Redis has been unreachable for ``unreachable_s``.
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
                # Still pending: the follower sweeps after its own error, or fails them
                # all once Redis has been unreachable for long enough.
                self._failed(exc)

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
                self._failing_since = None
            except RedisError as exc:
                if self._failed(exc):
                    position = None  # a new client, maybe a new server: start over
                await asyncio.sleep(ERROR_PAUSE_S)
                sweep_at = 0.0

    def _failed(self, exc: RedisError) -> bool:
        """Note a Redis failure; once Redis has been failing for ``unreachable_s``, fail
        every pending wait, switch to a new client if one can be had, and return True."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("result announcements unreadable; will sweep", error=repr(exc))
        down_s = now - self._failing_since
        if down_s < self._unreachable_s:
            return False
        lost = ServiceUnavailable(
            "Redis",
            f"is unreachable (for {down_s:.0f}s): results cannot be read; retry once it is back",
            detail=repr(exc),
        )
        log.error(
            "redis unreachable; failing pending waits",
            pending=len(self._pending),
            down_s=round(down_s, 1),
            error=repr(exc),
        )
        self._fail(list(self._pending), lost)
        self._use_new_client()
        return True

    def _use_new_client(self) -> None:
        if self._reconnect is None:
            return
        try:
            fresh = self._reconnect()
        except StackError as exc:  # the stack is not (yet) back up
            log.warning("redis address unknown; keeping the old one", error=str(exc))
            return
        old, owned = self._redis, self._own_client
        self._redis, self._own_client = fresh, True
        if owned:
            task = asyncio.get_running_loop().create_task(old.aclose())
            task.add_done_callback(lambda t: t.exception())  # a dead server's close may fail

    async def _last_id(self) -> bytes | str:
        """The id of the stream's newest entry ("0-0" while it has none)."""
        newest = await self._redis.xrevrange(self._done, count=1)
        return newest[0][0] if newest else "0-0"

    async def _fetch(self, request_ids: Iterable[str]) -> None:
        async for rid, result in stored_results_async(self._redis, list(request_ids)):
            for fut in self._pending.pop(rid, []):
                if not fut.done():
                    fut.set_result(result)
        self._failing_since = None

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
        if self._own_client:
            await self._redis.aclose()

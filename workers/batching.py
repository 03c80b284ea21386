"""Coalescing of calls made close together into one batch call.

Requests that finish in the same engine step all commit their outcomes within a loop
iteration or two; sending those as one Redis pipeline instead of hundreds of round
trips keeps the host thread (which shares the GIL with the engine) nearly idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``await c(item)`` → ``run_many([...items])[i]``; items queued while a batch is
    in flight go out together in the next one. Errors reach every caller of the batch."""

    def __init__(self, run_many: Callable[[Sequence[T]], Awaitable[Sequence[R]]]) -> None:
        self._run_many = run_many
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False

    async def __call__(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().call_soon(self._start)
        return await fut

    def _start(self) -> None:
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run_many([item for item, _ in batch])
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._busy = False

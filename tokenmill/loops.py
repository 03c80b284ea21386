"""Event loops for tokenmill's own processes: uvloop where it is installed.

The worker host, the scheduler and the sync client's thread each run one loop that
handles thousands of small Redis and Kafka round trips a second; uvloop's libuv loop
spends a fraction of the stock loop's CPU on each. Users' own loops are left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run", "use_for_new_loops"]

T = TypeVar("T")


def _factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # optional: the stock loop is correct, only slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    return _factory()()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=_factory()) as runner:
        return runner.run(main)


def use_for_new_loops() -> None:
    """Make uvloop the loop of every ``asyncio.new_event_loop()`` in this process, for
    code that makes its own loops (faust's consumer thread). Only for tokenmill's own
    service processes."""
    try:
        import uvloop
    except ImportError:  # optional: the stock loop is correct, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

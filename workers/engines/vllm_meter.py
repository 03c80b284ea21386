"""Saturation signals of an in-process vLLM engine core, read from its scheduler.

With the core in the stepping process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the
scheduler is ``engine.engine_core.engine_core.scheduler``: its request counts and KV-cache
use are plain attribute reads. vLLM counts preemptions per request
(``Request.num_preemptions``, raised in ``Scheduler._preempt_request``) and keeps no
total, so the meter holds each request it added until the request ends, and adds its
count to a running total then.

Reading is cheap, but :meth:`EngineMeter.due` still reports at most every
``interval_s`` while the engine steps (and once when it goes idle), so a step loop can
ask on every turn. These are vLLM internals: if a version lacks them the meter says so
once and reports nothing, and the engine runs on.
"""

from __future__ import annotations

import time
from typing import Any

from ...logs import get_logger
from .base import EngineStats

__all__ = ["STATS_INTERVAL_S", "EngineMeter"]

log = get_logger(__name__)

#: the most often a stepping engine reports its stats
STATS_INTERVAL_S = 0.25


class EngineMeter:
    """Per-request preemption counts and engine-wide stats of one ``LLMEngine``."""

    def __init__(self, engine: Any, *, interval_s: float = STATS_INTERVAL_S) -> None:
        try:
            self._scheduler: Any = engine.engine_core.engine_core.scheduler
        except AttributeError:  # the core is not in this process: nothing to read
            log.warning("vLLM engine core is not in-process: no engine stats")
            self._scheduler = None
        self.interval_s = interval_s
        #: our request id -> vLLM's ``Request`` (alive in the scheduler)
        self._requests: dict[str, Any] = {}
        #: preemptions of requests no longer held
        self._ended = 0
        self._next_at = 0.0
        self._idle_reported = False

    def added(self, rid: str, engine_rid: str) -> None:
        """``rid`` was added as ``engine_rid`` (vLLM suffixes the ids it is given)."""
        if self._scheduler is not None:
            try:
                request = self._scheduler.requests.get(engine_rid)
            except AttributeError as exc:
                self._give_up(exc)
                return
            if request is not None:
                self._requests[rid] = request

    def preemptions(self, rid: str, *, ended: bool = False) -> int:
        """Times ``rid`` was preempted so far; ``ended``: it is finished or aborted."""
        request = self._requests.pop(rid, None) if ended else self._requests.get(rid)
        if request is None:
            return 0
        count = int(getattr(request, "num_preemptions", 0))
        if ended:
            self._ended += count
        return count

    def read(self) -> EngineStats | None:
        sched = self._scheduler
        if sched is None:
            return None
        try:
            running, waiting = sched.get_request_counts()
            usage = min(1.0, max(0.0, float(sched.get_kv_cache_usage())))
        except Exception as exc:  # noqa: BLE001 - a vLLM without them: no stats, no harm
            self._give_up(exc)
            return None
        live = sum(int(getattr(r, "num_preemptions", 0)) for r in self._requests.values())
        return EngineStats(running=running, waiting=waiting, kv_cache_usage=usage,
                           preemptions=self._ended + live)  # fmt: skip

    def due(self, *, idle: bool) -> EngineStats | None:
        """The stats if the engine steps and ``interval_s`` passed since the last report,
        or if it just went ``idle`` (its last report must not show it busy); else None."""
        if idle:
            if self._idle_reported:
                return None
        else:
            now = time.monotonic()
            if now < self._next_at:
                return None
            self._next_at = now + self.interval_s
        self._idle_reported = idle
        return self.read()

    def _give_up(self, exc: BaseException) -> None:
        log.warning("vLLM scheduler internals changed: no engine stats", error=repr(exc))
        self._scheduler = None
        self._requests.clear()

"""The vLLM engine meter on a stand-in for vLLM's scheduler (no vLLM needed): request
preemption counts, the engine total, when it reports, and a vLLM without the internals."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from tokenmill.workers.engines.base import EngineStats
from tokenmill.workers.engines.vllm_meter import EngineMeter


@dataclass
class _Request:
    num_preemptions: int = 0


@dataclass
class _Scheduler:
    requests: dict[str, _Request] = field(default_factory=dict)
    usage: float = 0.0

    def get_request_counts(self) -> tuple[int, int]:
        return len(self.requests), 0

    def get_kv_cache_usage(self) -> float:
        return self.usage


def _engine(scheduler: Any) -> Any:
    return SimpleNamespace(engine_core=SimpleNamespace(engine_core=SimpleNamespace(scheduler=scheduler)))


def test_counts_preemptions_per_request_and_in_total() -> None:
    sched = _Scheduler()
    meter = EngineMeter(_engine(sched), interval_s=3600)
    sched.requests = {"a-x1": _Request(), "b-x2": _Request()}  # vLLM suffixes our ids
    meter.added("a", "a-x1")
    meter.added("b", "b-x2")
    sched.requests["b-x2"].num_preemptions = 2
    assert (meter.preemptions("a"), meter.preemptions("b")) == (0, 2)
    assert meter.preemptions("b", ended=True) == 2  # its count stays in the total
    del sched.requests["b-x2"]
    sched.requests["a-x1"].num_preemptions = 1
    sched.usage = 1.5  # clamped: the heartbeat takes 0-1
    assert meter.read() == EngineStats(running=1, waiting=0, kv_cache_usage=1.0, preemptions=3)
    assert meter.preemptions("unknown", ended=True) == 0


def test_reports_at_most_every_interval_and_once_when_idle() -> None:
    meter = EngineMeter(_engine(_Scheduler()), interval_s=3600)
    assert meter.due(idle=True) is not None
    assert meter.due(idle=True) is None  # still idle: nothing new
    assert meter.due(idle=False) is not None  # busy again: at once
    assert meter.due(idle=False) is None  # within the interval
    assert meter.due(idle=True) is not None  # went idle: its last report must say so
    fast = EngineMeter(_engine(_Scheduler()), interval_s=0.0)
    assert fast.due(idle=False) is not None and fast.due(idle=False) is not None


def test_a_vllm_without_the_internals_reports_nothing() -> None:
    assert EngineMeter(SimpleNamespace()).read() is None
    meter = EngineMeter(_engine(SimpleNamespace(requests={})))  # no get_request_counts
    meter.added("a", "a-x")
    assert meter.read() is None and meter.due(idle=False) is None

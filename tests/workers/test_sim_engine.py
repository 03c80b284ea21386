"""The simulated engine's timing model, token counts and abort."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import PrivateAttr
from tokenmill.workers.engines.base import EngineStats, EngineStep, WorkDone
from tokenmill.workers.engines.sim import SimEngine, SimTiming, count_prompt_tokens
from workers_helpers import chat_request, completion_request


def test_step_duration_formula() -> None:
    t = SimTiming(prefill_ms_per_token=0.5, decode_ms_per_step=10, decode_ms_per_seq=2)
    assert t.step_s(running=4, admitted_tokens=0) == pytest.approx(0.018)
    assert t.step_s(running=1, admitted_tokens=100) == pytest.approx(0.062)
    assert SimTiming().step_s(256, 10_000) == 0.0


def test_unknown_timing_arg_is_refused() -> None:
    with pytest.raises(ValueError):
        SimTiming(decode_ms=3)  # type: ignore[call-arg]


def test_prompt_token_count() -> None:
    assert count_prompt_tokens(completion_request("sim", "a b  c")) == 3
    # chat: words + 4 per message + 2 for the reply header
    assert count_prompt_tokens(chat_request("sim", "one two three")) == 3 + 4 + 2


async def _run(engine: SimEngine, req) -> tuple[list[EngineStep], float, float]:
    t0 = time.monotonic()
    steps: list[EngineStep] = []
    ttft = 0.0
    async for step in engine.generate(req):
        if not steps:
            ttft = time.monotonic() - t0
        steps.append(step)
    return steps, ttft, time.monotonic() - t0


async def _engine(**timing: float) -> SimEngine:
    capacity = int(timing.pop("capacity", 64))
    engine = SimEngine(SimTiming(**timing), capacity=capacity)
    await engine.start()
    return engine


async def test_lone_request_follows_the_timing_model() -> None:
    engine = await _engine(prefill_ms_per_token=2.0, decode_ms_per_step=15.0, decode_ms_per_seq=5.0)
    req = completion_request("sim", " ".join(["w"] * 25), max_tokens=10)  # 25 prompt tokens
    steps, ttft, e2e = await _run(engine, req)
    await engine.shutdown()
    # TTFT = 25*2 + 15 + 5 = 70 ms; E2E = 50 + 10*20 = 250 ms
    assert 0.065 <= ttft < 0.065 + 0.1
    assert 0.245 <= e2e < 0.25 + 0.15
    assert steps[-1] == EngineStep(
        text=steps[-1].text, completion_tokens=10, prompt_tokens=25, finish_reason="length"
    )
    assert "".join(s.text for s in steps).split() == [
        "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "lorem", "ipsum"
    ]


async def test_batch_size_slows_every_step() -> None:
    engine = await _engine(decode_ms_per_step=5.0, decode_ms_per_seq=5.0)
    alone = await _run(engine, completion_request("sim", max_tokens=10))
    together = await asyncio.gather(*[_run(engine, completion_request("sim", max_tokens=10)) for _ in range(5)])
    await engine.shutdown()
    # one sequence: 10 steps of 10 ms; five: 10 steps of 30 ms
    assert 0.095 <= alone[2] < 0.2
    for _, _, e2e in together:
        assert 0.29 <= e2e < 0.45


async def test_capacity_queues_the_rest_fifo() -> None:
    engine = await _engine(decode_ms_per_step=10.0, capacity=2)
    results = await asyncio.gather(*[_run(engine, completion_request("sim", max_tokens=5)) for _ in range(4)])
    await engine.shutdown()
    ttfts = [r[1] for r in results]
    # the first two start at once; the next two wait for five steps (~50 ms)
    assert max(ttfts[:2]) < 0.04
    assert min(ttfts[2:]) >= 0.045


async def test_zero_cost_runs_many_requests_quickly() -> None:
    engine = await _engine(capacity=256)
    t0 = time.monotonic()
    results = await asyncio.gather(*[_run(engine, chat_request("sim", max_tokens=64)) for _ in range(200)])
    await engine.shutdown()
    assert time.monotonic() - t0 < 5.0
    assert all(r[0][-1].completion_tokens == 64 for r in results)
    # steps coalesce when the consumer is slower than the engine: fewer steps than tokens
    assert sum(len(r[0]) for r in results) <= 200 * 64


async def test_output_tokens_caps_completion_with_stop() -> None:
    engine = await _engine(output_tokens=3)
    steps, _, _ = await _run(engine, completion_request("sim", max_tokens=10))
    await engine.shutdown()
    assert (steps[-1].completion_tokens, steps[-1].finish_reason) == (3, "stop")


async def test_abort_ends_only_that_request() -> None:
    engine = await _engine(decode_ms_per_step=5.0)
    victim = completion_request("sim", max_tokens=1000)
    other = completion_request("sim", max_tokens=20)
    victim_task = asyncio.create_task(_run(engine, victim))
    other_task = asyncio.create_task(_run(engine, other))
    await asyncio.sleep(0.03)
    await engine.abort(victim.id)
    v_steps, _, v_time = await asyncio.wait_for(victim_task, 1.0)
    o_steps, _, _ = await asyncio.wait_for(other_task, 2.0)
    await engine.shutdown()
    assert v_time < 0.5 and all(s.finish_reason is None for s in v_steps)
    assert o_steps[-1].completion_tokens == 20


async def test_abort_reports_the_work_done() -> None:
    """The prompt counts once admitted to a step (its prefill is paid there), and every
    token generated counts, delivered or not; a request still waiting cost nothing."""
    engine = await _engine(decode_ms_per_step=5.0, capacity=1)
    running = completion_request("sim", "one two three four", max_tokens=1000)
    waiting = completion_request("sim", max_tokens=10)
    gen = engine.generate(running)
    first = await gen.__anext__()
    queued = asyncio.create_task(_run(engine, waiting))
    await asyncio.sleep(0.05)  # more steps run while nobody reads them
    seq = engine._by_id[running.id]
    assert seq.generated > first.completion_tokens
    done = await engine.abort(running.id)
    assert done is not None and done.prompt_tokens == first.prompt_tokens == 4
    assert done.completion_tokens == seq.generated
    assert await engine.abort(running.id) is None  # gone: nothing more to tell
    await gen.aclose()
    await asyncio.wait_for(queued, 2.0)  # it runs once the slot is free
    gen2 = engine.generate(completion_request("sim", max_tokens=1000))
    gen3_req = completion_request("sim", "a b", max_tokens=1000)
    gen3 = engine.generate(gen3_req)
    step = asyncio.create_task(gen2.__anext__())
    pending = asyncio.create_task(gen3.__anext__())  # capacity 1: waits, never admitted
    await step
    assert await engine.abort(gen3_req.id) == WorkDone(prompt_tokens=0, completion_tokens=0)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 1.0)
    await gen2.aclose()
    await engine.shutdown()


async def test_closing_the_iterator_aborts() -> None:
    engine = await _engine(decode_ms_per_step=2.0)
    gen = engine.generate(completion_request("sim", max_tokens=1000))
    await gen.__anext__()
    await gen.aclose()
    assert engine._running == [] and engine._by_id == {}
    await engine.shutdown()


# -- priority scheduling ----------------------------------------------------------------

INTERACTIVE, STANDARD, BATCH = 0, 1, 3


def test_engine_priorities_follow_vllms_convention() -> None:
    from tokenmill.workers.engines.base import engine_priority

    from tokenmill.wire import Priority

    assert [
        engine_priority(Priority.interactive, False), engine_priority(Priority.standard, False),
        engine_priority(Priority.batch, True), engine_priority(Priority.batch, False),
    ] == [0, 1, 2, 3]
    # urgency only lifts batch lines
    assert engine_priority(Priority.interactive, True) == 0
    assert engine_priority(Priority.standard, True) == 1


async def _drain(gen, finished: list[str], name: str) -> EngineStep:
    last = None
    async for last in gen:
        pass
    finished.append(name)
    assert last is not None and last.done
    return last


async def test_interactive_preempts_the_latest_batch_sequence_and_finishes_first() -> None:
    engine = await _engine(decode_ms_per_step=5.0, capacity=2)
    finished: list[str] = []
    batch = [engine.generate(completion_request("sim", max_tokens=100), BATCH) for _ in range(2)]
    firsts = [await gen.__anext__() for gen in batch]  # both run: every slot is taken
    assert engine.stats() == EngineStats(running=2, waiting=0, kv_cache_usage=None, preemptions=0)
    tasks = [asyncio.create_task(_drain(gen, finished, f"batch{i}")) for i, gen in enumerate(batch)]
    t0 = time.monotonic()
    urgent = engine.generate(completion_request("sim", max_tokens=5), INTERACTIVE)
    first = await urgent.__anext__()
    ttft = time.monotonic() - t0
    assert engine.stats() == EngineStats(running=2, waiting=1, kv_cache_usage=None, preemptions=1)
    last = await asyncio.wait_for(_drain(urgent, finished, "interactive"), 2.0)
    batch_last = await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    await engine.shutdown()
    # it waited for the step in progress and its own, not for 100 tokens of batch
    assert ttft < 0.1 and first.preemptions == 0 and last.preemptions == 0
    assert finished == ["interactive", "batch0", "batch1"]
    # the later batch sequence made room; the earlier one ran on
    assert [s.preemptions for s in batch_last] == [0, 1]
    assert [s.completion_tokens for s in batch_last] == [100, 100]
    assert firsts[0].preemptions == firsts[1].preemptions == 0
    assert engine.stats().preemptions == 1


async def test_fifo_within_a_priority_and_preemption_only_for_a_better_one() -> None:
    engine = await _engine(decode_ms_per_step=2.0, capacity=1)
    finished: list[str] = []
    running = engine.generate(completion_request("sim", max_tokens=20), BATCH)
    await running.__anext__()
    order = [("s1", STANDARD), ("b1", BATCH), ("s2", STANDARD), ("b2", BATCH)]
    tasks = [asyncio.create_task(_drain(running, finished, "b0"))] + [
        asyncio.create_task(_drain(engine.generate(completion_request("sim", max_tokens=5), p), finished, n))
        for n, p in order
    ]
    last = await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    await engine.shutdown()
    # s1 preempts b0 (better priority); s2 waits for s1 (same priority); the batch
    # sequences then run in arrival order, b0 first
    assert finished == ["s1", "s2", "b0", "b1", "b2"]
    assert [s.preemptions for s in last] == [1, 0, 0, 0, 0]
    assert engine.stats().preemptions == 1


class _MeteredTiming(SimTiming):
    """Records the prefill tokens of every step."""

    _admitted: list[int] = PrivateAttr(default_factory=list)

    def step_s(self, running: int, admitted_tokens: int) -> float:
        if admitted_tokens:
            self._admitted.append(admitted_tokens)
        return super().step_s(running, admitted_tokens)


async def test_a_preempted_sequence_recomputes_its_prompt_and_output() -> None:
    timing = _MeteredTiming(decode_ms_per_step=2.0, prefill_ms_per_token=0.1)
    engine = SimEngine(timing, capacity=1)
    await engine.start()
    batch_req = completion_request("sim", " ".join(["w"] * 10), max_tokens=40)
    batch = engine.generate(batch_req, BATCH)
    seen = 0
    while seen < 5:  # some output to recompute
        seen = (await batch.__anext__()).completion_tokens
    done = asyncio.create_task(_drain(batch, [], "batch"))
    urgent = engine.generate(completion_request("sim", "hi", max_tokens=2), INTERACTIVE)
    await urgent.__anext__()
    generated = engine._by_id[batch_req.id].generated  # frozen while it waits, preempted
    await _drain(urgent, [], "interactive")
    last = await asyncio.wait_for(done, 2.0)
    await engine.shutdown()
    assert last.preemptions == 1 and last.completion_tokens == 40
    # prefills: the batch prompt, the interactive prompt, then the batch prompt again
    # with every token it had generated when it was preempted
    assert timing._admitted == [10, 1, 10 + generated] and generated >= 5


async def test_fcfs_policy_ignores_priorities() -> None:
    engine = SimEngine(SimTiming(decode_ms_per_step=2.0, scheduling_policy="fcfs"), capacity=1)
    await engine.start()
    finished: list[str] = []
    running = engine.generate(completion_request("sim", max_tokens=10), BATCH)
    await running.__anext__()
    tasks = [
        asyncio.create_task(_drain(running, finished, "batch")),
        asyncio.create_task(_drain(engine.generate(completion_request("sim", max_tokens=2), INTERACTIVE),
                                   finished, "interactive")),
    ]  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    await engine.shutdown()
    assert finished == ["batch", "interactive"] and engine.stats().preemptions == 0


async def test_waiting_counts_what_a_step_could_not_admit_not_what_just_arrived() -> None:
    """The scheduler holds batch work back while an engine reports requests waiting: a
    sequence that only waits for the next step to start must not count."""
    engine = await _engine(decode_ms_per_step=20.0, capacity=2)
    gens = [engine.generate(completion_request("sim", max_tokens=50), BATCH) for _ in range(3)]
    await gens[0].__anext__()
    assert engine.stats().waiting == 0 and engine.stats().running == 1
    second = asyncio.create_task(gens[1].__anext__())
    await asyncio.sleep(0)  # it arrived; the step in progress has not ended yet
    assert engine.stats().waiting == 0
    await second
    third = asyncio.create_task(gens[2].__anext__())  # no slot: no step can admit it
    deadline = time.monotonic() + 2.0
    while engine.stats().waiting == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert engine.stats() == EngineStats(running=2, waiting=1, kv_cache_usage=None, preemptions=0)
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    for gen in gens:
        await gen.aclose()
    await engine.shutdown()

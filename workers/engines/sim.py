"""SIMULATED engine: no model, no GPU — a documented timing model for running and
load-testing tokenmill's control plane. Its output is filler text; everything it
touches is labelled ``simulated`` (events, heartbeats, results, worker names).

Timing model (continuous batching, one step loop like vLLM's):

* Up to ``capacity`` sequences run at once; more wait, and are admitted at the start of
  a step as running ones finish.
* A step advances every running sequence by one token and lasts::

      decode_ms_per_step + decode_ms_per_seq * running + prefill_ms_per_token * admitted_tokens

  where ``running`` counts the sequences in the step (those admitted in it included)
  and ``admitted_tokens`` sums the prefill of the sequences admitted in it: a new
  sequence's prefill is paid in the step that yields its first token.
* So a lone request with ``P`` prompt tokens and ``N`` output tokens has
  ``TTFT = P*prefill + step + seq`` and ``E2E = P*prefill + N*(step + seq)``.
* With every cost ``0`` a step only yields to the event loop: control-plane load
  tests measure tokenmill, not the engine.

Priority scheduling, as vLLM's ``priority`` policy (``generate``'s ``priority``, lower
runs first, see :func:`~.base.engine_priority`):

* The waiting queue is ordered by (priority, arrival): FIFO within one priority.
* When no slot is free and the best waiting sequence has a strictly better priority
  than the worst running one (highest priority value, latest arrival), that one is
  preempted: it goes back to the waiting queue keeping its generated tokens, and when
  admitted again pays prefill for its prompt *and* those tokens (vLLM recomputes a
  preempted sequence's KV cache). vLLM preempts when KV blocks run out, not when slots
  do; here slots stand for both. Preemptions are counted per sequence
  (``EngineStep.preemptions``) and in total (:meth:`SimEngine.stats`).
* ``scheduling_policy = "fcfs"`` ignores priorities: arrival order, no preemption.

Token counts: the prompt counts one token per whitespace-separated word (chat: of
every message's content, plus 4 per message and 2 for the reply's header);
the completion is ``min(max_tokens, output_tokens)`` tokens (``output_tokens``
unset: ``max_tokens``), each one filler word; ``finish_reason`` is ``length``
when ``max_tokens`` ends it, else ``stop``. An abort reports the work done: the prompt
once admitted to a step (its prefill is paid there) and the tokens generated so far.

Embeddings (``/v1/embeddings``): a request is one sequence that is admitted like any
other, pays the prefill of all its inputs in that step and ends with it, generating
nothing. Its vectors are deterministic — the same input always gives the same vector:
``embedding_dim`` normal deviates seeded by a hash of the input (text or token ids),
cut to ``dimensions`` if asked, L2-normalised. They carry no meaning: control-plane
tests and load tests only.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import EngineDeadError
from ...tokens import sim_prompt_tokens
from ...wire import Endpoint, InferenceRequest
from .base import (
    EngineStats,
    EngineStep,
    WorkDone,
    embedding_dimensions,
    embeddings_of,
    prompt_of,
    sampling_options,
)

__all__ = ["SimEngine", "SimTiming", "count_prompt_tokens", "sim_embedding"]

_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


class SimTiming(BaseModel):
    """The simulated engine's ``engine_args``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_ms_per_token: float = Field(default=0.0, ge=0)
    decode_ms_per_step: float = Field(default=0.0, ge=0)
    decode_ms_per_seq: float = Field(default=0.0, ge=0)
    #: completion length cap below max_tokens (None: always max_tokens)
    output_tokens: int | None = Field(default=None, ge=1)
    #: ``priority`` (as described above) or ``fcfs``: arrival order only, no
    #: preemption (vLLM's default policy), e.g. for contrast in bench/isolation.py
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    #: size of the simulated embedding vectors
    embedding_dim: int = Field(default=384, ge=1, le=65_536)

    def step_s(self, running: int, admitted_tokens: int) -> float:
        """Duration of one step, in seconds."""
        ms = (
            self.decode_ms_per_step
            + self.decode_ms_per_seq * running
            + self.prefill_ms_per_token * admitted_tokens
        )
        return ms / 1000.0


def count_prompt_tokens(request: InferenceRequest) -> int:
    """The simulated prompt length: :func:`tokenmill.tokens.sim_prompt_tokens`, the
    count budgets reserve with (see the module docstring)."""
    if request.endpoint is Endpoint.embeddings:
        return sim_prompt_tokens(embeddings_of(request))
    return sim_prompt_tokens(prompt_of(request))


def sim_embedding(value: str | list[int], dim: int, dimensions: int | None = None) -> list[float]:
    """The simulated vector of one input (see the module docstring)."""
    seed = hashlib.blake2b(json.dumps(value).encode(), digest_size=16).digest()
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)][: dimensions or dim]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


@dataclass(eq=False)
class _Seq:
    prompt_tokens: int
    target: int
    finish_reason: str
    #: engine priority (lower runs first), then arrival order: the scheduling key
    priority: int
    arrival: int
    generated: int = 0
    preemptions: int = 0
    pending: list[str] = field(default_factory=list)
    #: an embeddings request: ends in the step that admits it, generating nothing
    embeds: bool = False
    #: taken from the waiting queue into a step: its prefill is paid
    admitted: bool = False
    finished: bool = False
    aborted: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def _key(seq: _Seq) -> tuple[int, int]:
    """The scheduling order: priority, then arrival."""
    return (seq.priority, seq.arrival)


class SimEngine:
    """The simulated engine (see the module docstring for its timing model)."""

    name = "sim"
    simulated = True

    def __init__(self, timing: SimTiming, capacity: int) -> None:
        self.timing = timing
        self.capacity = capacity
        #: ordered by :func:`_key`
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._arrivals = itertools.count()
        self._preemptions = 0
        #: sequences the last step could not admit (see :meth:`stats`)
        self._not_admitted = 0
        self._by_id: dict[str, _Seq] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._step_loop(), name="sim-engine-steps")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for rid in list(self._by_id):
            await self.abort(rid)

    def stats(self) -> EngineStats:
        # Waiting: what the last step could not admit, as vLLM's count after a step. A
        # sequence that arrived since waits only for the next step to start; counted, it
        # read as a full engine to the scheduler, which held batch work back for a
        # heartbeat (up to a second).
        return EngineStats(
            running=len(self._running),
            waiting=self._not_admitted,
            kv_cache_usage=None,
            preemptions=self._preemptions,
        )

    async def abort(self, request_id: str) -> WorkDone | None:
        seq = self._by_id.pop(request_id, None)
        if seq is None or seq.finished:
            return None
        done = WorkDone(seq.prompt_tokens if seq.admitted else 0, seq.generated)
        seq.aborted = True
        if seq in self._running:
            self._running.remove(seq)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        seq.ready.set()
        return done

    async def generate(
        self, request: InferenceRequest, priority: int = 0
    ) -> AsyncIterator[EngineStep]:
        if self._dead is not None or self._loop_task is None:
            raise EngineDeadError(f"simulated engine is not running: {self._dead!r}")
        embeds = request.endpoint is Endpoint.embeddings
        if embeds:
            target, finish = 0, "stop"
        else:
            opts = sampling_options(request)
            cap = self.timing.output_tokens
            target = opts.max_tokens if cap is None else min(cap, opts.max_tokens)
            finish = "length" if target == opts.max_tokens else "stop"
        seq = _Seq(
            prompt_tokens=count_prompt_tokens(request),
            target=target,
            finish_reason=finish,
            priority=priority if self.timing.scheduling_policy == "priority" else 0,
            arrival=next(self._arrivals),
            embeds=embeds,
        )
        self._by_id[request.id] = seq
        bisect.insort(self._waiting, seq, key=_key)
        self._wake.set()
        try:
            while True:
                await seq.ready.wait()
                seq.ready.clear()
                if seq.aborted:
                    return
                if self._dead is not None:
                    raise EngineDeadError(f"simulated engine died: {self._dead!r}")
                text = "".join(seq.pending)
                seq.pending.clear()
                done = seq.finished
                vectors = None
                if seq.embeds and done:
                    dim, want = self.timing.embedding_dim, embedding_dimensions(request)
                    vectors = tuple(sim_embedding(v, dim, want) for v in embeddings_of(request))
                yield EngineStep(
                    text=text,
                    completion_tokens=seq.generated,
                    prompt_tokens=seq.prompt_tokens,
                    finish_reason=seq.finish_reason if done else None,
                    preemptions=seq.preemptions,
                    embeddings=vectors,
                )
                if done:
                    return
        finally:
            if not seq.finished and not seq.aborted:
                await self.abort(request.id)
            self._by_id.pop(request.id, None)

    def _admit(self) -> int:
        """Fill free slots from the waiting queue, preempting for better priorities;
        returns the tokens to prefill (a preempted sequence recomputes its output)."""
        tokens = 0
        while self._waiting:
            best = self._waiting[0]
            if len(self._running) >= self.capacity:
                worst = max(self._running, key=_key)
                if best.priority >= worst.priority:
                    break
                self._running.remove(worst)
                worst.preemptions += 1
                self._preemptions += 1
                bisect.insort(self._waiting, worst, key=_key)  # ranks below ``best``
            del self._waiting[0]  # ``best``
            best.admitted = True
            self._running.append(best)
            tokens += best.prompt_tokens + best.generated
        return tokens

    async def _step_loop(self) -> None:
        try:
            next_at = time.monotonic()
            while True:
                if not self._running and not self._waiting:
                    self._not_admitted = 0
                    self._wake.clear()
                    await self._wake.wait()
                    next_at = time.monotonic()
                admitted_tokens = self._admit()
                self._not_admitted = len(self._waiting)
                step_s = self.timing.step_s(len(self._running), admitted_tokens)
                next_at = max(next_at + step_s, time.monotonic() - 0.05)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                still: list[_Seq] = []
                for seq in self._running:
                    if seq.aborted:
                        continue
                    if seq.embeds:  # prefilled in this step: done, nothing generated
                        seq.finished = True
                        seq.ready.set()
                        continue
                    seq.pending.append(" " + _WORDS[seq.generated % len(_WORDS)])
                    seq.generated += 1
                    if seq.generated >= seq.target:
                        seq.finished = True
                    else:
                        still.append(seq)
                    seq.ready.set()
                self._running = still
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # pragma: no cover - a bug in the loop
            self._dead = exc
            for seq in [*self._running, *self._waiting]:
                seq.ready.set()
            raise

"""One attempt of one request: its mutable state, and the token events it makes.

Events of an attempt share ``attempt`` and are numbered by ``seq``; each carries
``delta_tokens`` since the previous one, so the deltas sum to the final count.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..wire import Dispatch, EventKind, InferenceRequest, TokenEvent

__all__ = ["Attempt"]


@dataclass(eq=False)
class Attempt:
    """Mutable state of one attempt of one request (owned by the host's loop)."""

    dispatch: Dispatch
    attempt: int
    worker: str
    simulated: bool
    seq: int = 0
    text: list[str] = field(default_factory=list)
    stream_text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    event_tokens: int = 0
    event_at: float = 0.0
    first_token_at: float | None = None
    #: times the engine preempted it (the engine's count, from its latest step)
    preemptions: int = 0
    finish_reason: str | None = None
    #: an embeddings request's vectors (its engine's only step)
    embeddings: tuple[list[float], ...] | None = None
    cancel_requested: bool = False
    gen_task: asyncio.Task[None] | None = None

    #: the dispatch's request, and whether it streams (read on every engine step)
    request: InferenceRequest = field(init=False)
    streaming: bool = field(init=False)

    def __post_init__(self) -> None:
        self.request = self.dispatch.request
        self.streaming = bool(self.request.body.get("stream"))

    def event(self, kind: EventKind, **extra: Any) -> TokenEvent:
        req = self.request
        now = time.time()
        ev = TokenEvent(
            kind=kind,
            request_id=req.id,
            tenant=req.tenant,
            model=req.model,
            priority=req.priority,
            worker=self.worker,
            attempt=self.attempt,
            seq=self.seq,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            delta_tokens=self.completion_tokens - self.event_tokens,
            ts=now,
            submitted_at=req.submitted_at,
            dispatched_at=self.dispatch.dispatched_at,
            first_token_at=self.first_token_at,
            batch_id=req.batch_id,
            custom_id=req.custom_id,
            simulated=self.simulated,
            **extra,
        )
        self.seq += 1
        self.event_tokens = self.completion_tokens
        self.event_at = now
        return ev

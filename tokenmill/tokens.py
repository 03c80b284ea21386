"""How many prompt tokens a model sees for a request body: the one home of that count.

Budgets reserve ``prompt + max_tokens`` at the model's price before dispatch, so the
prompt count must never fall short of what the engine bills. By engine kind:

* ``sim``: one token per whitespace-separated word (chat: of every message's text,
  plus 4 per message and 2 for the reply's header). The sim engine counts with this
  same function, so the reservation and the bill agree exactly.
* ``vllm``: the model's own Hugging Face tokenizer and chat template, rendered as vLLM's
  chat preprocessing does (``add_generation_prompt=True``, then tokenized without
  special tokens; completions are tokenized with them). Loaded once per model.
* ``openai`` (a remote server whose tokenizer is unknown): an upper bound: the UTF-8
  bytes of the text, since every byte-level BPE token covers at least one byte, plus a
  generous allowance per message for the template's markers. (A template that injects
  a long default system prompt into a tiny conversation could exceed it.)

Message content given as a list of parts counts its text parts joined by newlines, as
vLLM renders them for string-content chat templates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config.models import EngineKind, ModelConfig
from .errors import ConfigError
from .logs import get_logger
from .prompts import embedding_inputs, responses_messages
from .wire import Endpoint
from .workers.engines.factory import resolve_home_path

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["PromptCounter", "counter_for", "load_counters", "message_text", "prompt_tokens", "sim_prompt_tokens"]

log = get_logger(__name__)

#: a prompt as the engines take it: completion text, several prompts or embedding
#: inputs (text or token ids), or chat messages
#: (``list[str | list[int] | Mapping]``: which it is, the list's items say)
Prompt = str | list[Any]
#: counts a body's prompt tokens (``endpoint`` None: chat if it has messages, else completions)
PromptCounter = Callable[[Mapping[str, Any], "Endpoint | None"], int]

#: sim: tokens per message (role markers) and for the reply's header
SIM_PER_MESSAGE = 4
SIM_REPLY = 2
#: remote bound: template markers per message (role, start/end tokens, separators;
#: real templates use 3-8) and per conversation (the reply's header, and room for a
#: short default system prompt some templates add, e.g. SmolLM2's ~20 tokens)
REMOTE_PER_MESSAGE = 16
REMOTE_REPLY = 64


def message_text(message: Mapping[str, Any]) -> str:
    """A chat message's text: its string content, or its text parts joined by newlines."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text") or "")
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return str(content)


def _prompt_of(body: Mapping[str, Any], endpoint: Endpoint | None = None) -> Prompt:
    """What the engine reads for ``body`` (``endpoint`` None: chat if it has messages,
    else completions); malformed shapes count as empty (validation says why)."""
    if endpoint is Endpoint.embeddings:
        try:
            return list(embedding_inputs(body))
        except ValueError:
            return ""
    if endpoint is Endpoint.responses:
        try:
            return responses_messages(body)
        except ValueError:
            return []
    if "messages" in body:
        return [m for m in body["messages"] if isinstance(m, Mapping)]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return (
            prompt[0]
            if len(prompt) == 1 and isinstance(prompt[0], str)
            else [str(p) for p in prompt]
        )
    return str(prompt)


def _several(prompt: Any) -> bool:
    """Several completion prompts or embedding inputs (strings or token-id lists), not
    chat messages."""
    return bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)


def sim_prompt_tokens(prompt: str | list[Any]) -> int:
    """The sim engine's prompt length: words (chat: of each message, plus markers; a
    token-id input: its length)."""
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    if _several(prompt):  # several completion prompts or embedding inputs
        return sum(max(1, len(p.split())) if isinstance(p, str) else len(p) for p in prompt)
    return sum(len(message_text(m).split()) + SIM_PER_MESSAGE for m in prompt) + SIM_REPLY


def _sim(body: Mapping[str, Any], endpoint: Endpoint | None = None) -> int:
    return sim_prompt_tokens(_prompt_of(body, endpoint))


def _remote_bound(body: Mapping[str, Any], endpoint: Endpoint | None = None) -> int:
    prompt = _prompt_of(body, endpoint)
    if isinstance(prompt, str):
        return len(prompt.encode()) + 2  # BOS/EOS the server may add
    if _several(prompt):
        return sum(len(p.encode()) + 2 if isinstance(p, str) else len(p) for p in prompt)
    total = REMOTE_REPLY
    for m in prompt:
        total += REMOTE_PER_MESSAGE + len(message_text(m).encode())
        total += len(str(m.get("role") or "").encode()) + len(str(m.get("name") or "").encode())
    return total


class _HfCounter:
    """Counts with a model's Hugging Face tokenizer, as vLLM's renderer does."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the tokenizer at {path!r} to count prompt tokens: {exc}"
            ) from exc

    def __call__(self, body: Mapping[str, Any], endpoint: Endpoint | None = None) -> int:
        prompt = _prompt_of(body, endpoint)
        tok = self.tokenizer
        if isinstance(prompt, str):
            return len(tok(prompt, add_special_tokens=True)["input_ids"])
        if _several(prompt):  # token ids go to the engine as they are
            return sum(len(tok(p, add_special_tokens=True)["input_ids"]) if isinstance(p, str) else len(p)
                       for p in prompt)
        messages = [{**m, "content": message_text(m)} for m in prompt]
        text = tok.apply_chat_template(
            messages, add_generation_prompt=True, continue_final_message=False, tokenize=False
        )
        return len(tok(text, add_special_tokens=False)["input_ids"])


_LOCK = threading.Lock()
_HF: dict[str, _HfCounter] = {}
#: tokenizer directories found absent, and when to look again
_ABSENT: dict[str, float] = {}
#: how often to look again for a tokenizer not there yet (the worker builds the demo
#: model on its first start)
RETRY_ABSENT_S = 30.0


def _tokenizer_path(cfg: ModelConfig, home: Path) -> str:
    path = cfg.engine_args.get("tokenizer") or cfg.engine_args.get("model")
    if not isinstance(path, str) or not path:
        raise ConfigError("vllm engine needs engine_args.model to count prompt tokens")
    return resolve_home_path(path, home)


def _names_a_path(path: str) -> bool:
    """A local path, not a Hugging Face hub id."""
    return path.startswith(("/", ".")) or Path(path).exists()


def counter_for(model: str, cfg: ModelConfig, home: Path) -> PromptCounter:
    """The prompt counter of ``model`` (a vLLM model's tokenizer is loaded once, then
    cached). A vLLM model whose local tokenizer directory is not there yet (the demo
    model is built by its worker's first start) is counted with the remote upper bound
    until it is.

    Raises:
        ConfigError: a vLLM model's tokenizer cannot be loaded.
    """
    if cfg.engine is EngineKind.sim:
        return _sim
    if cfg.engine is EngineKind.openai:
        return _remote_bound
    path = _tokenizer_path(cfg, home)
    counter = _HF.get(path)
    if counter is not None:
        return counter
    now = time.monotonic()
    if _ABSENT.get(path, 0.0) > now:
        return _remote_bound
    if _names_a_path(path) and not Path(path).is_dir():
        _ABSENT[path] = now + RETRY_ABSENT_S
        log.warning("tokenizer not there yet: reserving an upper bound", model=model, path=path)
        return _remote_bound
    if _in_event_loop():
        # Loading transformers and a tokenizer takes seconds: never on a server's loop.
        # Until it is loaded, reserve the upper bound (always safe for a budget).
        _load_in_background(model, path)
        return _remote_bound
    return _load(model, path)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _load(model: str, path: str) -> PromptCounter:
    with _LOCK:
        counter = _HF.get(path)
        if counter is None:
            try:
                counter = _HF[path] = _HfCounter(path)
            except ConfigError as exc:
                raise ConfigError(f"models.{model}: {exc}") from None
    return counter


_LOADING: set[str] = set()


def _load_in_background(model: str, path: str) -> None:
    with _LOCK:
        if path in _LOADING:
            return
        _LOADING.add(path)

    def run() -> None:
        try:
            _load(model, path)
        except ConfigError as exc:
            log.error("tokenizer not loaded: reserving an upper bound", model=model, error=str(exc))
            _ABSENT[path] = time.monotonic() + RETRY_ABSENT_S
        finally:
            with _LOCK:
                _LOADING.discard(path)

    threading.Thread(target=run, name=f"tokenizer-{model}", daemon=True).start()


def load_counters(settings: Settings) -> None:
    """Load every configured model's counter now (blocking: a service's start-up, off
    its event loop), so the first requests are counted exactly, not bounded."""
    for name, cfg in settings.models.items():
        try:
            counter_for(name, cfg, settings.home)
        except ConfigError as exc:
            log.error("prompt counter not loaded", model=name, error=str(exc))


def prompt_tokens(
    settings: Settings, model: str, body: Mapping[str, Any], endpoint: Endpoint | None = None
) -> int:
    """Prompt tokens ``model`` sees for ``body`` sent to ``endpoint`` (None: chat if it
    has messages, else completions): exact (sim, vLLM) or an upper bound. Embeddings:
    the sum over the inputs (each text with the tokenizer's special tokens, as the
    engine adds them; token ids as given).

    Raises:
        ConfigError: the model's tokenizer cannot be loaded.
    """
    return counter_for(model, settings.models[model], settings.home)(body, endpoint)

"""The OpenAI request bodies tokenmill accepts, validated in one place.

Every door uses :func:`validate_body`: the gateway's ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``, batch lines (``/v1/responses`` too) and the
trusted producer. A problem is a
:class:`~tokenmill.errors.ValidationError` whose ``field`` is the OpenAI ``param``
(``messages[0].role``), so the HTTP answer and a batch error row name the same place.

The models are strict (``"0.7"`` is not a temperature) and refuse unknown fields, as
OpenAI does: a parameter the engine would silently ignore is an error, not a surprise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ValidationError
from ..wire import Endpoint

__all__ = ["MAX_DEPTH", "MAX_TOKENS", "SAMPLING_PARAMS", "check_json_value", "param_of", "validate_body"]

#: the most tokens a request may ask for (the wire's bound)
MAX_TOKENS = 1_000_000
#: deepest nesting of objects and arrays in a body; real requests need a handful
MAX_DEPTH = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    # One choice per request: the engines return one, so more would be silently dropped.
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra sampling parameters, so files written for `vllm run-batch` run unchanged.
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    # The engines return no log probabilities; asking for them is refused, not ignored.
    logprobs: Literal[False] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None


class CompletionBody(_Common):
    # One prompt a request (a list holds exactly one string).
    prompt: str | list[str] = Field(min_length=1)
    logprobs: Literal[0] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("one prompt a request: a list must hold exactly one string")
        return v


#: OpenAI's bound on the inputs of one embeddings request
MAX_EMBEDDING_INPUTS = 2048


def _token_ids(v: list[int]) -> list[int]:
    if not v:
        raise ValueError("a token-id input must not be empty")
    if any(t < 0 for t in v):
        raise ValueError("token ids must be >= 0")
    return v


class EmbeddingBody(_Strict):
    model: str = Field(min_length=1, max_length=256)
    # a string, strings, token ids, or lists of token ids (OpenAI's four shapes)
    input: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)
    # vLLM's own, so `vllm run-batch` embedding lines run unchanged
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: Literal[True] | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], int):  # one input of token ids
            return _token_ids(v)
        if isinstance(v, list) and len(v) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs a request")
        if isinstance(v, list) and v and isinstance(v[0], list):
            for ids in v:
                _token_ids(ids)
        return v


class ResponsesContentPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    # output_text parts of an earlier reply carry these; they do not reach the model
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class ResponsesMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponsesContentPart]
    # an earlier reply's item id and status, as OpenAI echoes them
    id: str | None = None
    status: str | None = None


class TextFormat(_Strict):
    # Only plain text: structured output (json_schema, json_object) is not run yet,
    # and refusing it beats returning unconstrained text.
    type: Literal["text"]


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesBody(_Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[ResponsesMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    # Responses are answered, not kept for retrieval by id: store is accepted and moot.
    store: bool | None = None
    stream: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None


_MODEL_OF: dict[Endpoint, type[BaseModel]] = {
    Endpoint.chat_completions: ChatBody,
    Endpoint.completions: CompletionBody,
    Endpoint.responses: ResponsesBody,
    Endpoint.embeddings: EmbeddingBody,
}

#: the sampling parameters a body may carry besides model, messages/prompt and limits
SAMPLING_PARAMS = frozenset(
    (set(ChatBody.model_fields) | set(CompletionBody.model_fields))
    - {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "service_tier"}
)


def param_of(loc: Iterable[int | str]) -> str:
    """pydantic's ``("messages", 0, "role")`` → OpenAI's ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        else:
            out += f".{part}"
    return out


def check_json_value(value: Any, where: str = "") -> None:
    """Refuse what no engine can take and what a serializer chokes on: nesting deeper
    than :data:`MAX_DEPTH`, and strings that are not valid Unicode (lone surrogates,
    which ``json.loads`` lets through from ``\\ud800`` escapes).

    Every line of a batch passes here, so the walk keeps only a parent link per node
    and spells a path out only for the error; ASCII strings (most) need no encoding.

    Raises:
        ValidationError: naming the place.
    """
    Node = tuple[Any, Any, "int | str | None", int]  # value, parent node, step from it, depth
    stack: list[Node] = [(value, None, None, 0)]
    while stack:
        node = stack.pop()
        item, _, _, depth = node
        kind = type(item)
        if kind is str:
            if not item.isascii() and not _valid_unicode(item):
                at = _path(node, where)
                raise ValidationError(f"{at or 'body'}: not valid Unicode (a lone surrogate)", field=at or None)
        elif kind is dict or kind is list:
            if depth >= MAX_DEPTH:
                top = re.split(r"[.\[]", _path(node, where), maxsplit=1)[0]  # the field, not 32 steps
                raise ValidationError(f"{top or 'body'}: nested deeper than {MAX_DEPTH} levels", field=top or None)
            if kind is dict:
                for k, v in item.items():
                    if type(k) is str and not k.isascii() and not _valid_unicode(k):
                        at = _path(node, where)
                        raise ValidationError(f"{at or 'body'}: a key is not valid Unicode (a lone surrogate)",
                                              field=at or None)
                    stack.append((v, node, k, depth + 1))
            else:
                stack.extend((v, node, i, depth + 1) for i, v in enumerate(item))


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(node: Any, where: str) -> str:
    steps: list[int | str] = []
    while node is not None and node[1] is not None:
        steps.append(node[2])
        node = node[1]
    out = where
    for step in reversed(steps):
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def validate_body(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    """Check an OpenAI request body for ``endpoint``.

    Raises:
        ValidationError: with ``field`` the OpenAI ``param`` of the first problem.
    """
    check_json_value(body)
    try:
        _MODEL_OF[endpoint].model_validate(body)
    except pydantic.ValidationError as exc:
        loc, msg = _first_problem(exc.errors())
        param = param_of(loc)
        raise ValidationError(f"{param}: {msg}", field=param) from None


def _first_problem(errors: list[Any]) -> tuple[tuple[int | str, ...], str]:
    """The location and message of the first field's problem. A union
    (``content: str | list``) reports one error per member, under locations that
    end in the member's name: those are folded into one at the field."""
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return first["loc"], "unrecognized request argument"
    deep = max(errors, key=lambda e: len(e["loc"]))
    if len(deep["loc"]) >= len(first["loc"]) + 2 and any(_is_member(s) for s in deep["loc"]):
        # A union member the value took the shape of failed inside: that is the problem
        # (``input[0].content[0].type``), not "must be a string or an array".
        first = {**deep, "loc": tuple(s for s in deep["loc"] if not _is_member(s))}
    k = len(first["loc"]) - 1
    # Union members differ in a last, named step (``str``, ``list[ContentPart]``), not an index.
    same = [e for e in errors if len(e["loc"]) > k and e["loc"][:k] == first["loc"][:k]
            and isinstance(e["loc"][k], str) and isinstance(first["loc"][k], str)] if k > 0 else [first]
    if len(same) > 1:
        common = list(first["loc"])
        for e in same[1:]:
            n = 0
            while n < min(len(common), len(e["loc"])) and common[n] == e["loc"][n]:
                n += 1
            common = common[:n]
        if len(common) < len(first["loc"]):
            kinds = " or ".join(dict.fromkeys(_expected(e) for e in same))
            return tuple(common), f"must be {kinds}, got {_describe(first.get('input'))}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("missing", "value_error") and "input" in first:
        msg += f", got {_describe(first['input'])}"
    return first["loc"], msg


def _is_member(step: int | str) -> bool:
    """A union member's name in a pydantic location (``str``, ``list[int]``, a model)."""
    return isinstance(step, str) and (step in ("str", "int", "float", "bool") or step.startswith(("list[", "dict["))
                                      or step[:1].isupper())


def _expected(err: Any) -> str:
    return {"string_type": "a string", "list_type": "an array", "model_type": "an object",
            "dict_type": "an object", "int_type": "an integer", "float_type": "a number",
            "bool_type": "a boolean", "none_required": "null"}.get(err["type"], str(err["loc"][-1]))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

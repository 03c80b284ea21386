"""What a request body gives an engine to read, by endpoint: the one home of that mapping.

* ``/v1/chat/completions``: the ``messages``.
* ``/v1/responses``: chat messages too — ``instructions`` becomes a leading system
  message, a string ``input`` one user message, and input items (``{"role", "content"}``
  messages, with ``input_text``/``output_text`` parts) one message each, their text
  parts joined by newlines as chat templates take list content.
* ``/v1/completions``: the ``prompt``.
* ``/v1/embeddings``: the ``input`` — a string, a list of strings, a list of token ids
  or a list of token-id lists; one vector per string or token list.

Bodies reaching here were validated (:mod:`tokenmill.producers.bodies`); the shapes are
still checked, so a wire message from elsewhere fails with a :class:`ValueError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

__all__ = ["RESPONSES_TEXT_PARTS", "EmbeddingInput", "embedding_inputs", "is_token_list", "responses_messages"]

#: an embedding input as the engines take it: text, or token ids
EmbeddingInput = str | list[int]
#: content part types of a Responses message that carry text
RESPONSES_TEXT_PARTS = ("input_text", "output_text")


def is_token_list(value: Any) -> TypeGuard[list[int]]:
    """A non-empty list of token ids (ints, not booleans)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def embedding_inputs(body: Mapping[str, Any]) -> list[EmbeddingInput]:
    """The inputs of an embeddings body, one per vector asked for.

    Raises:
        ValueError: ``input`` is none of the accepted shapes.
    """
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if is_token_list(value):
        return [list(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(is_token_list(v) for v in value):
            return [list(v) for v in value]
    raise ValueError("input must be a string, a list of strings, a list of token ids or a list of them")


def responses_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses body stands for.

    Raises:
        ValueError: an input item is not a message with text content.
    """
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": str(instructions)})
    value = body.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise ValueError("input must be a string or a non-empty list of input items")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or item.get("type", "message") != "message":
            raise ValueError(f"input[{i}]: only message items are supported")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") not in RESPONSES_TEXT_PARTS:
                    raise ValueError(f"input[{i}].content[{j}]: only input_text and output_text parts are supported")
                texts.append(str(part.get("text") or ""))
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"input[{i}].content must be a string or a list of parts")  # noqa: TRY004 - callers map ValueError to a validation error
        messages.append({"role": item.get("role"), "content": content})
    return messages

"""Property tests of the one OpenAI body validator every door uses."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.errors import ValidationError
from tokenmill.producers.bodies import MAX_DEPTH, check_json_value, param_of, validate_body
from tokenmill.wire import Endpoint

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), inner, max_size=4),
    max_leaves=20,
)
KEYS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream",
        "stream_options", "seed", "logprobs", "service_tier", "user", "unknown_field"]
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
PARAM = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\]|\.[^.\[\]]+)*$")


@settings(max_examples=400, deadline=None)
@given(body=bodies, endpoint=st.sampled_from(list(Endpoint)))
def test_any_json_body_is_accepted_or_refused_naming_a_field_of_it(body: dict[str, Any], endpoint: Endpoint) -> None:
    try:
        validate_body(body, endpoint)
    except ValidationError as exc:
        assert exc.field, str(exc)
        assert PARAM.match(exc.field), exc.field
        top = re.split(r"[.\[]", exc.field, maxsplit=1)[0]
        # the named field is one the body has, or a required one it lacks
        assert top in body or top in ("model", "messages", "prompt", "input"), (exc.field, body)
        assert str(exc).startswith(exc.field + ": ")


@given(loc=st.lists(st.one_of(st.integers(0, 99), st.from_regex(r"[a-z_]{1,8}", fullmatch=True)),
                    min_size=1, max_size=6).filter(lambda loc: isinstance(loc[0], str)))
def test_param_of_writes_indexes_in_brackets_and_names_after_dots(loc: list[int | str]) -> None:
    out = param_of(loc)
    assert PARAM.match(out)
    assert out.count("[") == sum(isinstance(p, int) for p in loc)
    assert out.count(".") == sum(isinstance(p, str) for p in loc) - 1


@given(depth=st.integers(1, 3 * MAX_DEPTH), as_list=st.booleans())
def test_nesting_is_refused_exactly_past_the_limit(depth: int, as_list: bool) -> None:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    body = {"response_format": value}
    if depth < MAX_DEPTH:
        check_json_value(body)
    else:
        try:
            check_json_value(body)
        except ValidationError as exc:
            assert exc.field == "response_format"
        else:
            raise AssertionError(f"depth {depth} was accepted")


@given(text=st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3))
def test_lone_surrogates_anywhere_are_refused_with_their_place(text: str) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": text}]}
    try:
        validate_body(body, Endpoint.chat_completions)
    except ValidationError as exc:
        assert exc.field == "messages[1].content"
    else:
        raise AssertionError("a lone surrogate was accepted")


def test_valid_bodies_pass() -> None:
    validate_body({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "max_tokens": 5, "temperature": 0, "stop": ["\n"], "stream": True,
                   "stream_options": {"include_usage": True}}, Endpoint.chat_completions)
    validate_body({"model": "m", "prompt": ["once"], "max_tokens": 1}, Endpoint.completions)

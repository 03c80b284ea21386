"""The batch file parser: each kind of bad line, file limits, vLLM files unchanged, and
property tests (every line lands exactly once; arbitrary bytes never crash it)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tokenmill.config import EXAMPLE_CONFIG, load_settings
from tokenmill.config.models import BatchSettings
from tokenmill.producers.batch_parser import LineErrorCode, entry_id, parse_batch

from tokenmill.errors import ValidationError
from tokenmill.wire import Endpoint, Priority, batch_request_id

BATCH = "batch_test"
EXAMPLE_BATCH = Path(__file__).resolve().parents[2] / "config" / "example_batch.jsonl"


@pytest.fixture(scope="module")
def settings():
    import os

    old = os.environ.get("TOKENMILL_CONFIG")
    os.environ["TOKENMILL_CONFIG"] = str(EXAMPLE_CONFIG)
    try:
        return load_settings()
    finally:
        if old is None:
            del os.environ["TOKENMILL_CONFIG"]
        else:
            os.environ["TOKENMILL_CONFIG"] = old


def chat(cid: object, content: str = "hi", **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "sim", "messages": [{"role": "user", "content": content}], **body}}


def jsonl(*items: object) -> bytes:
    return b"\n".join(i if isinstance(i, bytes) else json.dumps(i).encode() for i in items) + b"\n"


def parse(settings, data: bytes, **kw):
    return parse_batch(data, settings, tenant="alpha", batch_id=BATCH, **kw)


def test_valid_lines_become_requests_with_stable_ids(settings) -> None:
    data = jsonl(chat("a", max_tokens=7, temperature=0.2),
                 {"custom_id": "b", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "sim", "prompt": "once upon", "max_tokens": 3}})
    parsed = parse(settings, data, deadline=2e9)
    assert parsed.errors == [] and parsed.lines == 2
    a, b = parsed.accepted
    assert (a.line, a.custom_id, b.line, b.custom_id) == (1, "a", 2, "b")
    assert a.request.id == batch_request_id(BATCH, "a") and a.request.batch_id == BATCH
    assert a.request.priority is Priority.batch and a.request.tenant == "alpha"
    assert a.request.max_tokens == 7 and a.request.body["temperature"] == 0.2
    assert a.request.deadline == 2e9
    assert b.request.endpoint is Endpoint.completions
    assert parsed.endpoint is Endpoint.chat_completions


def test_each_kind_of_bad_line_is_reported_with_its_line_and_reason(settings) -> None:
    data = jsonl(
        chat("ok1"),                                                    # 1
        b"{not json",                                                   # 2
        chat("ok1"),                                                    # 3 duplicate
        chat("m", model="nope"),                                        # 4 unknown model
        {**chat("u"), "url": "/v1/chat"},                               # 5 wrong url
        {"custom_id": "nb", "method": "POST", "url": "/v1/chat/completions"},  # 6 missing body
        b"[1, 2]",                                                      # 7 not an object
        {**chat("g"), "method": "GET"},                                 # 8 wrong method
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # 9 no custom_id
        chat(17),                                                       # 10 custom_id not a string
        chat("mt", max_tokens=0),                                       # 11 bad body field
        {"custom_id": "p", "method": "POST", "url": "/v1/completions",
         "body": {"model": "sim", "messages": [{"role": "user", "content": "x"}]}},  # 12
        b"\xff\xfe",                                                    # 13 not UTF-8
        chat("big", "x" * 5000),                                        # 14 oversized
        b"{\"custom_id\": \"nan\", \"x\": NaN}",                         # 15 NaN
        chat("st", stream=True),                                        # 16 streaming
        b"   ",                                                         # 17 blank: skipped
        chat("ok2"),                                                    # 18
        {**chat("sc"), "url": "/v1/score"},                             # 19 vLLM's, not run
        {**chat("rr"), "url": "/v1/rerank"},                            # 20 vLLM's, not run
        {**chat("em"), "url": "/v1/embeddings"},                        # 21 chat body, embeddings url
    )
    parsed = parse(settings, data, limits=BatchSettings(max_line_bytes=4096))
    assert [(a.line, a.custom_id) for a in parsed.accepted] == [(1, "ok1"), (18, "ok2")]
    got = [(e.line, e.code, e.custom_id) for e in parsed.errors]
    C = LineErrorCode
    assert got == [
        (2, C.invalid_json, None), (3, C.duplicate_custom_id, None), (4, C.model_not_found, "m"),
        (5, C.invalid_url, "u"), (6, C.missing_body, "nb"), (7, C.invalid_line, None),
        (8, C.invalid_method, "g"), (9, C.missing_custom_id, None), (10, C.invalid_custom_id, None),
        (11, C.invalid_body, "mt"), (12, C.invalid_body, "p"), (13, C.invalid_encoding, None),
        (14, C.line_too_large, None), (15, C.invalid_json, None), (16, C.invalid_body, "st"),
        (19, C.unsupported_endpoint, "sc"), (20, C.unsupported_endpoint, "rr"), (21, C.invalid_body, "em"),
    ]
    assert parsed.lines == 20
    dup = parsed.errors[1]
    assert dup.message == "custom_id 'ok1' is already used on line 1"
    assert parsed.errors[9].param == "body.max_tokens"
    entry = parsed.errors[2].entry(BATCH)
    assert entry == {
        "id": entry_id(BATCH, 4), "custom_id": "m", "response": None,
        "error": {"code": "model_not_found", "line": 4, "param": "body.model",
                  "message": "line 4: unknown model 'nope' (known: minilm, sim, smollm2)"},
    }


def test_vllm_run_batch_files_are_accepted_unchanged(settings) -> None:
    # The shape of vLLM's examples/offline_inference/openai_batch: CRLF, blank lines,
    # sampling fields we pass through, and a body without "model" (vLLM serves one).
    lines = [
        {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "sim", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                {"role": "user", "content": "Hello world!"}],
                  "max_completion_tokens": 1000}},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                  "max_tokens": 5, "seed": 1, "top_p": 0.9, "response_format": {"type": "text"},
                  "chat_template_kwargs": {"enable_thinking": False}}},
    ]
    data = b"\r\n".join(json.dumps(x).encode() for x in lines) + b"\r\n\r\n"
    parsed = parse(settings, data, default_model="sim")
    assert parsed.errors == [] and [a.custom_id for a in parsed.accepted] == ["request-1", "request-2"]
    assert parsed.accepted[0].request.max_tokens == 1000
    assert parsed.accepted[1].request.body["chat_template_kwargs"] == {"enable_thinking": False}
    assert parsed.accepted[1].request.model == "sim"
    # Without a default model, a line naming none is refused (not guessed).
    assert [e.code for e in parse(settings, data).errors] == [LineErrorCode.model_not_found]


def test_file_limits_refuse_the_whole_file(settings) -> None:
    data = jsonl(chat("a"), chat("b"), chat("c"))
    with pytest.raises(ValidationError, match="3 requests is over the limit of 2"):
        parse(settings, data, limits=BatchSettings(max_lines=2))
    with pytest.raises(ValidationError, match="over the limit of 100 bytes"):
        parse(settings, data, limits=BatchSettings(max_bytes=100))
    assert len(parse(settings, data, limits=BatchSettings(max_lines=3)).accepted) == 3


def test_endpoint_restriction(settings) -> None:
    data = jsonl(chat("a"), {"custom_id": "b", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "sim", "prompt": "x"}})
    parsed = parse(settings, data, endpoint="/v1/completions")
    assert [a.custom_id for a in parsed.accepted] == ["b"]
    assert parsed.errors[0].code is LineErrorCode.invalid_url and parsed.endpoint is Endpoint.completions


def test_the_shipped_example_batch_is_valid(settings) -> None:
    parsed = parse(settings, EXAMPLE_BATCH.read_bytes())
    assert parsed.errors == [] and 180 <= len(parsed.accepted) <= 220
    tenants = Counter(a.custom_id.split("-")[0] for a in parsed.accepted)
    assert set(tenants) == {"alpha", "beta", "gamma"}
    assert all(a.request.model == "smollm2" and a.request.max_tokens <= 32 for a in parsed.accepted)


# -- properties ---------------------------------------------------------------------------


def assert_each_line_once(parsed, data: bytes) -> None:
    nonblank = [i for i, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    lines = sorted([a.line for a in parsed.accepted] + [e.line for e in parsed.errors])
    assert lines == nonblank
    owned = [a.custom_id for a in parsed.accepted] + [e.custom_id for e in parsed.errors if e.custom_id]
    assert len(owned) == len(set(owned)), "a custom_id appears twice across output and errors"


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_and_every_line_lands_once(settings, data: bytes) -> None:
    parsed = parse(settings, data)
    assert_each_line_once(parsed, data)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
any_json = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=6)
custom_ids = st.sampled_from(["a", "b", "c", "d", ""]) | st.integers(0, 3)
good_line = st.builds(lambda cid, n: chat(cid, max_tokens=n), custom_ids, st.integers(-1, 5))
bad_line = st.builds(
    lambda cid, url, method, body, model: {"custom_id": cid, "url": url, "method": method,
                                           "body": body if model is None else {"model": model, **body} if isinstance(body, dict) else body},
    custom_ids, st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", 3]),
    st.sampled_from(["POST", "post", "GET", None]),
    st.one_of(any_json, st.fixed_dictionaries({"prompt": st.text(max_size=5)}),
              st.fixed_dictionaries({"messages": st.lists(any_json, max_size=2)})),
    st.sampled_from([None, "sim", "smollm2", "nope"]),
)
raw_line = st.one_of(good_line, bad_line, any_json).map(lambda o: json.dumps(o).encode()) | st.binary(max_size=30)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(raw_line, max_size=12))
def test_structured_lines_land_exactly_once(settings, lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    parsed = parse(settings, data)
    assert_each_line_once(parsed, data)
    for a in parsed.accepted:
        assert a.request.id == batch_request_id(BATCH, a.custom_id)

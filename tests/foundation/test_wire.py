"""Wire schemas: round trips, version gating, and clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill import wire
from tokenmill.errors import SchemaError, UnsupportedSchemaVersion

text = st.text(min_size=1, max_size=30)


def chat_request(**kw: object) -> wire.InferenceRequest:
    base: dict[str, object] = dict(
        tenant="alpha", model="sim", body={"messages": [{"role": "user", "content": "hi"}]},
        max_tokens=16, prompt_tokens_estimate=3,
    )
    base.update(kw)
    return wire.InferenceRequest(**base)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    tenant=text, model=text, content=st.text(max_size=200),
    priority=st.sampled_from(list(wire.Priority)), max_tokens=st.integers(1, 100_000),
    deadline=st.none() | st.floats(0, 4e9),
)
def test_request_round_trips(tenant: str, model: str, content: str, priority: wire.Priority,
                             max_tokens: int, deadline: float | None) -> None:
    req = chat_request(tenant=tenant, model=model, priority=priority, max_tokens=max_tokens,
                       deadline=deadline, body={"messages": [{"role": "user", "content": content}]})
    assert wire.decode(wire.InferenceRequest, req.to_bytes()) == req


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(wire.EventKind)), p=st.integers(0, 10**9), c=st.integers(0, 10**9),
       attempt=st.integers(1, 50), seq=st.integers(0, 10**6))
def test_token_event_round_trips_and_has_stable_id(kind: wire.EventKind, p: int, c: int,
                                                   attempt: int, seq: int) -> None:
    ev = wire.TokenEvent(kind=kind, request_id="r1", tenant="t", model="m", prompt_tokens=p,
                         completion_tokens=c, attempt=attempt, seq=seq)
    back = wire.decode(wire.TokenEvent, ev.to_bytes())
    assert back == ev and back.event_id == ev.event_id
    assert ev.event_id.startswith(f"r1:{kind.value}:")


def test_newer_minor_with_unknown_fields_is_accepted() -> None:
    raw = json.loads(chat_request().to_bytes())
    raw["schema_version"] = "1.7"
    raw["some_future_field"] = {"x": 1}
    assert wire.decode(wire.InferenceRequest, json.dumps(raw)).tenant == "alpha"


def test_newer_major_is_rejected_clearly() -> None:
    raw = json.loads(chat_request().to_bytes())
    raw["schema_version"] = "2.0"
    with pytest.raises(UnsupportedSchemaVersion, match="2.0"):
        wire.decode(wire.InferenceRequest, json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"tenant": ""}, "tenant"),
        ({"body": {"messages": []}}, "messages"),
        ({"endpoint": "/v1/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}, "prompt"),
        ({"endpoint": "/v1/rerank"}, "endpoint"),
        ({"endpoint": "/v1/embeddings"}, "body.input"),
        ({"endpoint": "/v1/embeddings", "body": {"input": "x"}}, "max_tokens must be 0"),
        ({"batch_id": "b1"}, "custom_id"),
    ],
)
def test_invalid_request_names_the_field(change: dict[str, object], field: str) -> None:
    raw = json.loads(chat_request().to_bytes())
    raw.update(change)
    with pytest.raises(SchemaError, match=field):
        wire.decode(wire.InferenceRequest, json.dumps(raw))


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b'{"kind": "request"}'])
def test_garbage_is_a_schema_error(raw: bytes) -> None:
    with pytest.raises(SchemaError):
        wire.decode(wire.InferenceRequest, raw)


def test_request_state_order_marks_terminal_states() -> None:
    terminal = {s for s in wire.RequestState if s.is_terminal}
    assert terminal == {wire.RequestState.FINISHED, wire.RequestState.FAILED,
                        wire.RequestState.CANCELLED, wire.RequestState.EXPIRED}


def test_priority_topics_are_per_class() -> None:
    assert [p.topic for p in wire.Priority] == list(wire.REQUEST_TOPICS)
    assert sorted(wire.Priority, key=lambda p: p.rank)[0] is wire.Priority.interactive

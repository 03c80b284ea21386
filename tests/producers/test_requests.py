"""Requests are validated before anything is sent, with errors naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.config import load_settings
from tokenmill.producers.requests import build_request
from tokenmill.workers.engines.sim import count_prompt_tokens

from tokenmill.errors import ValidationError
from tokenmill.wire import Endpoint, InferenceRequest, Priority, decode

S = load_settings()
MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_request_is_built_and_round_trips() -> None:
    req = build_request(S, tenant="alpha", model="sim", messages=MSG, max_tokens=12,
                        priority="interactive", temperature=0.0)
    assert req.endpoint is Endpoint.chat_completions and req.priority is Priority.interactive
    assert req.max_tokens == 12 and req.body["temperature"] == 0.0
    assert decode(InferenceRequest, req.to_bytes()) == req


def test_completion_request_uses_model_default_max_tokens() -> None:
    req = build_request(S, tenant="beta", model="smollm2", prompt="Once upon")
    assert req.endpoint is Endpoint.completions
    assert req.max_tokens == S.models["smollm2"].default_max_tokens


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(tenant="nobody"), "tenant"),
        (dict(model="gpt-9"), "model"),
        (dict(priority="urgent"), "priority"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens="many"), "max_tokens"),
        (dict(webhook="ftp://example.invalid/x"), "webhook"),
        (dict(temperatur=0.5), "temperatur"),
        (dict(prompt="both"), "messages"),
        (dict(deadline=-5), "deadline"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = dict(tenant="alpha", model="sim", messages=MSG)
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        build_request(S, **args)  # type: ignore[arg-type]
    assert str(info.value).startswith(field)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=8))
def test_prompt_tokens_are_the_sim_engines_own_count(contents: list[str]) -> None:
    msgs = [{"role": "user", "content": c} for c in contents]
    req = build_request(S, tenant="alpha", model="sim", messages=msgs, max_tokens=4)
    assert req.prompt_tokens_estimate == count_prompt_tokens(req)
    prompt = " ".join(contents)
    req = build_request(S, tenant="alpha", model="sim", prompt=prompt, max_tokens=4)
    assert req.prompt_tokens_estimate == count_prompt_tokens(req) == max(1, len(prompt.split()))


def test_a_webhook_needs_a_secret_to_sign_with() -> None:
    # The example's tenants all have one; a tenant without a secret cannot ask for webhooks.
    unsigned = S.model_copy(update={"tenants": {
        **S.tenants, "alpha": S.tenants["alpha"].model_copy(update={"webhook_secret": None})}})
    ok = build_request(S, tenant="alpha", model="sim", messages=MSG, webhook="http://127.0.0.1:9/hook")
    assert ok.webhook_url == "http://127.0.0.1:9/hook"
    with pytest.raises(ValidationError) as caught:
        build_request(unsigned, tenant="alpha", model="sim", messages=MSG, webhook="http://127.0.0.1:9/hook")
    assert caught.value.field == "webhook" and "webhook_secret" in str(caught.value)

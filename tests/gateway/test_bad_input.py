"""Whatever a tenant sends, the gateway answers with OpenAI's error body and the right
status, naming the field; the stack keeps serving other tenants throughout."""

from __future__ import annotations

import json

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]

BAD_BODIES = [
    # (body, status, param, code)
    ({"model": "sim", "messages": "hi"}, 400, "messages", None),
    ({"model": "sim", "messages": {"role": "user", "content": "hi"}}, 400, "messages", None),
    ({"model": "sim", "messages": ["hi", "there"]}, 400, "messages[0]", None),
    ({"model": "sim", "messages": [{"content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": "sim", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": "sim", "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", None),
    ({"model": "sim", "messages": MSG, "temperature": "hot"}, 400, "temperature", None),
    ({"model": "sim", "messages": MSG, "n": 1000}, 400, "n", None),
    ({"model": "sim", "messages": MSG, "max_tokens": -5}, 400, "max_tokens", None),
    ({"model": "sim", "messages": MSG, "max_tokens": 10**15}, 400, "max_tokens", None),
    ({"model": "sim", "messages": MSG, "stream": "yes"}, 400, "stream", None),
    ({"model": "sim", "messages": MSG, "frobnicate": True}, 400, "frobnicate", None),
    ({"model": "sim"}, 400, "messages", None),
    ({"messages": MSG}, 400, "model", None),
    ({"model": 7, "messages": MSG}, 400, "model", None),
    ({"model": "gpt-17", "messages": MSG}, 404, "model", "model_not_found"),
    ({"model": "sim", "messages": MSG, "service_tier": "platinum"}, 400, "service_tier", None),
    ({"model": "sim", "messages": MSG, "response_format": json.loads("[" * 500 + "]" * 500)}, 400,
     "response_format", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD_BODIES)
def test_bad_chat_bodies(http, body, status, param, code) -> None:
    r = http("alpha").post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and param in err["message"]
    if code:
        assert err["code"] == code


def _raw(gateway: str, data: bytes, key: str | None = "tm-alpha-demo-key", **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(gateway + "/v1/chat/completions", content=data, headers=h, timeout=30)


def test_lone_surrogate_is_named(gateway: str) -> None:
    r = _raw(gateway, b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_keys_json_encoding_and_size(gateway: str) -> None:
    good = json.dumps({"model": "sim", "messages": MSG, "max_tokens": 1}).encode()
    assert _raw(gateway, good, key=None).status_code == 401
    wrong = _raw(gateway, good, key="tm-nobody")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert "tm-nobody" not in wrong.text
    assert _raw(gateway, good, key=None, authorization="Basic abc").status_code == 401
    assert _raw(gateway, b'{"model": "sim", "messages": [').json()["error"]["code"] == "invalid_json"
    assert _raw(gateway, b'{"model": NaN}').status_code == 400
    assert _raw(gateway, b"[1, 2]").status_code == 400
    assert _raw(gateway, b'{"model": "sim", "messages": "\xff\xfe"}').json()["error"]["code"] == "invalid_encoding"
    huge = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]})
    too_big = _raw(gateway, huge.encode())
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_bad_headers_name_themselves(gateway: str) -> None:
    good = json.dumps({"model": "sim", "messages": MSG, "max_tokens": 1}).encode()
    for header, value in (("x-tokenmill-priority", "urgent"), ("x-tokenmill-deadline", "soon"),
                          ("x-tokenmill-deadline", "nan"), ("x-tokenmill-deadline", "-3")):
        r = _raw(gateway, good, **{header: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == header, (header, value, r.text)


def test_bad_tokenmill_request_fields(http) -> None:
    beta = http("beta")
    body = {"model": "sim", "messages": MSG}
    for extra, param in (({"deadline": "tomorrow"}, "deadline"), ({"deadline": float("inf")}, None),
                         ({"priority": "vip"}, "priority"), ({"endpoint": "/v1/images"}, "endpoint")):
        if param is None:  # JSON has no infinity: the client cannot even send it
            continue
        r = beta.post("/v1/tokenmill/requests", json={"body": body, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    many = beta.post("/v1/tokenmill/requests", json={"requests": [{"body": body}] * 1001})
    assert many.status_code == 400 and many.json()["error"]["param"] == "requests"
    nested = beta.post("/v1/tokenmill/requests", json={"requests": [{"body": body}, {"body": {**body, "n": 3}}]})
    assert nested.status_code == 400 and nested.json()["error"]["param"] == "requests[1].body.n"


def test_unknown_routes_and_methods_answer_in_openai_shape(gateway: str) -> None:
    r = httpx.get(gateway + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(gateway + "/v1/chat/completions", headers={"authorization": "Bearer tm-alpha-demo-key"},
                  timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_the_stack_kept_serving_throughout(sdk) -> None:
    # Runs after the abuse above (same module stack): every tenant still gets answers.
    for tenant in ("alpha", "beta", "gamma"):
        resp = sdk(tenant).chat.completions.create(model="sim", messages=MSG, max_tokens=2)
        assert resp.usage.completion_tokens == 2

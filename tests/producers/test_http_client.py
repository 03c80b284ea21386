"""The Python client over HTTP: arguments refused before any round trip, the gateway's
errors as tokenmill errors, and submit / result / stream / cancel / map against a real
local stack reached only through its gateway."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenmill.producers.client import PreparedRequest, RequestTimeout, error_of

from tokenmill import AsyncClient, Client, wire
from tokenmill.errors import (
    AuthenticationError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    StackError,
    ValidationError,
)
from tokenmill.stack import processes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, running_stack, stack_config, use_stack

ALPHA, BETA = "tm-alpha-demo-key", "tm-beta-demo-key"
MSG = [{"role": "user", "content": "hi"}]


def client_threads() -> int:
    return sum(t.name == "tokenmill-client" for t in threading.enumerate())


# -- without a stack ----------------------------------------------------------------------


@pytest.fixture
def nowhere(tm_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A base URL where nothing listens (a round trip would be a StackError)."""
    monkeypatch.delenv("TOKENMILL_BASE_URL", raising=False)
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    return f"http://{processes.LOOPBACK}:{processes.free_port()}"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"messages": "hi"}, "messages"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": MSG, "prompt": "x"}, "messages"),
    ({}, "messages"),
    ({"messages": MSG, "deadline": "soon"}, "deadline"),
    ({"messages": MSG, "deadline": math.nan}, "deadline"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "n": 1000}, "n"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": MSG, "priority": "urgent"}, "priority"),
    ({"messages": MSG, "webhook": "ftp://example.com/hook"}, "webhook"),
    ({"messages": MSG, "frobnicate": True}, "frobnicate"),
    ({"messages": MSG, "response_format": {"type": "json_object", "x": math.inf}}, "body"),
])
def test_bad_arguments_are_refused_before_any_round_trip(nowhere: str, kwargs: dict[str, Any], field: str) -> None:
    with Client(ALPHA, base_url=nowhere) as c:
        with pytest.raises(ValidationError) as exc:
            c.submit("sim", **kwargs)
        assert exc.value.field == field, exc.value
        with pytest.raises(StackError):  # the same client does reach out for a valid one
            c.submit("sim", messages=MSG)


def test_tenant_names_only_stand_for_demo_keys_on_the_local_stack(nowhere: str) -> None:
    before = client_threads()
    with pytest.raises(ValidationError) as exc:
        Client(tenant="alpha", base_url=nowhere)
    assert exc.value.field == "tenant" and "local stack" in str(exc.value)
    with pytest.raises(ValidationError) as both:
        Client(ALPHA, tenant="alpha", base_url=nowhere)
    assert both.value.field == "tenant"
    with pytest.raises(StackError, match="tokenmill up"):  # no base URL and no local stack
        Client(ALPHA)
    assert client_threads() == before, "a refused client left its thread running"


def test_http_errors_become_tokenmill_errors() -> None:
    def answer(status: int, code: str | None = None, param: str | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
        body = {"error": {"message": f"m{status}", "type": "t", "param": param, "code": code}}
        return httpx.Response(status, json=body, headers=headers)

    bad = error_of(answer(400, "invalid_value", "messages[0].role"))
    assert isinstance(bad, ValidationError) and bad.field == "messages[0].role" and str(bad) == "m400"
    assert isinstance(error_of(answer(401, "invalid_api_key")), AuthenticationError)
    assert isinstance(error_of(answer(404, "request_not_found")), NotFound)
    limited = error_of(answer(429, "rate_limit_exceeded", headers={"Retry-After": "7"}))
    assert type(limited) is RateLimited and limited.retry_after == 7.0
    quota = error_of(answer(429, "insufficient_quota"))
    assert isinstance(quota, QuotaExceeded) and quota.retry_after is None
    assert isinstance(error_of(answer(503)), StackError)
    assert isinstance(error_of(httpx.Response(502, text="<html>bad gateway</html>")), StackError)


# -- against a real stack -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("client-stack"), stack_config()) as s:
        yield s


@pytest.fixture
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return use_stack(stack, monkeypatch)


def test_keys_are_checked_by_the_gateway(client_env: Stack) -> None:
    with Client() as anonymous, pytest.raises(AuthenticationError, match="API key"):
        anonymous.submit("sim", messages=MSG)
    with Client("tm-not-a-key") as wrong, pytest.raises(AuthenticationError):
        wrong.poll("req_" + "0" * 32)
    with Client(tenant="gamma") as gamma:  # the local stack's demo key
        assert gamma.result(gamma.submit("sim", messages=MSG, max_tokens=2), timeout=30).tenant == "gamma"


def test_gateway_validation_names_the_field(client_env: Stack) -> None:
    with Client(ALPHA) as c:
        # Built by hand, past the client's own checks: the gateway validates again.
        forged = PreparedRequest(wire.Endpoint.chat_completions, {"model": "sim", "messages": "hi"})
        with pytest.raises(ValidationError) as exc:
            c.submit_many([c.build("sim", messages=MSG), forged])
        assert exc.value.field == "requests[1].body.messages"
        with pytest.raises(NotFound, match="nope"):
            c.submit("nope", messages=MSG)


def test_another_tenants_id_is_not_found(client_env: Stack) -> None:
    with Client(ALPHA) as alpha, Client(BETA) as beta:
        h = alpha.submit("sim", prompt="mine", max_tokens=2)
        assert alpha.result(h, timeout=30).status is wire.ResultStatus.succeeded
        for call in (beta.poll, lambda x: beta.result(x, timeout=2), beta.cancel,
                     lambda x: list(beta.stream(x, timeout=2))):
            with pytest.raises(NotFound):
                call(h)


def test_stream_yields_the_deltas_of_the_answer(client_env: Stack) -> None:
    with Client(ALPHA) as c:
        h = c.submit("slowsim", messages=MSG, max_tokens=20, stream=True)
        deltas = list(c.stream(h, timeout=30))
        r = c.result(h, timeout=30)
    assert r.status is wire.ResultStatus.succeeded and r.usage and r.usage.completion_tokens == 20
    assert len(deltas) > 1 and "".join(deltas) == r.body["choices"][0]["message"]["content"]


def test_cancel_stops_a_running_request(client_env: Stack) -> None:
    with Client(BETA) as c:
        h = c.submit("slowsim", prompt="long", max_tokens=500, stream=True)  # ~10 s
        deltas = c.stream(h, timeout=30)
        assert next(deltas)  # it runs
        deltas.close()
        c.cancel(h)
        r = c.result(h, timeout=30)
    assert r.status is wire.ResultStatus.cancelled


def test_result_waits_are_bounded(client_env: Stack) -> None:
    with Client(ALPHA) as c:
        h = c.submit("slowsim", prompt="long", max_tokens=300)
        with pytest.raises(RequestTimeout):
            c.result(h, timeout=0.5)
        assert c.poll(h) is None
        c.cancel(h)


def test_map_returns_results_in_order_with_progress(client_env: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    items = [{"prompt": f"p{i}", "max_tokens": 1 + i % 4} for i in range(40)]
    with Client(tenant="alpha") as c:
        results = c.map("sim", items, progress=True, timeout=60)
    assert [r.usage.completion_tokens for r in results if r.usage] == [1 + i % 4 for i in range(40)]
    assert len({r.request_id for r in results}) == 40
    assert "requests" in capsys.readouterr().out  # the Rich bar
    with Client(tenant="alpha") as c, pytest.raises(ValidationError) as exc:
        c.map("sim", [{"prompt": "ok"}, {"prompt": "bad", "temperature": "hot"}])
    assert exc.value.field == "temperature"  # refused before any was sent


async def test_async_client(client_env: Stack) -> None:
    async with AsyncClient(ALPHA) as c:
        h = await c.submit("sim", prompt="async", max_tokens=3, stream=True, priority="interactive")
        assert h.priority is wire.Priority.interactive
        deltas = [d async for d in c.stream(h, timeout=30)]
        r = await c.result(h, timeout=30)
    assert "".join(deltas) == r.body["choices"][0]["text"] and r.usage and r.usage.completion_tokens == 3


def test_clients_leave_no_threads(client_env: Stack) -> None:
    before = client_threads()
    with Client(ALPHA) as c:
        h = c.submit("sim", prompt="x", max_tokens=30, stream=True)
        deltas = c.stream(h, timeout=30)
        assert next(deltas)
        deltas.close()  # left early: the HTTP stream is closed in the client's loop
        with pytest.raises(NotFound):
            c.result("req_unknown", timeout=1)
    assert client_threads() == before

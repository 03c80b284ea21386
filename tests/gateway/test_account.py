"""tokenmill's account API (``/v1/tokenmill/usage | invoices | sla | webhooks``) on a
real local stack: each tenant reads its own figures and never another's, the numbers
are the CLI's (through the gateway with the tenant's key, and the operator's direct
read of the ledger), money is decimal strings, and bad keys and parameters are refused
in OpenAI's error shape naming the parameter."""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, wait_for

Http = Callable[[str | None], httpx.Client]
ROUTES = ["/v1/tokenmill/usage", "/v1/tokenmill/invoices/2026-11", "/v1/tokenmill/sla", "/v1/tokenmill/webhooks"]
#: long enough for the stream processors to write what the gateway answered
SETTLE_S = 60.0


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def get(client: httpx.Client, path: str, **params: Any) -> Any:
    resp = client.get(path, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def sim_usage(client: httpx.Client) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens) of model sim over the last day."""
    rows = [r for r in get(client, "/v1/tokenmill/usage", since="1d")["rows"] if r["model"] == "sim"]
    return (sum(r["requests"] for r in rows), sum(r["input_tokens"] for r in rows),
            sum(r["output_tokens"] for r in rows))


def complete(client: httpx.Client, n: int) -> tuple[int, int]:
    """``n`` chat completions; their (prompt, completion) token totals."""
    prompt = completion = 0
    for i in range(n):
        resp = client.post("/v1/chat/completions", json={
            "model": "sim", "messages": [{"role": "user", "content": f"count to {i}"}], "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        prompt += resp.json()["usage"]["prompt_tokens"]
        completion += resp.json()["usage"]["completion_tokens"]
    return prompt, completion


def key(client: httpx.Client) -> str:
    """The API key ``client`` sends (the ``http`` fixture's demo keys)."""
    return client.headers["authorization"].removeprefix("Bearer ")


@pytest.fixture
def completed(http: Http) -> dict[str, Any]:
    """Three more of alpha's completions, once the ledger has them (and beta's usage)."""
    alpha, beta = http("alpha"), http("beta")
    before, beta_before = sim_usage(alpha), sim_usage(beta)
    prompt, completion = complete(alpha, 3)
    want = (before[0] + 3, before[1] + prompt, before[2] + completion)
    wait_for("alpha's usage in the ledger", lambda: sim_usage(alpha) == want, timeout=SETTLE_S, every=0.25)
    return {"alpha": want, "beta": beta_before}


def test_usage_shows_the_callers_completions_and_no_one_elses(completed: dict[str, Any], http: Http) -> None:
    alpha, beta = http("alpha"), http("beta")
    assert sim_usage(alpha) == completed["alpha"]
    assert sim_usage(beta) == completed["beta"]  # alpha's completions are not beta's
    doc = get(alpha, "/v1/tokenmill/usage", since="1d", tenant="beta")  # a tenant parameter is ignored
    assert doc["object"] == "tokenmill.usage" and {r["tenant"] for r in doc["rows"]} == {"alpha"}
    assert {r["tenant"] for r in get(beta, "/v1/tokenmill/usage", since="1d")["rows"]} <= {"beta"}
    minutes = get(alpha, "/v1/tokenmill/usage", since="1h", by_minute="true")["rows"]
    assert minutes and all(r["minute"].endswith(":00Z") for r in minutes)
    assert sum(r["requests"] for r in minutes if r["model"] == "sim") >= 3


def test_invoice_is_the_clis_and_money_is_decimal_strings(completed: dict[str, Any], stack: Stack, http: Http) -> None:
    period = this_month()
    api = get(http("alpha"), f"/v1/tokenmill/invoices/{period}")
    assert api["object"] == "tokenmill.invoice" and api["tenant"] == "alpha"
    sim = next(ln for ln in api["lines"] if ln["model"] == "sim")
    assert sim["requests"] >= 3 and sim["input_tokens"] > 0
    for value in (api["total"], api["total_rounded"], api["rounding_adjustment"], sim["amount"], sim["amount_rounded"]):
        assert isinstance(value, str) and Decimal(value).is_finite()
    assert Decimal(api["total"]) == sum(Decimal(ln["amount"]) for ln in api["lines"]) > 0

    as_tenant = stack.cli("invoice", "--period", period, "--api-key", key(http("alpha")), "--json")
    assert as_tenant.returncode == 0, as_tenant.stderr
    assert json.loads(as_tenant.stdout) == api
    demo = stack.cli("invoice", "--period", period, "--tenant", "alpha", "--json")  # the local stack's demo key
    assert demo.returncode == 0 and json.loads(demo.stdout) == api
    operator = stack.cli("invoice", "--period", period, "--all-tenants", "--json")
    assert operator.returncode == 0, operator.stderr
    assert next(d for d in json.loads(operator.stdout) if d["tenant"] == "alpha") == api
    beta = get(http("beta"), f"/v1/tokenmill/invoices/{period}")
    assert beta["tenant"] == "beta" and beta != api


def test_usage_and_sla_through_the_cli_are_the_apis(completed: dict[str, Any], stack: Stack, http: Http) -> None:
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)  # after the completions
    # A fixed span: both reads cover the same one.
    since, hour_ago, until = (now - timedelta(days=1)).isoformat(), (now - timedelta(hours=1)).isoformat(), \
        now.isoformat()
    usage = stack.cli("usage", "--since", since, "--until", until, "--api-key", key(http("alpha")), "--json")
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout) == get(http("alpha"), "/v1/tokenmill/usage", since=since, until=until)
    table = stack.cli("usage", "--since", "1d", "--api-key", key(http("beta")))
    assert table.returncode == 0 and "alpha" not in table.stdout

    sla = get(http("alpha"), "/v1/tokenmill/sla", since=hour_ago, until=until)
    assert sla["object"] == "tokenmill.sla" and set(sla["tenants"]) == {"alpha"}
    assert {g["tenant"] for g in sla["groups"]} == {"alpha"} and sla["tenants"]["alpha"]["requests"] >= 3
    cli = stack.cli("sla", "--since", hour_ago, "--until", until, "--api-key", key(http("alpha")), "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout) == sla
    assert "alpha" not in get(http("beta"), "/v1/tokenmill/sla", since="1h")["tenants"]


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[str]]]:
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            paths.append(self.path)
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths
    server.shutdown()
    server.server_close()


def test_webhook_deliveries_are_the_callers_own(stack: Stack, http: Http, receiver: tuple[str, list[str]]) -> None:
    base, received = receiver
    alpha, beta = http("alpha"), http("beta")
    # The stack's config opens loopback (webhooks.allow_loopback) and nothing else.
    for url in ("http://10.0.0.1/hook", "http://169.254.169.254/latest"):
        refused = alpha.post("/v1/tokenmill/requests", json={"body": {"model": "sim", "messages": [
            {"role": "user", "content": "hi"}]}, "webhook": url})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook", refused.text
    url = f"{base}/{uuid.uuid4().hex}"
    sent = alpha.post("/v1/tokenmill/requests", json={
        "body": {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "webhook": url})
    assert sent.status_code == 202, sent.text

    def delivered() -> list[dict[str, Any]]:
        return [d for d in get(alpha, "/v1/tokenmill/webhooks", limit=1000)["data"]
                if d["url"] == url and d["status"] == "delivered"]

    [row] = wait_for("alpha's webhook delivered", delivered, timeout=SETTLE_S)
    assert row["object"] == "tokenmill.webhook_delivery" and row["tenant"] == "alpha" and row["attempts"] == 1
    assert received == [url.removeprefix(base)]
    assert url not in {d["url"] for d in get(beta, "/v1/tokenmill/webhooks", limit=1000)["data"]}
    assert all(d["status"] == "dead" for d in get(alpha, "/v1/tokenmill/webhooks", failed="true")["data"])
    cli = stack.cli("webhooks", "--limit", "1000", "--api-key", key(http("alpha")), "--json")
    assert cli.returncode == 0, cli.stderr
    assert any(d["url"] == url for d in json.loads(cli.stdout))
    beta_cli = stack.cli("webhooks", "--limit", "1000", "--api-key", key(http("beta")), "--json")
    assert beta_cli.returncode == 0 and all(d["tenant"] == "beta" for d in json.loads(beta_cli.stdout))


@pytest.mark.parametrize("route", ROUTES)
def test_no_key_or_a_wrong_key_is_401(http: Http, gateway: str, route: str) -> None:
    with httpx.Client(base_url=gateway, headers={"Authorization": "Bearer tm-not-a-key"}, timeout=30) as wrong:
        for client in (http(None), wrong):
            resp = client.get(route)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("route", "params", "param"), [
    ("/v1/tokenmill/invoices/November", {}, "period"),
    ("/v1/tokenmill/invoices/2026-13", {}, "period"),
    ("/v1/tokenmill/invoices/2026-02-30", {}, "period"),
    ("/v1/tokenmill/invoices/2026-11-03T00:00", {}, "period"),
    ("/v1/tokenmill/usage", {"since": "yesterday"}, "since"),
    ("/v1/tokenmill/usage", {"since": "99999999999999999d"}, "since"),
    ("/v1/tokenmill/usage", {"since": "1h", "until": "2h"}, "until"),
    ("/v1/tokenmill/usage", {"until": "soon"}, "until"),
    ("/v1/tokenmill/usage", {"by_minute": "maybe"}, "by_minute"),
    ("/v1/tokenmill/usage", {"since": "40d", "by_minute": "true"}, "since"),
    ("/v1/tokenmill/sla", {"since": "2020-01-01"}, "since"),
    ("/v1/tokenmill/sla", {"since": "x" * 500}, "since"),
    ("/v1/tokenmill/webhooks", {"limit": "0"}, "limit"),
    ("/v1/tokenmill/webhooks", {"limit": "5000"}, "limit"),
    ("/v1/tokenmill/webhooks", {"limit": "ten"}, "limit"),
    ("/v1/tokenmill/webhooks", {"failed": "perhaps"}, "failed"),
])  # fmt: skip
def test_bad_parameters_are_400_naming_the_parameter(http: Http, route: str, params: dict[str, str], param: str) -> None:
    resp = http("alpha").get(route, params=params)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert set(error) == {"message", "type", "param", "code"}

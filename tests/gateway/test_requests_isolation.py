"""Requests belong to the tenant whose key sent them: another tenant's id answers
exactly as an unknown one, for read, stream and cancel; ids are the server's; a tenant
named in a body changes nothing."""

from __future__ import annotations

from batch_stack import wait_for

CHAT = {"model": "slowsim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200}


def _ended(client, rid: str) -> dict:
    """The request's result once it has one (each call long-polls up to 5 s)."""
    def check() -> dict | None:
        got = client.get(f"/v1/tokenmill/requests/{rid}?wait=5").json()
        return got if got["status"] != "pending" else None

    return wait_for(f"request {rid} ends", check, timeout=30)


def _submit(client, **extra) -> str:
    r = client.post("/v1/tokenmill/requests", json={"endpoint": "/v1/chat/completions", "body": CHAT, **extra})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_another_tenants_request_is_not_found_for_every_verb(http) -> None:
    alpha, beta = http("alpha"), http("beta")
    rid = _submit(alpha)
    unknown = "req_" + "0" * 32
    for target in (rid, unknown):
        for method, path in (("GET", f"/v1/tokenmill/requests/{target}"),
                             ("GET", f"/v1/tokenmill/requests/{target}?wait=1"),
                             ("GET", f"/v1/tokenmill/requests/{target}/events"),
                             ("POST", f"/v1/tokenmill/requests/{target}/cancel")):
            r = beta.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "request_not_found" and err["message"] == f"No such request: '{target}'"
    # beta's cancel attempt reached nothing: alpha's request runs to its end.
    done = _ended(alpha, rid)
    assert done["status"] == "succeeded" and done["tenant"] == "alpha"


def test_the_owner_can_stream_and_cancel(http) -> None:
    alpha = http("alpha")
    rid = _submit(alpha)
    r = alpha.post(f"/v1/tokenmill/requests/{rid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    got = _ended(alpha, rid)
    assert got["status"] == "cancelled"


def test_ids_are_the_servers_and_a_tenant_in_the_body_is_ignored(http) -> None:
    beta, alpha = http("beta"), http("alpha")
    r = beta.post("/v1/tokenmill/requests", json={
        "endpoint": "/v1/chat/completions", "tenant": "alpha", "id": "req_mine", "request_id": "req_mine",
        "body": {**CHAT, "max_tokens": 2}})
    assert r.status_code == 202
    rid = r.json()["id"]
    assert rid != "req_mine" and rid.startswith("req_")
    assert alpha.get(f"/v1/tokenmill/requests/{rid}").status_code == 404
    got = beta.get(f"/v1/tokenmill/requests/{rid}?wait=20").json()
    assert got["tenant"] == "beta"
    # An OpenAI body naming a tenant is refused outright: the key alone says who calls.
    bad = beta.post("/v1/chat/completions", json={**CHAT, "tenant": "alpha"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tenant"


def test_chat_completion_ids_differ_per_request(sdk) -> None:
    client = sdk("gamma")
    ids = {client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=1).id for _ in range(3)}
    assert len(ids) == 3

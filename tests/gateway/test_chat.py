"""Chat and text completions through the gateway with the official ``openai`` SDK:
plain and streamed, parsed as the SDK's own types; the models list."""

from __future__ import annotations

import httpx
import openai
import pytest
from batch_stack import wait_for
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk


def _complete_fields(obj: object, where: str = "") -> None:
    """Every field the SDK type requires was in the answer, at every level. (The SDK
    builds its objects without validation, so a missing field would go unnoticed.)"""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _complete_fields(item, f"{where}[{i}]")
        return
    if not isinstance(obj, openai.BaseModel):
        return
    required = {n for n, f in type(obj).model_fields.items() if f.is_required()}
    missing = required - obj.model_fields_set
    assert not missing, f"{type(obj).__name__} at {where or 'top'} lacks {sorted(missing)}"
    for name in obj.model_fields_set & set(type(obj).model_fields):
        _complete_fields(getattr(obj, name), f"{where}.{name}")


def test_chat_completion_parses_as_the_sdks_type(sdk) -> None:
    resp = sdk("alpha").chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "Say something."}], max_tokens=6,
    )
    assert isinstance(resp, ChatCompletion)
    _complete_fields(resp)
    assert resp.object == "chat.completion" and resp.model == "sim"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6
    assert resp.service_tier == "default"


def test_service_tier_maps_to_priority(sdk) -> None:
    resp = sdk("beta").chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=2, service_tier="priority",
    )
    assert resp.service_tier == "priority"
    flex = sdk("beta").chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=2, service_tier="flex",
    )
    assert flex.service_tier == "flex"


def test_streamed_chat_ends_with_usage_and_done(sdk) -> None:
    chunks = list(sdk("alpha").chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "Stream it."}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert len(text.split()) == 5  # the simulated engine emits one word a token


def test_stream_ends_with_the_done_sentinel(gateway: str) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": "Bearer tm-gamma-demo-key"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_text_completion_plain_and_streamed(sdk) -> None:
    client = sdk("gamma")
    resp = client.completions.create(model="sim", prompt="Once upon a time", max_tokens=4)
    assert isinstance(resp, Completion) and resp.object == "text_completion"
    _complete_fields(resp)
    assert resp.choices[0].text and resp.usage.completion_tokens == 4
    chunks = list(client.completions.create(model="sim", prompt="Once", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks).split() and chunks[-1].choices[0].finish_reason == "length"


def test_models_list_and_retrieve(sdk) -> None:
    client = sdk("alpha")
    models = list(client.models.list())
    assert {m.id for m in models} >= {"sim", "slowsim"}
    for m in models:
        assert isinstance(m, Model)
        _complete_fields(m)
    assert client.models.retrieve("sim").id == "sim"
    try:
        client.models.retrieve("no-such-model")
    except openai.NotFoundError as exc:
        assert exc.code == "model_not_found"
    else:
        raise AssertionError("an unknown model must be 404")


def test_client_disconnect_mid_stream_cancels_the_request(gateway: str, http) -> None:
    # slowsim: 20 ms a token, so 400 tokens take ~8 s; leave after a few deltas.
    body = {"model": "slowsim", "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
            "stream": True}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": "Bearer tm-alpha-demo-key"}) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen >= 4:
                    break
    alpha = http("alpha")

    def ended() -> dict | None:
        got = alpha.get(f"/v1/tokenmill/requests/{rid}").json()
        return got if got["status"] != "pending" else None

    result = wait_for("the abandoned request ends", ended, timeout=20)
    assert result["status"] == "cancelled"
    assert 0 < result["usage"]["completion_tokens"] < 400


def test_metrics_need_a_metrics_key(gateway: str) -> None:
    assert httpx.get(gateway + "/metrics", timeout=10).status_code in (401, 403)
    assert httpx.get(gateway + "/metrics", headers={"Authorization": "Bearer tm-alpha-demo-key"},
                     timeout=10).status_code in (401, 403)
    ok = httpx.get(gateway + "/metrics", headers={"Authorization": "Bearer tm-metrics-demo-key"}, timeout=10)
    assert ok.status_code == 200 and "tokenmill_gateway_requests_total" in ok.text


def test_health_and_readiness(gateway: str) -> None:
    assert httpx.get(gateway + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(gateway + "/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"kafka": "ok", "redis": "ok", "ledger": "ok"}


def test_embeddings_parse_as_the_sdks_type(sdk) -> None:
    from openai.types import CreateEmbeddingResponse
    from tokenmill.workers.engines.sim import sim_embedding

    # The SDK asks for base64 and decodes it: the float32 bytes of the float vectors.
    resp = sdk("alpha").embeddings.create(model="sim", input=["one two three", "four"])
    assert isinstance(resp, CreateEmbeddingResponse)
    _complete_fields(resp)
    assert [d.index for d in resp.data] == [0, 1] and resp.model == "sim"
    want = sim_embedding("one two three", 384)
    assert max(abs(a - b) for a, b in zip(resp.data[0].embedding, want)) < 1e-6
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == 3 + 1
    floats = sdk("alpha").embeddings.create(model="sim", input="one two three", encoding_format="float")
    assert floats.data[0].embedding == want


def test_embeddings_on_a_chat_model_or_bad_input_are_400s(sdk) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk("alpha").embeddings.create(model="smollm2", input="x", encoding_format="float")
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert "does not serve /v1/embeddings" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk("alpha").embeddings.create(model="sim", input=[[1, 2], []], encoding_format="float")
    assert caught.value.body["param"] == "input"  # type: ignore[index]


def test_responses_parse_as_the_sdks_type(sdk) -> None:
    from openai.types.responses import Response

    resp = sdk("alpha").responses.create(model="sim", input="Say something.", instructions="Be brief.",
                                         max_output_tokens=4)
    assert isinstance(resp, Response)
    _complete_fields(resp)
    assert resp.object == "response" and resp.status == "incomplete" and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens == 4
    assert resp.usage.input_tokens == (2 + 4) + (2 + 4) + 2  # the sim engine's count
    with pytest.raises(openai.BadRequestError) as caught:
        sdk("alpha").responses.create(model="sim", input="x", text={"format": {"type": "json_object"}})
    assert caught.value.body["param"] == "text.format.type"  # type: ignore[index]


def test_the_python_client_submits_embeddings(gateway: str) -> None:
    from tokenmill import Client
    from tokenmill.errors import ValidationError
    from tokenmill.workers.engines.sim import sim_embedding

    with Client(api_key="tm-alpha-demo-key", base_url=gateway) as client:
        results = client.map("sim", [{"input": f"text {i}"} for i in range(3)] + [{"input": [[5, 6, 7]]}])
        assert [r.body["data"][0]["embedding"] for r in results[:3]] == [
            sim_embedding(f"text {i}", 384) for i in range(3)]
        assert results[3].usage is not None and results[3].usage.prompt_tokens == 3
        assert results[3].usage.completion_tokens == 0
        with pytest.raises(ValidationError, match="max_tokens: an embeddings request generates no tokens"):
            client.submit("sim", input="x", max_tokens=3)

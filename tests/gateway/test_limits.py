"""Limits at the door: a tenant over its request rate gets 429 with Retry-After; one
whose budget is spent gets 429 insufficient_quota, as OpenAI answers; others go on."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from batch_stack import Stack, running_stack, stack_config

MSG = [{"role": "user", "content": "hi"}]


def limited_config() -> str:
    base = stack_config()
    gamma = 'budget = { amount = "50.00", period = "month", on_exceed = "hold" }'
    assert gamma in base, "example.toml's gamma budget line moved"
    # beta may start 3 requests a minute; gamma's budget cannot pay for one request.
    base = base.replace(gamma, 'budget = { amount = "0.000001", period = "month" }')
    beta = 'budget = { amount = "250.00", period = "month" }'
    assert beta in base
    return base.replace(beta, beta + "\nrate_limit = { requests_per_min = 3 }")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("limits-stack"), limited_config()) as s:
        yield s


def test_rate_limit_answers_429_with_retry_after(http) -> None:
    beta = http("beta")
    codes = [beta.post("/v1/chat/completions", json={"model": "sim", "messages": MSG, "max_tokens": 1})
             for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    limited = codes[3]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # The SDK sees its own RateLimitError; alpha is not limited by beta's rate.
    assert http("alpha").post("/v1/chat/completions",
                              json={"model": "sim", "messages": MSG, "max_tokens": 1}).status_code == 200


def test_spent_budget_is_insufficient_quota(sdk) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        sdk("gamma").chat.completions.create(model="slowsim", messages=MSG, max_tokens=200)
    assert caught.value.code == "insufficient_quota"
    assert caught.value.status_code == 429

"""Budgets on the running stack (`tokenmill up`: gateway, broker, Redis, scheduler, a
sim worker with a real decode time, stream processors writing the ledger): 1,000
concurrent requests against a budget worth about 100 of them are never overshot — the
ledger's total stays within the budget to the unit — and the rest are refused with the
budget error (the gateway's 429 ``insufficient_quota``), with ordinary prompts, with
prompts that tokenize far longer than their characters suggest, and across a scheduler
SIGKILL and restart in the same month (spending comes back from the ledger)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select
from tokenmill.config import EXAMPLE_CONFIG
from tokenmill.ledger.billing import Period, spend_by_tenant
from tokenmill.ledger.db import shared_factory
from tokenmill.ledger.models import LedgerEntry
from tokenmill.producers.client import DEMO_KEYS
from tokenmill.scheduler.service import IN_FLIGHT_KEY

from tokenmill import Client, wire
from tokenmill.stack.processes import pid_alive, stop_pid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, use_stack, wait_for

MODEL = "budgetsim"
MAX_TOKENS = 16
#: prompt of each kind; the dense one is 40 one-letter words in 80 characters, so the
#: old characters ÷ 4 estimate said 20 tokens where the engine bills 40
ORDINARY = "please summarise the quarterly report in one short line"
DENSE = " ".join("abcdefghij"[i % 10] for i in range(40))
#: per million tokens: 1 input, 2 output (the card below)
INPUT_PRICE, OUTPUT_PRICE = Decimal("1.00"), Decimal("2.00")


def worst_cost(prompt: str) -> Decimal:
    """What the sim engine bills one chat request of ``prompt`` at ``MAX_TOKENS``."""
    prompt_tokens = len(prompt.split()) + 4 + 2
    return (prompt_tokens * INPUT_PRICE + MAX_TOKENS * OUTPUT_PRICE) / 1_000_000


#: each budget is worth ~100 requests (and a fraction, so that one never fits exactly)
BUDGETS = {
    "gamma": worst_cost(ORDINARY) * 100 + worst_cost(ORDINARY) / 3,
    "beta": worst_cost(DENSE) * 100 + worst_cost(DENSE) / 3,
}

MODEL_CONFIG = f"""
[models.{MODEL}]
engine = "sim"
max_in_flight = 16
engine_args = {{ decode_ms_per_step = 20.0 }}

[[price_cards]]
model = "{MODEL}"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "{INPUT_PRICE}"
output_per_million = "{OUTPUT_PRICE}"
"""


def config() -> str:
    text = EXAMPLE_CONFIG.read_text()
    for tenant, amount in BUDGETS.items():
        head, sep, tail = text.partition(f"[tenants.{tenant}]")
        section, nl, rest = tail.partition("\n\n")
        lines = [ln for ln in section.splitlines() if not ln.startswith(("budget", "rate_limit"))]
        lines.append(f'budget = {{ amount = "{amount}", period = "month" }}')
        text = head + sep + "\n".join(lines) + nl + rest
    # Any free port: 8080 may be another stack's on a shared machine.
    text = text.replace("[gateway]\n", "[gateway]\nport = 0\n", 1)
    return text + MODEL_CONFIG


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("budgets")
    (root / "tokenmill.toml").write_text(config())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(TOKENMILL_HOME=str(root / "home"), TOKENMILL_CONFIG=str(root / "tokenmill.toml"))
    s = Stack(root / "home", env)
    up = s.cli("up", "--model", MODEL)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield s
    finally:
        s.down()


@pytest.fixture
def on_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return use_stack(stack, monkeypatch)


def ledger_total(stack: Stack, tenant: str) -> tuple[int, Decimal]:
    """(entries, net amount) of ``tenant`` in the ledger, this month."""
    now = datetime.now(UTC)
    period = Period.month(now.year, now.month)
    with shared_factory(f"sqlite:///{stack.home / 'ledger.db'}")() as session:
        count = (
            session.scalar(
                select(func.count()).where(LedgerEntry.tenant == tenant, LedgerEntry.amount > 0)
            )
            or 0
        )
        spend = spend_by_tenant(session, period.start, period.end, [tenant]).get(tenant, Decimal(0))
    return count, spend


def run_requests(c: Client, prompt: str, n: int) -> list[wire.Result]:
    handles = c.submit_many(
        [
            c.build(MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS)
            for _ in range(n)
        ]
    )
    return [c.result(h, timeout=60) for h in handles]


def check_outcomes(results: list[wire.Result], stack: Stack, tenant: str, prompt: str) -> int:
    """Every request succeeded or was refused with the budget error; the ledger holds
    exactly the succeeded ones and stays within the budget. Returns the successes."""
    ok = [r for r in results if r.status is wire.ResultStatus.succeeded]
    refused = [r for r in results if r.error is not None and r.error.code == "budget_exceeded"]
    assert len(ok) + len(refused) == len(results), {r.status for r in results}
    assert all(r.usage is not None and r.usage.prompt_tokens == len(prompt.split()) + 6 for r in ok)
    wait_for(
        "the ledger to bill every success", lambda: ledger_total(stack, tenant)[0] >= len(ok), 30
    )
    count, spent = ledger_total(stack, tenant)
    assert count == len(ok)
    assert spent == worst_cost(prompt) * len(ok)
    assert spent <= BUDGETS[tenant]  # overshoot exactly 0
    return len(ok)


def test_1000_concurrent_ordinary_requests_never_overshoot(on_stack: Stack) -> None:
    with Client(tenant="gamma") as c:
        results = run_requests(c, ORDINARY, 1000)
    ok = check_outcomes(results, on_stack, "gamma", ORDINARY)
    assert ok == 100  # the budget is used up to within one request, no further
    # The HTTP API says so too: 429 insufficient_quota.
    resp = httpx.post(
        f"{on_stack.address('gateway')}/v1/chat/completions",
        headers={"Authorization": f"Bearer {DEMO_KEYS['gamma']}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": ORDINARY}],
            "max_tokens": MAX_TOKENS,
        },
        timeout=30,
    )
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"


def test_dense_prompts_never_overshoot_across_a_scheduler_sigkill(on_stack: Stack) -> None:
    assert len(DENSE) // 4 < len(DENSE.split())  # counts far above the old estimate
    with Client(tenant="beta") as c:
        handles = c.submit_many(
            [
                c.build(MODEL, messages=[{"role": "user", "content": DENSE}], max_tokens=MAX_TOKENS)
                for _ in range(1000)
            ]
        )
        # Kill the scheduler mid-run, once some of the budget is spent and billed.
        wait_for("some spending in the ledger", lambda: ledger_total(on_stack, "beta")[0] >= 20, 30)
        assert ledger_total(on_stack, "beta")[0] < 100  # still running: work in flight
        old = next(int(s["pid"]) for s in on_stack.state()["services"] if s["name"] == "scheduler")
        os.kill(old, signal.SIGKILL)
        wait_for("the scheduler to die", lambda: not pid_alive(old), 10)
        # The reservations in flight outlived it (written at dispatch, not every 2 s).
        with redis.Redis.from_url(on_stack.address("redis")) as r:
            assert r.hlen(IN_FLIGHT_KEY) > 0
        env = {**on_stack.env, **on_stack.client_env()}
        with open(on_stack.home / "logs" / "scheduler-restarted.log", "ab") as log:
            new = subprocess.Popen(
                [sys.executable, "-m", "tokenmill", "scheduler"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            results = [c.result(h, timeout=60) for h in handles]
            ok = check_outcomes(results, on_stack, "beta", DENSE)
            assert ok == 100
            # A later request this month is refused: the restarted scheduler's spending
            # came from the ledger, not from a reset.
            again = run_requests(c, DENSE, 5)
            assert [r.error.code if r.error else r.status for r in again] == ["budget_exceeded"] * 5
        finally:
            stop_pid(new.pid)
    assert ledger_total(on_stack, "beta")[1] <= BUDGETS["beta"]

"""``tokenmill usage | invoice | sla --all-tenants`` (the operator's path) read the ledger
the stream processors write; ``tokenmill up`` starts a ``streams`` service. The tenant's
path, through the gateway, is tests/gateway/test_account.py's."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import streams_helpers as st
import typer
from tokenmill.config import Settings
from tokenmill.ledger.commands import register, streams_services
from tokenmill.ledger.reports import parse_span, parse_time
from tokenmill.ledger.streams import LedgerSink
from typer.testing import CliRunner

from tokenmill.wire import TokenEvent


@pytest.fixture
def cli(
    settings: Settings, ledger_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> typer.Typer:
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOKENMILL_DATABASE_URL", ledger_url)
    for name in ("TOKENMILL_API_KEY", "TOKENMILL_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def recorded(sink: LedgerSink) -> list[dict]:
    NOW = time.time()  # when the test runs: the reports look back from now
    events = [
        st.finished_event("a1", tenant="alpha", prompt_tokens=1000, completion_tokens=100, finished_at=NOW),
        st.finished_event("a2", tenant="alpha", model="smollm2", prompt_tokens=3, completion_tokens=7,
                          priority="batch", finished_at=NOW),
        st.finished_event("a3", tenant="alpha", prompt_tokens=5, completion_tokens=1, ttft_s=4.0, finished_at=NOW),
        st.finished_event("b1", tenant="beta", prompt_tokens=10, completion_tokens=20, finished_at=NOW),
    ]  # fmt: skip
    sink.write([TokenEvent.model_validate(e) for e in events])
    return events


def run(cli: typer.Typer, *args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_usage_per_tenant_model_and_minute(cli: typer.Typer, recorded: list[dict]) -> None:
    doc = json.loads(run(cli, "usage", "--all-tenants", "--json"))
    assert [(r["tenant"], r["model"], r["requests"], r["input_tokens"], r["output_tokens"]) for r in doc["rows"]] == [
        ("alpha", "sim", 2, 1005, 101), ("alpha", "smollm2", 1, 3, 7), ("beta", "sim", 1, 10, 20),
    ]  # fmt: skip
    minutes = json.loads(run(cli, "usage", "--all-tenants", "--per-minute", "--json"))["rows"]
    minute = datetime.fromtimestamp(recorded[0]["finished_at"], UTC).replace(second=0, microsecond=0)
    assert [r for r in minutes if r["tenant"] == "beta"] == [
        {"tenant": "beta", "model": "sim", "minute": minute.isoformat().replace("+00:00", "Z"),
         "requests": 1, "input_tokens": 10, "output_tokens": 20}]  # fmt: skip
    table = run(cli, "usage", "--all-tenants", "--since", "1h")
    assert "alpha" in table and "smollm2" in table and "1,005" in table
    assert "no usage" in run(
        cli, "usage", "--all-tenants", "--since", "2020-01-01", "--until", "2020-02-01"
    )


def test_invoice_total_is_the_sum_of_its_entries(cli: typer.Typer, recorded: list[dict]) -> None:
    period = datetime.fromtimestamp(recorded[0]["finished_at"], UTC).strftime("%Y-%m")
    docs = json.loads(run(cli, "invoice", "--all-tenants", "--period", period, "--json"))
    assert [d["tenant"] for d in docs] == ["alpha", "beta", "gamma"]  # every configured tenant
    doc = docs[0]
    lines = {ln["model"]: Decimal(ln["amount"]) for ln in doc["lines"]}
    # sim: (1000*0.10 + 100*0.40 + 5*0.10 + 1*0.40)/1e6; smollm2 batch: (3*0.20 + 7*0.80)/1e6/2
    assert lines == {"sim": Decimal("0.0001409"), "smollm2": Decimal("0.0000031")}
    assert Decimal(doc["total"]) == sum(lines.values())
    assert (doc["total_rounded"], doc["currency"]) == ("0.00", "USD")
    assert Decimal(doc["rounding_adjustment"]) == Decimal(doc["total_rounded"]) - sum(
        Decimal(ln["amount_rounded"]) for ln in doc["lines"]
    )
    table = run(cli, "invoice", "--all-tenants", "--period", period)
    assert "0.0001440" in table and "total" in table
    bad = CliRunner().invoke(cli, ["invoice", "--all-tenants", "--period", "November"])
    assert bad.exit_code != 0 and getattr(bad.exception, "field", None) == "period"


def test_sla_percentiles_attainment_and_goodput(cli: typer.Typer, recorded: list[dict]) -> None:
    doc = json.loads(run(cli, "sla", "--all-tenants", "--since", "10m", "--json"))
    alpha = doc["tenants"]["alpha"]
    assert (alpha["requests"], alpha["met"]) == (3, 2)
    assert alpha["target_attainment"]["ttft"] == pytest.approx(2 / 3)
    assert alpha["goodput_rps"] == pytest.approx(2 / 600, rel=0.01)
    group = next(g for g in doc["groups"] if (g["tenant"], g["model"]) == ("alpha", "sim"))
    assert group["tier"] == "gold" and group["requests"] == 2
    assert group["ttft_ms_p50"] == pytest.approx(
        (100 + 4000) / 2
    )  # interpolated median of 100, 4000
    # one row per priority class; a batch line has no latency target (its window is)
    batch = next(g for g in doc["groups"] if (g["tenant"], g["model"]) == ("alpha", "smollm2"))
    assert (group["priority"], batch["priority"]) == ("standard", "batch")
    assert batch["attainment"] == 1.0
    table = run(cli, "sla", "--all-tenants")
    assert "gold" in table and "66.7%" in table


@pytest.mark.parametrize("command", ["usage", "invoice", "sla", "webhooks"])
def test_a_tenant_report_without_a_gateway_says_how_to_reach_one(
    cli: typer.Typer, command: str
) -> None:
    from tokenmill.producers.batch_commands import webhooks_command

    from tokenmill.errors import StackError

    cli.command("webhooks")(webhooks_command)
    result = CliRunner().invoke(cli, [command, "--api-key", "tm-alpha-demo-key"])
    assert isinstance(result.exception, StackError) and "tokenmill up" in str(result.exception)


def test_times_are_iso_or_spans_back() -> None:
    now = datetime(2026, 11, 3, 12, tzinfo=UTC)
    assert parse_time("2h", now=now) == datetime(2026, 11, 3, 10, tzinfo=UTC)
    assert parse_time("2026-11-01", now=now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time("2026-11-01T05:00+01:00", now=now) == datetime(2026, 11, 1, 4, tzinfo=UTC)
    from tokenmill.errors import ValidationError

    with pytest.raises(ValidationError):
        parse_time("yesterday", now=now)
    with pytest.raises(ValidationError) as caught:
        parse_time("99999999999999d", now=now, field="since")  # past the calendar: no OverflowError
    assert caught.value.field == "since"
    assert parse_span("2h", "1h", now=now) == (
        datetime(2026, 11, 3, 10, tzinfo=UTC),
        datetime(2026, 11, 3, 11, tzinfo=UTC),
    )
    with pytest.raises(ValidationError) as caught:
        parse_span("1h", "2h", now=now)
    assert caught.value.field == "until"


def test_up_starts_a_streams_service_with_a_metrics_probe(settings: Settings) -> None:
    (spec,) = streams_services(settings, [])
    assert (spec.name, spec.probe, spec.depends_on) == ("streams", "http", ("kafka", "redis"))
    from tokenmill.stack.spec import Launch

    launch = Launch(
        "streams", Path("/h"), 4321, Path("/h/logs/streams.log"), Path("/h/data"), {}, {}
    )
    assert spec.argv(launch)[-4:] == ["tokenmill", "streams", "--metrics-port", "4321"]
    assert spec.address_of(launch) == "http://127.0.0.1:4321/metrics"


def test_sla_live_draws_fair_shares_until_its_duration(
    cli: typer.Typer, recorded: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console
    from tokenmill.ledger import commands

    monkeypatch.setattr(commands, "console", Console(width=200))  # a wide terminal
    started = time.monotonic()
    out = run(cli, "sla", "--all-tenants", "--live", "--since", "10m", "--interval", "0.1",
              "--duration", "0.3")  # fmt: skip
    assert time.monotonic() - started < 10
    assert "Fair share and SLA, last 10 min" in out and "received / entitled" in out
    assert "Jain's index" in out and "standard" in out and "batch" in out
    # alpha (gold, weight 4) and beta (silver, 2) in standard: entitled 66.7% / 33.3%
    assert "66.7%" in out and "33.3%" in out
    refused = CliRunner().invoke(cli, ["sla", "--live", "--api-key", "tm-alpha-demo-key"])
    assert getattr(refused.exception, "field", None) == "live"


def test_sla_live_ends_cleanly_on_ctrl_c() -> None:
    from rich.console import Console
    from tokenmill.ledger.fairness import Fairness
    from tokenmill.ledger.live import run_live

    calls = []

    def read(now: datetime) -> Fairness:
        calls.append(now)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Fairness(60.0, [], {})

    console = Console(record=True, width=140)
    assert run_live(read, console=console, interval_s=0.01, duration_s=None) == 2
    assert "no finished requests in the window" in console.export_text()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # a process start: once is enough
def test_sla_live_exits_0_on_sigint(ledger_url: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tokenmill.config import EXAMPLE_CONFIG

    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env |= {"TOKENMILL_DATABASE_URL": ledger_url, "TOKENMILL_CONFIG": str(EXAMPLE_CONFIG),
            "TOKENMILL_HOME": str(tmp_path / "home"), "COLUMNS": "200",
            # draw as on a terminal, so the first frame shows it running
            "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "sla", "--all-tenants", "--live", "--interval", "0.2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = b""
        while b"Jain's index" not in seen and b"no finished requests" not in seen:
            chunk = proc.stdout.read1(4096)
            assert chunk, f"exited {proc.wait(5)} before drawing: {seen.decode(errors='replace')}"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, (seen + rest).decode(errors="replace")
        assert b"Traceback" not in seen + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

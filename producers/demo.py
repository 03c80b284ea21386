"""``tokenmill demo``: the main job, end to end on the embedded local stack, through the
gateway as a tenant sees it.

``tokenmill up`` with SmolLM2 on vLLM; the shipped example batch (``config/
example_batch.jsonl``, about 200 short chat requests; each line's ``custom_id`` starts
with its tenant) uploaded and run as one batch per tenant with the official ``openai``
SDK (Files and Batches API), waited for with progress bars; one streamed chat
completion; a sample of the output; usage and bill per tenant (the ledger's invoices)
and the SLA table (``tokenmill sla``); ``tokenmill down``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..wire import Priority

if TYPE_CHECKING:
    import openai

console = Console()
EXAMPLE_BATCH = Path(__file__).resolve().parent.parent / "config" / "example_batch.jsonl"
#: the example config's demo keys (published: local use only)
DEMO_KEYS = {"alpha": "tm-alpha-demo-key", "beta": "tm-beta-demo-key", "gamma": "tm-gamma-demo-key"}
ENDED = ("completed", "failed", "expired", "cancelled")


def split_by_tenant(data: bytes, tenants: set[str], *, model: str | None = None) -> dict[str, bytes]:
    """Lines grouped by the tenant their ``custom_id`` starts with (``alpha-0001``);
    lines of no known tenant go to the first tenant. Each line is kept as it is, except
    that ``model`` (if given) replaces the model its body names."""
    groups: dict[str, list[bytes]] = defaultdict(list)
    first = min(tenants)
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            prefix = str(obj.get("custom_id", "")).split("-", 1)[0]
            if model is not None and isinstance(obj.get("body"), dict) and obj["body"].get("model") != model:
                raw = json.dumps({**obj, "body": {**obj["body"], "model": model}}).encode()
        except (ValueError, AttributeError):
            prefix = ""
        groups[prefix if prefix in tenants else first].append(raw)
    return {t: b"\n".join(lines) + b"\n" for t, lines in groups.items()}


def _cli(*args: str, check: bool = True, wide: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(max(console.width, 100))} if wide else None
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill", *args], text=True, capture_output=True, env=env, check=False
    )
    if check and proc.returncode != 0:
        console.print(proc.stdout, proc.stderr, markup=False)
        raise typer.Exit(proc.returncode)
    return proc


def demo_command(
    model: Annotated[str, typer.Option(help="Model that serves the batch (SmolLM2 on vLLM).")] = "smollm2",
    file: Annotated[Path, typer.Option(help="The batch file.")] = EXAMPLE_BATCH,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    sample: Annotated[int, typer.Option(help="Output lines to show.")] = 6,
) -> None:
    """Run the main job: up, the example batch through the gateway, results and bills, down."""
    import openai

    from ..config.settings import load_settings
    from ..stack import state

    settings = load_settings()
    missing = set(settings.tenants) - set(DEMO_KEYS)
    if missing:
        console.print(f"[red]the demo runs the example config's tenants; no demo key for {sorted(missing)}[/]")
        raise typer.Exit(2)
    if model == "smollm2":
        from ..workers.smollm2 import ensure_smollm2

        console.print("[dim]preparing SmolLM2-135M-Instruct (converted once)…[/]")
        ensure_smollm2(settings.home)
    console.print(f"[bold]1. tokenmill up --model {model}[/]")
    up = _cli("up", "--model", model)
    console.print(up.stdout, markup=False, highlight=False)
    ended: list[tuple[str, Any]] = []
    try:
        recorded = state.load(settings.home)
        gateway = recorded.service("gateway") if recorded else None
        if gateway is None:
            raise typer.Exit(1)
        clients = {t: openai.OpenAI(base_url=gateway.address + "/v1", api_key=DEMO_KEYS[t], max_retries=2)
                   for t in settings.tenants}
        console.print(f"[bold]2. {file.name} through the gateway with the openai SDK[/] "
                      "(files.create + batches.create, one batch per tenant)")
        groups = split_by_tenant(file.read_bytes(), set(settings.tenants), model=model)
        created = {}
        for tenant, data in groups.items():
            client = clients[tenant]
            uploaded = client.files.create(file=(f"{tenant}.jsonl", data), purpose="batch")
            created[tenant] = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
            console.print(f"  {tenant}: {created[tenant].id} ({created[tenant].request_counts.total} lines)")
        console.print(f"[bold]3. a streamed chat completion[/] (alpha, service_tier=priority, {model})")
        _stream_one(clients["alpha"], model)
        ended = _wait_with_progress(clients, created)
        outputs = {t: _output(clients[t], b) for t, b in ended}
        _show_status(ended)
        _show_sample(outputs, sample)
        _show_bill(settings, outputs, model)
        _show_sla()
    finally:
        if not keep_up:
            console.print("[bold]tokenmill down[/]")
            console.print(_cli("down", check=False).stdout, markup=False, highlight=False)
    if not ended or any(b.status != "completed" for _, b in ended):
        raise typer.Exit(1)


def _stream_one(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, stream=True, service_tier="priority", stream_options={"include_usage": True},
    )
    console.print("  ", end="")
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        if chunk.usage is not None:
            console.print(f"\n  [dim]{chunk.usage.prompt_tokens} prompt + "
                          f"{chunk.usage.completion_tokens} completion tokens[/]")


def _wait_with_progress(
    clients: dict[str, openai.OpenAI], created: dict[str, Any], poll_s: float = 0.5
) -> list[tuple[str, Any]]:
    """Rich progress bars, one per batch, until every batch has ended; ``(tenant, batch)``
    of the ended batches."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=Console(stderr=True)) as progress:
        tasks = {t: progress.add_task(f"{t} {b.id[:16]}…", total=b.request_counts.total, status=b.status)
                 for t, b in created.items()}
        while len(done) < len(created):
            for tenant, batch in created.items():
                if tenant in done:
                    continue
                b = clients[tenant].batches.retrieve(batch.id)
                c = b.request_counts
                progress.update(tasks[tenant], total=c.total, completed=c.completed + c.failed, status=b.status)
                if b.status in ENDED:
                    done[tenant] = b
            if len(done) < len(created):
                time.sleep(poll_s)
    return [(t, done[t]) for t in created]


def _output(client: openai.OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def rows(file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]

    return rows(batch.output_file_id), rows(batch.error_file_id)


def _show_status(ended: list[tuple[str, Any]]) -> None:
    table = Table(title="batches")
    for col in ("tenant", "batch", "status", "total", "completed", "failed"):
        table.add_column(col)
    for tenant, b in ended:
        c = b.request_counts
        table.add_row(tenant, b.id, b.status, str(c.total), str(c.completed), str(c.failed))
    console.print(table)


def _show_sample(results: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], n: int) -> None:
    table = Table(title="sample of the output", show_lines=True)
    table.add_column("custom_id")
    table.add_column("answer")
    shown = 0
    for output, _ in results.values():
        for entry in output[: max(1, n // max(1, len(results)))]:
            body = entry["response"]["body"] or {}
            choice = (body.get("choices") or [{}])[0]
            text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            table.add_row(entry["custom_id"], text.strip()[:200])
            shown += 1
    console.print(table)


def _show_bill(settings: Any, results: dict[str, Any], model: str) -> None:
    """Usage and bill per tenant: this month's invoice from the ledger (once the stream
    processors have charged every line of the batches), else the batches' own count."""
    from ..pricing import cost, to_cents

    expected = {t: len(output) for t, (output, _) in results.items()}
    invoices = _invoices(settings, expected)
    table = Table(title="usage and bill per tenant" + (" (ledger, this month)" if invoices else
                                                         f" (from the batch output, {model} batch price)"))
    for col in ("tenant", "requests", "input tokens", "output tokens", "amount (exact)", "billed"):
        table.add_column(col, justify="right")
    for tenant in sorted(results):
        if invoices:
            inv = invoices[tenant]
            row = (sum(ln.requests for ln in inv.lines), sum(ln.prompt_tokens for ln in inv.lines),
                   sum(ln.completion_tokens for ln in inv.lines), inv.total, inv.total_rounded, inv.currency)
        else:
            card = settings.price_card(model, datetime.now(UTC))
            usages = [(e["response"]["body"] or {}).get("usage", {}) for e in results[tenant][0]]
            p = sum(u.get("prompt_tokens", 0) for u in usages)
            c = sum(u.get("completion_tokens", 0) for u in usages)
            amount = sum((cost(card, u.get("prompt_tokens", 0), u.get("completion_tokens", 0), Priority.batch)
                          for u in usages), Decimal(0))
            row = (len(usages), p, c, amount, to_cents(amount), card.currency)
        n, p, c, exact, billed, currency = row
        table.add_row(tenant, f"{n:,}", f"{p:,}", f"{c:,}", f"{exact:f}", f"{billed:f} {currency}")
    console.print(table)


def _invoices(settings: Any, expected: dict[str, int], timeout_s: float = 30.0) -> dict[str, Any]:
    """This month's invoices, once each tenant has at least ``expected`` charged requests
    (the stream processors charge asynchronously); empty if billing is not running."""
    import time

    try:
        from ..ledger import Period, invoice, shared_factory, transaction
    except ImportError:
        return {}
    now = datetime.now(UTC)
    period = Period.month(now.year, now.month)
    deadline = time.monotonic() + timeout_s
    while True:
        with transaction(shared_factory(settings.ledger_url)) as session:
            found = {t: invoice(session, t, period) for t in expected}
        if all(sum(ln.requests for ln in found[t].lines) >= n for t, n in expected.items()):
            return found
        if time.monotonic() > deadline:
            return {}
        time.sleep(1.0)


def _show_sla() -> None:
    """The SLA table, from ``tokenmill sla`` (the SLA stream processor's report)."""
    proc = _cli("sla", "--all-tenants", check=False, wide=True)
    if proc.returncode == 0:
        console.print(proc.stdout, markup=False, highlight=False)
    else:
        console.print(f"[dim]tokenmill sla: {proc.stderr.strip() or proc.stdout.strip()}[/]")

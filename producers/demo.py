"""``tokenmill demo``: the main job, end to end on the embedded local stack.

``tokenmill up`` with SmolLM2 on vLLM; the shipped example batch (``config/
example_batch.jsonl``, about 200 short chat requests; each line's ``custom_id`` starts
with its tenant) submitted as one batch per tenant and waited for with progress bars;
a sample of the output; usage and bill per tenant (the ledger's invoices) and the SLA
table (``tokenmill sla``); ``tokenmill down``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..wire import BatchStatus, Priority

console = Console()
EXAMPLE_BATCH = Path(__file__).resolve().parent.parent / "config" / "example_batch.jsonl"


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
    """Run the main job: up, the example batch with --wait, results and bills, down."""
    from ..config.settings import load_settings
    from .batch_commands import wait_with_progress
    from .batches import Batches

    settings = load_settings()
    if model == "smollm2":
        from ..workers.smollm2 import ensure_smollm2

        console.print("[dim]preparing SmolLM2-135M-Instruct (converted once)…[/]")
        ensure_smollm2(settings.home)
    console.print(f"[bold]1. tokenmill up --model {model}[/]")
    up = _cli("up", "--model", model)
    console.print(up.stdout, markup=False, highlight=False)
    try:
        console.print(f"[bold]2. tokenmill batch submit {file.name} --wait[/] (one batch per tenant)")
        groups = split_by_tenant(file.read_bytes(), set(settings.tenants), model=model)
        owners = {t: Batches(settings, t) for t in groups}
        batches = [owners[t].create(data, model=model) for t, data in groups.items()]
        for b in batches:
            console.print(f"  {b.tenant}: {b.id} ({b.request_counts.total} lines)")
        ended = wait_with_progress([(owners[b.tenant], b.id) for b in batches])
        results = {b.tenant: owners[b.tenant].results(b.id) for b in ended}
        _show_status(ended)
        _show_sample(results, sample)
        _show_bill(settings, results, model)
        _show_sla()
    finally:
        if not keep_up:
            console.print("[bold]tokenmill down[/]")
            console.print(_cli("down", check=False).stdout, markup=False, highlight=False)
    if any(b.status is not BatchStatus.completed for b in ended):
        raise typer.Exit(1)


def _show_status(ended: list[Any]) -> None:
    table = Table(title="batches")
    for col in ("tenant", "batch", "status", "total", "completed", "failed"):
        table.add_column(col)
    for b in ended:
        c = b.request_counts
        table.add_row(b.tenant, b.id, b.status.value, str(c.total), str(c.completed), str(c.failed))
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
    proc = _cli("sla", check=False, wide=True)
    if proc.returncode == 0:
        console.print(proc.stdout, markup=False, highlight=False)
    else:
        console.print(f"[dim]tokenmill sla: {proc.stderr.strip() or proc.stdout.strip()}[/]")

"""``tokenmill batch …``, ``tokenmill webhooks``, ``tokenmill demo``, and the batch runner
and webhook services that ``tokenmill up`` starts."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import runtime
from ..wire import Batch, BatchStatus
from .batches import batch_data

if TYPE_CHECKING:
    from ..config.settings import Settings
    from ..stack.spec import ServiceSpec
    from .batches import Batches

console = Console()
err = Console(stderr=True)
batch_app = typer.Typer(help="Batch files in the OpenAI Batch format.", no_args_is_help=True)

TenantOpt = Annotated[str | None, typer.Option(help="Tenant name (local stack); else TOKENMILL_API_KEY.")]
ApiKeyOpt = Annotated[str | None, typer.Option(envvar="TOKENMILL_API_KEY", help="The tenant's API key.")]
OutputOpt = Annotated[Path | None, typer.Option(help="Write the output file here.")]
ErrorsOpt = Annotated[Path | None, typer.Option(help="Write the error file here.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _batches(tenant: str | None, api_key: str | None) -> Batches:
    from ..config.settings import load_settings
    from .batches import Batches
    from .client import resolve_tenant

    settings = load_settings()
    return Batches(settings, resolve_tenant(settings, api_key, tenant))


def _print_batch(batch: Batch, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(batch_data(batch, exclude_none=False), indent=2) + "\n")
        return
    c = batch.request_counts
    table = Table(show_header=False, title=f"batch {batch.id}")
    rows = [
        ("tenant", batch.tenant), ("status", batch.status.value), ("endpoint", batch.endpoint.value),
        ("requests", f"{c.total} total · {c.completed} completed · {c.failed} failed"),
        ("created", _when(batch.created_at)), ("expires", _when(batch.expires_at)),
        ("output file", batch.output_file or "-"), ("error file", batch.error_file or "-"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@batch_app.command("submit")
def submit_command(
    file: Annotated[Path, typer.Argument(help="The batch file (JSONL, one request a line).")],
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    priority: Annotated[str, typer.Option(help="interactive | standard | batch")] = "batch",
    completion_window: Annotated[str, typer.Option(help="How long it may run: 24h, 90m, 30s …")] = "24h",
    webhook: Annotated[str | None, typer.Option(help="URL to notify when the batch ends.")] = None,
    model: Annotated[str | None, typer.Option(help="Model of lines whose body names none.")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until it ends, then write the files.")] = False,
    output: OutputOpt = None,
    errors: ErrorsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate and submit a batch file; invalid lines go to the error file."""
    batches = _batches(tenant, api_key)
    batch = batches.create(
        file, priority=priority, completion_window=completion_window, webhook=webhook, model=model
    )
    invalid = batch.request_counts.failed
    err.print(f"batch [bold]{batch.id}[/]: {batch.request_counts.total} lines, "
              f"{batch.request_counts.total - invalid} accepted, {invalid} invalid")
    if not wait:
        _print_batch(batch, as_json)
        return
    [batch] = wait_with_progress([(batches, batch.id)])
    _finish(batches, batch, output, errors, as_json)


def wait_with_progress(batches: Sequence[tuple[Batches, str]], *, poll_s: float = 0.5) -> list[Batch]:
    """Rich progress bars (lines done, throughput, ETA) until every ``(owner, batch id)``
    has ended; returns the ended batches in the same order."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    done: dict[str, Batch] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9}"), TextColumn("ETA"), TimeRemainingColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=err,
    ) as progress:
        tasks = {bid: progress.add_task(bid, total=None, rate="", status="") for _, bid in batches}
        while len(done) < len(batches):
            for owner, bid in batches:
                if bid in done:
                    continue
                b = owner.retrieve(bid)
                c = b.request_counts
                elapsed = max(1e-6, time.monotonic() - started)
                progress.update(
                    tasks[bid], total=c.total, completed=c.completed + c.failed,
                    description=f"{b.tenant} {bid[:14]}…", rate=f"{(c.completed + c.failed) / elapsed:.1f}/s",
                    status=b.status.value,
                )
                if b.status.is_terminal:
                    done[bid] = b
            if len(done) < len(batches):
                time.sleep(poll_s)
    return [done[bid] for _, bid in batches]


def _finish(batches: Batches, batch: Batch, output: Path | None, errors: Path | None, as_json: bool) -> None:
    _print_batch(batch, as_json)
    if batch.output_file:
        out, errs = batches.download(batch.id, output=output, errors=errors)
        err.print(f"output: {out}\nerrors: {errs}")
    if batch.status is not BatchStatus.completed:
        raise typer.Exit(1)


@batch_app.command("status")
def status_command(batch_id: str, tenant: TenantOpt = None, api_key: ApiKeyOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Show a batch: status, request counts, files."""
    _print_batch(_batches(tenant, api_key).retrieve(batch_id), as_json)


@batch_app.command("list")
def list_command(
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
    after: Annotated[str | None, typer.Option(help="List those created before this batch id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The tenant's batches, newest first."""
    found = _batches(tenant, api_key).list(limit=limit, after=after)
    if as_json:
        sys.stdout.write(json.dumps([batch_data(b, exclude_none=False) for b in found], indent=2) + "\n")
        return
    table = Table(title="batches")
    for col in ("id", "status", "total", "completed", "failed", "created"):
        table.add_column(col)
    for b in found:
        c = b.request_counts
        table.add_row(b.id, b.status.value, str(c.total), str(c.completed), str(c.failed), _when(b.created_at))
    console.print(table)


@batch_app.command("cancel")
def cancel_command(batch_id: str, tenant: TenantOpt = None, api_key: ApiKeyOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Cancel a batch; results so far are kept."""
    _print_batch(_batches(tenant, api_key).cancel(batch_id), as_json)


@batch_app.command("download")
def download_command(batch_id: str, tenant: TenantOpt = None, api_key: ApiKeyOpt = None,
                     output: OutputOpt = None, errors: ErrorsOpt = None) -> None:
    """Write an ended batch's output and error files (or print where they are)."""
    out, errs = _batches(tenant, api_key).download(batch_id, output=output, errors=errors)
    console.print(f"output: {out}\nerrors: {errs}")


def webhooks_command(
    failed: Annotated[bool, typer.Option("--failed", help="Only dead-lettered deliveries.")] = False,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Webhook deliveries, newest first (--failed: the dead-lettered ones)."""
    from ..config.settings import load_settings
    from ..ledger import DeliveryStatus, list_webhooks, shared_factory, transaction

    settings = load_settings()
    with transaction(shared_factory(settings.ledger_url)) as session:
        rows = list_webhooks(session, tenant=tenant, status=DeliveryStatus.dead if failed else None, limit=limit)
        items = [
            {"webhook_id": r.webhook_id, "tenant": r.tenant, "event_type": r.event_type, "url": r.url,
             "status": r.status.value, "attempts": r.attempts, "last_status_code": r.last_status_code,
             "last_error": r.last_error, "created_at": r.created_at.isoformat()}
            for r in rows
        ]
    if as_json:
        sys.stdout.write(json.dumps(items, indent=2) + "\n")
        return
    table = Table(title="dead-lettered webhooks" if failed else "webhooks")
    for col in ("webhook-id", "tenant", "event", "url", "status", "attempts", "last error"):
        table.add_column(col)
    for i in items:
        table.add_row(i["webhook_id"], i["tenant"], i["event_type"], i["url"], i["status"],
                      str(i["attempts"]), i["last_error"] or "")
    console.print(table)


# -- services ---------------------------------------------------------------------------


def batch_runner_command() -> None:
    """Run the batch runner service (``tokenmill up`` starts one)."""
    from ..config.settings import load_settings
    from ..logs import configure
    from ..stack import endpoints
    from .batch_runner import serve

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    asyncio.run(serve(settings, endpoints(settings)))


def webhook_worker_command(
    concurrency: Annotated[int, typer.Option(help="Delivery threads.")] = 8,
) -> None:
    """Run the webhook worker: Celery on the tokenmill.webhooks queue, and its dispatcher."""
    from ..config.settings import load_settings
    from ..logs import configure
    from ..workers.webhooks import run_webhook_worker

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    raise typer.Exit(run_webhook_worker(settings, concurrency=concurrency))


def batch_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    from ..stack import ServiceSpec

    return [
        ServiceSpec(
            name="batch-runner",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "batch-runner"],
            depends_on=("kafka", "redis"),
        ),
        ServiceSpec(
            name="webhooks",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "webhook-worker"],
            depends_on=("kafka", "redis"),
            stop_timeout_s=20.0,
        ),
    ]


def register(app: typer.Typer) -> None:
    """Add ``batch``, ``webhooks``, ``demo`` and the hidden service commands."""
    from ..stack import register_factory
    from .demo import demo_command

    app.add_typer(batch_app, name="batch")
    app.command("webhooks")(webhooks_command)
    app.command("demo")(demo_command)
    app.command("batch-runner", hidden=True)(batch_runner_command)
    app.command("webhook-worker", hidden=True)(webhook_worker_command)
    register_factory(batch_services)

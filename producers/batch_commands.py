"""``tokenmill batch …``, ``tokenmill webhooks``, ``tokenmill demo``, and the batch runner
and webhook services that ``tokenmill up`` starts.

``tokenmill batch`` goes through the gateway's Files and Batches API with a key:
``--api-key`` (default ``$TOKENMILL_API_KEY``), or ``--tenant NAME``, which stands for
that tenant's demo key only while the state directory (``$TOKENMILL_HOME``) has a local
stack running (``tokenmill up``); ``--base-url`` (default ``$TOKENMILL_BASE_URL``, else
the local stack's gateway).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import runtime
from ..wire import BatchStatus
from .commands import ApiKeyOpt, BaseUrlOpt, TenantOpt

if TYPE_CHECKING:
    from ..config.settings import Settings
    from ..stack.spec import ServiceSpec
    from .client import Batch, Batches

console = Console()
err = Console(stderr=True)
batch_app = typer.Typer(help="Batch files in the OpenAI Batch format, through the gateway.",
                        no_args_is_help=True)

OutputOpt = Annotated[Path | None, typer.Option(
    help="Write the output file here (default: <batch id>_output.jsonl).")]
ErrorsOpt = Annotated[Path | None, typer.Option(
    help="Write the error file here (default: <batch id>_errors.jsonl).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _batches(tenant: str | None, api_key: str | None, base_url: str | None) -> Iterator[Batches]:
    from .client import Client

    with Client(api_key, base_url=base_url, tenant=tenant) as client:
        yield client.batches


def _print_batch(batch: Batch, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(batch.model_dump(mode="json"), indent=2) + "\n")
        return
    c = batch.request_counts
    table = Table(show_header=False, title=f"batch {batch.id}")
    rows = [
        ("status", batch.status.value), ("endpoint", batch.endpoint),
        ("requests", f"{c.total} total · {c.completed} completed · {c.failed} failed"),
        ("created", _when(batch.created_at)), ("expires", _when(batch.expires_at)),
        ("input file", batch.input_file_id), ("output file", batch.output_file_id or "-"),
        ("error file", batch.error_file_id or "-"),
    ]
    forecast = (batch.model_extra or {}).get("forecast")
    if forecast:
        eta = _when(forecast.get("estimated_completion_at"))
        risk = "AT RISK: forecast past its window" if forecast.get("at_risk") else "within its window"
        rows.append(("forecast", f"done by {eta} · {risk}"))
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
    base_url: BaseUrlOpt = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Require this url on every line (default: lines may mix endpoints, "
                                      "as `vllm run-batch` files do).")
    ] = None,
    completion_window: Annotated[str, typer.Option(help="How long it may run: 24h, 90m, 30s …")] = "24h",
    webhook: Annotated[str | None, typer.Option(help="URL to notify when the batch ends.")] = None,
    model: Annotated[str | None, typer.Option(help="Model of lines whose body names none.")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until it ends, then write the files.")] = False,
    output: OutputOpt = None,
    errors: ErrorsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a batch file and create a batch of it; invalid lines go to the error file."""
    with _batches(tenant, api_key, base_url) as batches:
        batch = batches.create(file, endpoint=endpoint, completion_window=completion_window,
                               webhook=webhook, model=model)
        err.print(f"batch [bold]{batch.id}[/]: {batch.status.value}")
        if not wait:
            _print_batch(batch, as_json)
            return
        [batch] = wait_with_progress([(batches, batch.id)])
        c = batch.request_counts
        err.print(f"batch [bold]{batch.id}[/]: {c.total} lines, {c.completed} completed, {c.failed} failed")
        _print_batch(batch, as_json)
        out, errs = batches.download(batch.id, output=output, errors=errors)
    err.print(f"output: {out}\nerrors: {errs}")
    if batch.status is not BatchStatus.completed:
        raise typer.Exit(1)


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
                    tasks[bid], total=c.total, completed=c.completed + c.failed, description=f"{bid[:20]}…",
                    rate=f"{(c.completed + c.failed) / elapsed:.1f}/s", status=b.status.value,
                )
                if b.status.is_terminal:
                    done[bid] = b
            if len(done) < len(batches):
                time.sleep(poll_s)
    return [done[bid] for _, bid in batches]


@batch_app.command("status")
def status_command(batch_id: str, tenant: TenantOpt = None, api_key: ApiKeyOpt = None,
                   base_url: BaseUrlOpt = None, as_json: JsonOpt = False) -> None:
    """Show a batch: status, request counts, files."""
    with _batches(tenant, api_key, base_url) as batches:
        _print_batch(batches.retrieve(batch_id), as_json)


@batch_app.command("list")
def list_command(
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    base_url: BaseUrlOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
    after: Annotated[str | None, typer.Option(help="List those created before this batch id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The tenant's batches, newest first."""
    with _batches(tenant, api_key, base_url) as batches:
        found = batches.list(limit=limit, after=after)
    if as_json:
        sys.stdout.write(json.dumps([b.model_dump(mode="json") for b in found], indent=2) + "\n")
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
                   base_url: BaseUrlOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a batch; results so far are kept."""
    with _batches(tenant, api_key, base_url) as batches:
        _print_batch(batches.cancel(batch_id), as_json)


@batch_app.command("download")
def download_command(
    batch_id: str,
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    base_url: BaseUrlOpt = None,
    output: OutputOpt = None,
    errors: ErrorsOpt = None,
    partial: Annotated[bool, typer.Option(
        "--partial", help="The rows recorded so far, while the batch runs (in the order they finished).",
    )] = False,
    after: Annotated[int | None, typer.Option(
        min=0, help="With --partial: the cursor a previous run printed; append the rows after it.",
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write an ended batch's output and error files; with --partial, the rows so far.

    --partial: the rows recorded so far, each as in the final files; rerun with
    --after N (the cursor it prints) to append the rows that came since.
    """
    if after is not None and not partial:
        raise typer.BadParameter("--after goes with --partial", param_hint="--after")
    with _batches(tenant, api_key, base_url) as batches:
        if partial:
            _download_partial(batches, batch_id, output, errors, after or 0, as_json)
            return
        out, errs = batches.download(batch_id, output=output, errors=errors)
    if as_json:
        sys.stdout.write(json.dumps({"output": str(out), "errors": str(errs)}) + "\n")
        return
    console.print(f"output: {out}\nerrors: {errs}")


def _download_partial(batches: Batches, batch_id: str, output: Path | None, errors: Path | None,
                      after: int, as_json: bool) -> None:
    """Append the rows after cursor ``after`` to the two files (cursor 0: write them
    afresh), page by page; print the next cursor."""
    paths = {"output": output or Path(f"{batch_id}_output.jsonl"),
             "error": errors or Path(f"{batch_id}_errors.jsonl")}  # fmt: skip
    written = {"output": 0, "error": 0}
    cursor = after
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    handles = {kind: p.open("ab" if after else "wb") for kind, p in paths.items()}
    try:
        while True:
            page = batches.partial(batch_id, after=cursor)
            for kind, data in page.lines:
                handles[kind].write(data)
                written[kind] += 1
            cursor = page.next_after
            if not page.has_more:
                break
    finally:
        for fh in handles.values():
            fh.close()
    ended = page.ended
    if as_json:
        sys.stdout.write(json.dumps({
            "output": str(paths["output"]), "errors": str(paths["error"]), "after": cursor,
            "status": page.status.value, "ended": ended, "output_rows": written["output"],
            "error_rows": written["error"],
        }) + "\n")  # fmt: skip
        return
    console.print(f"output: {paths['output']} (+{written['output']} rows)\n"
                  f"errors: {paths['error']} (+{written['error']} rows)")
    if ended:
        err.print(f"batch {batch_id} {page.status.value}: every row is in the two files")
    else:
        err.print(f"batch {batch_id} {page.status.value}: rerun with --after {cursor} for the rows to come")
    console.print(f"next: {cursor}")


def webhooks_command(
    failed: Annotated[bool, typer.Option("--failed", help="Only dead-lettered deliveries.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    tenant: TenantOpt = None,
    api_key: ApiKeyOpt = None,
    base_url: BaseUrlOpt = None,
    all_tenants: Annotated[bool, typer.Option(
        "--all-tenants", help="Operator: every tenant's, from the ledger directly (needs the server's config).",
    )] = False,
    as_json: JsonOpt = False,
) -> None:
    """Your webhook deliveries, newest first (--failed: the dead-lettered ones)."""
    from ..ledger.commands import webhooks

    webhooks(failed=failed, limit=limit, api_key=api_key, tenant=tenant, base_url=base_url,
             all_tenants=all_tenants, as_json=as_json)


# -- services ---------------------------------------------------------------------------


def batch_runner_command() -> None:
    """Run the batch runner: accepted batches → their lines queued → output files.

    It publishes each accepted batch's lines, collects their results, and writes the
    output and error files; at start it resumes every unfinished batch from the
    ledger. Run any number of copies; `tokenmill up` starts one.
    """
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
    """Run the webhook worker: signed webhooks of finished requests and batches.

    Celery on the tokenmill.webhooks queue (retries, then a dead-letter list) and its
    dispatcher. `tokenmill up` starts one, as the `webhooks` service.
    """
    from ..config.settings import load_settings
    from ..logs import configure
    from ..workers.webhooks import run_webhook_worker

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    raise typer.Exit(run_webhook_worker(settings, concurrency=concurrency))


def batch_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    from ..stack import ServiceSpec, StopStage

    return [
        ServiceSpec(
            name="batch-runner",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "batch-runner"],
            depends_on=("kafka", "redis"),
            stop_stage=StopStage.intake,
        ),
        ServiceSpec(
            name="webhooks",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "webhook-worker"],
            depends_on=("kafka", "redis"),
            stop_timeout_s=20.0,
        ),
    ]


def register(app: typer.Typer) -> None:
    """Add ``batch``, ``webhooks``, ``demo`` and the service commands ``batch-runner``
    and ``webhook-worker``."""
    from ..stack import register_factory
    from .demo import demo_command

    app.add_typer(batch_app, name="batch")
    app.command("webhooks")(webhooks_command)
    app.command("demo")(demo_command)
    app.command("batch-runner")(batch_runner_command)
    app.command("webhook-worker")(webhook_worker_command)
    register_factory(batch_services)

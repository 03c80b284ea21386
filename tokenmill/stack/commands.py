"""``tokenmill up``, ``status`` and ``down``."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import structlog
import typer
from rich.console import Console
from rich.table import Table

from . import manager
from .status import check_stack
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings

console = Console()


def register(app: typer.Typer) -> None:
    """Add the stack's commands to the ``tokenmill`` CLI."""
    app.command("up")(up_command)
    app.command("down")(down_command)
    app.command("status")(status_command)


def _settings() -> Settings:
    from ..config.settings import load_settings

    # Logs go to stderr so stdout stays for tables and JSON (unless logging was set up).
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    return load_settings()


def up_command(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to serve (repeatable); recorded for the workers that up starts.",
        ),
    ] = None,
) -> None:
    """Start the local stack (broker, Redis, services) in the background; no-op if up.

    A service that died is started again on its own; a dead broker or Redis restarts
    everything (Redis reloads its append-only file from the state directory).

    Services with a configured URL (TOKENMILL_KAFKA_URL, _REDIS_URL, _DATABASE_URL)
    are used as they are, not started.
    """
    settings = _settings()
    result = manager.up(settings, models=model or ())
    table = Table(title=f"tokenmill stack in {settings.home.resolve()}")
    for col in ("service", "state", "address", "pid"):
        table.add_column(col)
    for record in result.state.services:
        if record.name in result.restarted:
            how = f"restarted ({record.restarts})"
        else:
            how = "started" if record.name in result.started else "already running"
        table.add_row(
            record.name,
            how,
            mask_url(record.address),
            str(record.pid),
        )
    for name, address in result.external.items():
        table.add_row(name, "external", address, "-")
    console.print(table)
    if result.state.models:
        console.print(f"models: {', '.join(result.state.models)}")
    if result.already_running and not result.started:
        console.print("[green]already up[/]: nothing to start")
    elif not result.started:
        console.print("nothing to start: every service is external")


def down_command() -> None:
    """Stop everything tokenmill up started and forget it: intake first (gateway, batch
    runner, scheduler), then workers and webhooks, then the stream processors once they
    drained, then the broker and Redis (whose append-only file stays for the next up)."""
    stopped = manager.down(_settings())
    if stopped:
        console.print(f"stopped: {', '.join(stopped)}")
    else:
        console.print("nothing was running")


def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each health check may take.")] = 2.0,
) -> None:
    """Check each service live; exit code 1 when any is down."""
    result = check_stack(_settings(), timeout_s=timeout)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        table = Table(title=f"tokenmill stack in {result.home}")
        for col in ("service", "address", "pid", "restarts", "health"):
            table.add_column(col)
        for s in result.services:
            pid = str(s.pid) if s.pid else "-"
            health = "[green]ok[/]" if s.healthy else f"[red]down[/]: {s.detail}"
            table.add_row(s.name, s.address, pid, str(s.restarts) if s.managed else "-", health)
        console.print(table)
    if not result.healthy:
        raise typer.Exit(code=1)

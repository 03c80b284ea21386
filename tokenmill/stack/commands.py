"""``tokenmill up``, ``status``, ``restart``, ``down`` and ``supervise``."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import structlog
import typer
from rich.console import Console
from rich.table import Table

from . import manager
from .status import StackStatus, check_stack
from .urls import mask_url

if TYPE_CHECKING:
    from ..config.settings import Settings

console = Console()


def register(app: typer.Typer) -> None:
    """Add the stack's commands to the ``tokenmill`` CLI."""
    app.command("up")(up_command)
    app.command("down")(down_command)
    app.command("status")(status_command)
    app.command("restart")(restart_command)
    app.command("supervise")(supervise_command)


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
    supervise: Annotated[
        bool,
        typer.Option(help="Also start the supervisor, which restarts any service that dies."),
    ] = True,
) -> None:
    """Start the local stack (broker, Redis, services) in the background; no-op if up.

    With it starts a supervisor (`tokenmill supervise`) that restarts a service that
    dies on its own within a second or two, alone (backing off when it keeps dying),
    and restarts everything when the embedded broker or Redis dies (Redis reloads its
    append-only file from the state directory). Without a supervisor, running `up`
    again does the same once.

    Services with a configured URL (TOKENMILL_KAFKA_URL, _REDIS_URL, _DATABASE_URL)
    are used as they are, not started.
    """
    settings = _settings()
    result = manager.up(settings, models=model or (), supervise=supervise)
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
    """Stop everything tokenmill up started, the supervisor first, and forget it.

    Then intake (gateway, batch runner, scheduler), then workers and webhooks, then the
    stream processors once they drained, then the broker and Redis (whose append-only
    file stays for the next up).
    """
    stopped = manager.down(_settings())
    if stopped:
        console.print(f"stopped: {', '.join(stopped)}")
    else:
        console.print("nothing was running")


def restart_command(
    service: Annotated[str, typer.Argument(help="The service, as `tokenmill status` names it.")],
) -> None:
    """Restart one service of the local stack, on the same port.

    Stops its process group (SIGTERM, then SIGKILL after its stop timeout) and starts
    it again. Restarting the embedded broker or Redis restarts the whole stack.
    """
    result = manager.restart(_settings(), service)
    for record in result.state.services:
        if record.name in result.restarted:
            console.print(
                f"restarted {record.name}: pid {record.pid}"
                + (f", {mask_url(record.address)}" if record.address else "")
            )


def supervise_command() -> None:
    """Keep the local stack alive: restart any service of `tokenmill up` that dies.

    `up` starts it in the background and `down` stops it first. A dead service is
    restarted alone within a second or two (backing off when it keeps dying); a dead
    embedded broker or Redis restarts everything. Each restart is logged with its
    reason.
    """
    from ..logs import configure
    from .supervisor import supervise

    settings = _settings()
    configure(settings.log_level)
    supervise(settings)


def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each health check may take.")] = 2.0,
) -> None:
    """Check each service live and list its live copies; exit code 1 if any is not ok.

    A service is degraded when one it depends on (the broker, Redis) is down. Each
    copy that announces itself shows its role (active, standby or copy) and lag.
    """
    result = check_stack(_settings(), timeout_s=timeout)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        console.print(status_table(result))
    if not result.healthy:
        raise typer.Exit(code=1)


_STATE_STYLE = {"ok": "[green]ok[/]", "degraded": "[yellow]degraded[/]", "down": "[red]down[/]"}


def status_table(result: StackStatus) -> Table:
    """The human view: a row per service, a dimmed row under it per live copy."""
    table = Table(title=f"tokenmill stack in {result.home}")
    for col in ("service", "address", "pid", "restarts", "health"):
        table.add_column(col)
    for s in result.services:
        pid = str(s.pid) if s.pid else "-"
        detail = s.detail.removeprefix("degraded: ")
        health = _STATE_STYLE[s.state] + ("" if s.state == "ok" else f": {detail}")
        table.add_row(s.name, s.address, pid, str(s.restarts) if s.managed else "-", health)
        for c in s.copies:
            extra = " ".join(f"{k}={v}" for k, v in c.detail.items())
            table.add_row(
                f"  └ {c.role}", c.instance, str(c.pid) if c.pid else "-", "",
                f"{extra} (seen {c.age_s:.0f}s ago)".strip(), style="dim",
            )
    return table

"""The ``tokenmill`` command line.

Each subsystem keeps its commands in its own module and registers them here, so this
file stays a table of contents.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from .errors import TokenmillError

app = typer.Typer(
    name="tokenmill",
    help="Queue-based batch and stream processing for self-hosted LLM inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    from .stack import commands as stack_commands

    stack_commands.register(app)
    # Every subsystem ships with the package: one that fails to import is a bug to show,
    # not a command to leave out quietly.
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(app)


# Subsystems that add commands; each module has ``register(app)``.
_COMMAND_MODULES = (
    "tokenmill.workers.commands",
    "tokenmill.scheduler.commands",
    "tokenmill.producers.commands",
    "tokenmill.producers.batch_commands",
    "tokenmill.ledger.commands",
    "tokenmill.gateway.commands",
)


def not_built_yet(name: str, issue: str) -> None:
    """Commands that later work builds say so plainly instead of pretending."""
    err_console.print(f"[yellow]tokenmill {name}[/] is not built yet ({issue}).")
    raise typer.Exit(code=2)


def main() -> None:
    _register()
    try:
        app()
    except TokenmillError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(1)

"""``tokenmill scheduler``: run the scheduler service; ``tokenmill up`` starts one."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import typer

from ..config import Settings, load_settings
from ..stack import ServiceSpec, endpoints, register_factory


def scheduler_command() -> None:
    """Run the fair-share scheduler: priority topics → policy → worker pools."""
    from ..logs import configure
    from .service import serve

    settings = load_settings()
    configure(settings.log_level)
    asyncio.run(serve(settings, endpoints(settings)))


def scheduler_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            name="scheduler",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "scheduler"],
            depends_on=("kafka", "redis"),
        )
    ]


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler_command)
    register_factory(scheduler_services)

"""``tokenmill scheduler``: run the scheduler service; ``tokenmill up`` starts one."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from .. import loops, runtime
from ..config import Settings, load_settings
from ..stack import ServiceSpec, StopStage, endpoints, register_factory


def scheduler_command() -> None:
    """Run the fair-share scheduler: priority topics → policy → worker pools."""
    from ..logs import configure
    from .service import serve

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    loops.run(serve(settings, endpoints(settings)))


def scheduler_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            name="scheduler",
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "scheduler"],
            depends_on=("kafka", "redis"),
            ready=lambda launch: _is_consuming(launch.addresses.get("redis")),
            stop_stage=StopStage.intake,
        )
    ]


def _is_consuming(redis_url: str | None) -> bool:
    """The scheduler has joined its topics (it sets a short-lived key once it has)."""
    import redis

    from .service import ALIVE_KEY

    if not redis_url:
        return False
    try:
        return bool(redis.Redis.from_url(redis_url, socket_timeout=1.0).exists(ALIVE_KEY))
    except redis.RedisError:
        return False


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler_command)
    register_factory(scheduler_services)

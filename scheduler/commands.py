"""``tokenmill scheduler``: run the scheduler service; ``tokenmill up`` starts one."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import typer

from .. import loops, runtime
from ..config import Settings, load_settings
from ..stack import ServiceSpec, StopStage, endpoints, register_factory


def scheduler_command() -> None:
    """Run the fair-share scheduler: priority topics → policy → worker pools.

    Any number may run: the one holding the lease in Redis is active, the others stand
    by and take over within seconds of its death. One that loses its lease while
    active (paused past it, cut off from Redis) exits with status 75; started again,
    it comes back as a standby.
    """
    from ..logs import configure, get_logger
    from .leader import FENCED_EXIT_CODE, Fenced
    from .service import serve

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    try:
        loops.run(serve(settings, endpoints(settings)))
    except Fenced as exc:
        get_logger(__name__).error(
            "scheduler fenced: another scheduler leads now; exiting", error=str(exc),
            exit_code=FENCED_EXIT_CODE,
        )  # fmt: skip
        # Straight out: this process must do nothing more (its clients are closed), and
        # interpreter teardown must not turn the status into a generic failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FENCED_EXIT_CODE)


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

"""``tokenmill worker`` and ``tokenmill flower``; the workers ``tokenmill up`` starts.

Also runnable without the CLI: ``python -m tokenmill.workers.commands worker --model sim``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ..config.settings import Settings
    from ..stack.spec import ServiceSpec

__all__ = ["register", "worker_argv", "worker_services"]


def worker_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to serve (a [models] entry).")],
    pool: Annotated[
        str | None, typer.Option(help="Worker pool (Celery queue); default: the model's pool.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Task threads (slices in flight); default min(max_in_flight, 64) + interactive_headroom.")
    ] = None,
    visibility_timeout: Annotated[
        float, typer.Option(help="Seconds before an unacked message of a dead worker is redelivered "
                                 "(running workers renew theirs).", envvar="TOKENMILL_WORKER_VISIBILITY_TIMEOUT")
    ] = 60.0,
    lease_ttl: Annotated[
        float, typer.Option(help="Seconds a dead worker's request lease outlives it.")
    ] = 15.0,
    events: Annotated[str, typer.Option(help="Token events: kafka, or none.")] = "kafka",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a worker: one engine for MODEL, consuming its pool's Celery queue."""
    from ..config.settings import load_settings
    from ..logs import configure
    from .worker import WorkerOptions, run_worker

    settings = load_settings()
    configure(settings.log_level)
    code = run_worker(
        settings,
        WorkerOptions(
            model=model, pool=pool, concurrency=concurrency,
            visibility_timeout_s=visibility_timeout, lease_ttl_s=lease_ttl,
            loglevel=loglevel, events=events,
        ),
    )
    raise typer.Exit(code)


def flower_command(
    address: Annotated[
        str, typer.Option(help="Address to listen on; keep the loopback default unless behind a proxy.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    basic_auth: Annotated[
        str | None,
        typer.Option(
            envvar="TOKENMILL_FLOWER_BASIC_AUTH",
            help="user:password for the UI and API (prefer the environment variable to the "
            "option). Default: a password generated once into $TOKENMILL_HOME/flower/credentials.",
        ),
    ] = None,
    show_task_args: Annotated[
        bool,
        typer.Option(help="Show task arguments in Flower as task events carry them "
                          "(a slice's events carry only its size)."),
    ] = False,
) -> None:
    """Start Flower for tokenmill's Celery app: basic auth always, loopback by default."""
    from ..config.settings import load_settings
    from . import flower_auth
    from .celery_app import create_app
    from .worker import resolve_urls

    settings = load_settings()
    _, redis_url = resolve_urls(settings, need_kafka=False)
    credentials, source = flower_auth.resolve_credentials(basic_auth, settings.home)
    if os.environ.pop("FLOWER_UNAUTHENTICATED_API", None) is not None:
        print("flower: ignoring FLOWER_UNAUTHENTICATED_API (removed): the API always needs basic auth",
              file=sys.stderr)  # fmt: skip
    print(f"flower: {source}", file=sys.stderr, flush=True)
    flower_auth.install(show_task_args=show_task_args)
    args = ["flower", f"--address={address}", f"--port={port}", f"--basic-auth={credentials}"]
    create_app(redis_url).start(argv=args)


def register(app: typer.Typer) -> None:
    """Add ``worker`` and ``flower`` to the CLI; make ``tokenmill up`` start workers."""
    app.command("worker")(worker_command)
    app.command("flower")(flower_command)
    try:
        from ..stack import register_factory
    except ImportError:  # pragma: no cover
        return
    register_factory(worker_services)


def worker_argv(model: str, *extra: str) -> list[str]:
    """The command line of a worker process for ``model``."""
    return [sys.executable, "-m", "tokenmill.workers.commands", "worker", "--model", model, *extra]


def worker_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    """For ``tokenmill up``: a worker per simulated model, plus one per ``--model``."""
    from ..config.models import EngineKind
    from ..stack import ServiceSpec

    wanted = [m for m, c in settings.models.items() if c.engine is EngineKind.sim][:1]
    wanted += [m for m in models if m in settings.models and m not in wanted]
    specs = []
    for model in wanted:
        heavy = settings.models[model].engine is EngineKind.vllm
        specs.append(
            ServiceSpec(
                name=f"worker-{model}".lower(),
                argv=lambda launch, m=model: worker_argv(m),
                ready=lambda launch, m=model: _has_live_worker(launch.addresses, settings, m),
                depends_on=("kafka", "redis"),
                start_timeout_s=900.0 if heavy else 60.0,
                stop_timeout_s=60.0 if heavy else 20.0,
            )
        )
    return specs


def _has_live_worker(addresses: object, settings: Settings, model: str) -> bool:
    import redis

    from .heartbeat import live_workers

    url = addresses.get("redis") if hasattr(addresses, "get") else None  # type: ignore[union-attr]
    if not url:
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=1.0)
        beats = live_workers(client, settings.pool_of(model), timeout_s=3.0)
    except redis.RedisError:
        return False
    return any(model in b.models for b in beats)


def main() -> None:
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register_cli_only(cli)
    from ..errors import TokenmillError

    try:
        cli()
    except TokenmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def register_cli_only(app: typer.Typer) -> None:
    app.command("worker")(worker_command)
    app.command("flower")(flower_command)


if __name__ == "__main__":
    main()

"""``tokenmill gateway``: run the HTTP API; ``tokenmill up`` starts one on loopback."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from .. import runtime

if TYPE_CHECKING:
    from ..config.settings import Settings
    from ..stack.spec import ServiceSpec

GATEWAY = "gateway"


def gateway_command(
    host: Annotated[str | None, typer.Option(help="Address to bind (default: gateway.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: gateway.port, 8080).")] = None,
) -> None:
    """Run the OpenAI-compatible HTTP API, the one door tenants use."""
    import asyncio
    import socket

    import uvicorn

    from ..config.settings import load_settings
    from ..logs import configure
    from ..stack import endpoints
    from .app import create_app

    settings = load_settings()
    configure(settings.log_level)
    runtime.tune_gc()
    bind = host or settings.gateway.host
    port = settings.gateway.port if port is None else port
    # What `tokenmill status` shows for this copy: a wildcard bind is reached by name.
    shown = socket.gethostname() if bind in ("0.0.0.0", "::", "") else bind
    app = create_app(settings, endpoints(settings), address=f"http://{shown}:{port}")
    config = uvicorn.Config(
        app, host=bind, port=port,
        loop="uvloop", http="httptools", log_level="warning", access_log=False,
        server_header=False, timeout_graceful_shutdown=10,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Runs on the loop's thread, between two of its steps: answer every waiting
            # caller (503) before uvicorn closes the connections at its shutdown.
            backend = getattr(app.state, "backend", None)
            if backend is not None and not self.should_exit:
                asyncio.get_event_loop().call_soon_threadsafe(backend.stopping)
            super().handle_exit(sig, frame)

    Server(config).run()


def gateway_services(settings: Settings, models: Sequence[str]) -> list[ServiceSpec]:
    """For ``tokenmill up``: the gateway on loopback, on ``gateway.port`` (8080) when that
    is free — the address the README's examples use — else on any free port."""
    from ..stack import ServiceSpec, StopStage

    return [
        ServiceSpec(
            name=GATEWAY,
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "gateway", "--host", "127.0.0.1",
                                 "--port", str(launch.port)],
            address=lambda launch: f"http://127.0.0.1:{launch.port}",
            probe="http",
            ready=lambda launch: _ready(launch.port),
            preferred_port=settings.gateway.port or None,
            depends_on=("kafka", "redis"),
            stop_stage=StopStage.intake,
        )
    ]


def _ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def register(app: typer.Typer) -> None:
    from ..stack import register_factory

    app.command("gateway")(gateway_command)
    register_factory(gateway_services)

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
    from ..stack.spec import Launch, ServiceSpec

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

    chosen: dict[int, int] = {}  # launch.port → the port that launch listens on

    def port(launch: Launch) -> int:
        # Decided once per launch, when it starts — after a full restart stopped the old
        # gateway, so the configured port is free again. A restarted gateway keeps its
        # old port (launch.port), so its clients find it.
        if launch.port not in chosen:
            keep = launch.restart or not _free(settings.gateway.port)
            chosen[launch.port] = launch.port if keep else settings.gateway.port
        return chosen[launch.port]

    return [
        ServiceSpec(
            name=GATEWAY,
            argv=lambda launch: [sys.executable, "-m", "tokenmill", "gateway", "--host", "127.0.0.1",
                                 "--port", str(port(launch))],
            address=lambda launch: f"http://127.0.0.1:{port(launch)}",
            probe="http",
            ready=lambda launch: _ready(port(launch)),
            depends_on=("kafka", "redis"),
            stop_stage=StopStage.intake,
        )
    ]


def _free(port: int) -> bool:
    import socket

    if port == 0:
        return False
    with socket.socket() as s:
        # As uvicorn binds: connections of a gateway that just stopped linger in
        # TIME_WAIT on this port, and without SO_REUSEADDR they would make it look taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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

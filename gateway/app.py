"""The gateway's FastAPI application: :func:`create_app`.

Copies: run any number, on any ports and machines, sharing Kafka, Redis, the ledger and
the files directory: rate limits, request owners, results, cancels and the batch
runner's wake-up all live in Redis, ids are random, and files are written under unique
temporary names and renamed. Each copy announces itself as ``gateway`` with its address
(``tokenmill status``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from .. import presence, tokens
from ..config import Settings
from ..stack import Endpoints
from . import account, batches, completions, errors, files, ops, requests_api
from .backend import Backend
from .metrics import GatewayMetrics

__all__ = ["SERVICE", "create_app"]

#: the service name copies announce themselves under
SERVICE = "gateway"


def create_app(settings: Settings, ep: Endpoints, *, address: str | None = None) -> FastAPI:
    """The API for ``settings``' tenants, backed by the services at ``ep``.

    Parameters:
        address: the URL this copy serves on, for ``tokenmill status``; without it, the
            address the first request (the stack's readiness check) arrived on.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(tokens.load_counters, settings)  # exact counts from the start
        backend = app.state.backend = Backend(settings, ep)  # its clients belong to the server's loop
        await backend.start()
        quiet = asyncio.Event()
        announcing = asyncio.create_task(presence.run_presence(
            backend.redis, SERVICE, quiet, lambda: ("copy", {"address": app.state.address})))
        try:
            yield
        finally:
            quiet.set()
            await announcing
            await backend.close()

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.address = address
    app.state.registry = CollectorRegistry()
    errors.install(app)
    for module in (ops, completions, requests_api, account, files, batches):
        app.include_router(module.router)
    app.add_middleware(GatewayMetrics, registry=app.state.registry)
    if address is None:
        app.add_middleware(_LearnAddress)
    return app


class _LearnAddress:
    """Note the address the server answers on from the first request's ASGI scope
    (uvicorn knows its port only once bound, after the app is made)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("server"):
            state = scope["app"].state
            if state.address is None:
                host, port = scope["server"][:2]
                state.address = f"{scope.get('scheme', 'http')}://{host}:{port}"
        await self.app(scope, receive, send)

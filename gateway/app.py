"""The gateway's FastAPI application: :func:`create_app`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from .. import tokens
from ..config import Settings
from ..stack import Endpoints
from . import account, batches, completions, errors, files, ops, requests_api
from .backend import Backend
from .metrics import GatewayMetrics

__all__ = ["create_app"]


def create_app(settings: Settings, ep: Endpoints) -> FastAPI:
    """The API for ``settings``' tenants, backed by the services at ``ep``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(tokens.load_counters, settings)  # exact counts from the start
        app.state.backend = Backend(settings, ep)  # its clients belong to the server's loop
        await app.state.backend.start()
        try:
            yield
        finally:
            await app.state.backend.close()

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    errors.install(app)
    for module in (ops, completions, requests_api, account, files, batches):
        app.include_router(module.router)
    app.add_middleware(GatewayMetrics, registry=app.state.registry)
    return app

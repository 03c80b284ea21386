"""Prometheus metrics of the gateway: requests by route, status and tenant, and their
latency. Labels come only from bounded sets (route templates, configured tenants)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["GatewayMetrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    """An ASGI middleware that counts and times every HTTP request."""

    def __init__(self, app: Any, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "tokenmill_gateway_requests", "HTTP requests answered by the gateway",
            ("route", "method", "status", "tenant"), registry=registry,
        )
        self.latency = Histogram(
            "tokenmill_gateway_request_seconds", "Time to the end of the gateway's answer",
            ("route", "method"), buckets=_BUCKETS, registry=registry,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            tenant = scope.get("state", {}).get("tenant", "-")  # set by tenant_of
            method = scope.get("method", "")
            self.requests.labels(route, method, str(status[0]), tenant).inc()
            self.latency.labels(route, method).observe(time.perf_counter() - started)

"""``GET /v1/models``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import tenant_of
from .errors import ApiError

__all__ = ["router"]

router = APIRouter()


def _model(request: Request, name: str) -> dict[str, object]:
    settings = request.app.state.settings
    created = min(int(c.effective_from.timestamp()) for c in settings.price_cards if c.model == name)
    return {"id": name, "object": "model", "created": created, "owned_by": "tokenmill"}


@router.get("/v1/models")
async def list_models(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    names = sorted(request.app.state.settings.models)
    return JSONResponse({"object": "list", "data": [_model(request, n) for n in names]})


@router.get("/v1/models/{model}")
async def get_model(request: Request, model: str, tenant: str = Depends(tenant_of)) -> Response:
    if model not in request.app.state.settings.models:
        raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return JSONResponse(_model(request, model))


@router.get("/healthz")
async def healthz() -> Response:
    """The process answers."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Kafka, Redis and the ledger answer (503 naming what does not)."""
    checks = await request.app.state.backend.readiness()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics, for holders of a metrics key only (none configured: off)."""
    gw = request.app.state.settings.gateway
    if not gw.metrics_key_sha256:
        raise ApiError(403, "Metrics are off: set gateway.metrics_key_sha256 to read them.", code="metrics_off")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not gw.metrics_key_matches(key.strip()):
        raise ApiError(401, "A metrics key is needed (Authorization: Bearer KEY).", code="invalid_api_key")
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

"""Who is calling: ``Authorization: Bearer <key>`` checked against the stored key
digests (constant time, :meth:`~tokenmill.config.Settings.tenant_for_key`)."""

from __future__ import annotations

from fastapi import Request

from .errors import ApiError

__all__ = ["tenant_of"]

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


async def tenant_of(request: Request) -> str:
    """The tenant of the request's API key (a FastAPI dependency; async so that FastAPI
    does not hand it to a thread pool on every call).

    Raises:
        ApiError: 401 with no key, a malformed header, or a key of no tenant.
    """
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(401, _NO_KEY, code="missing_api_key")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, _NO_KEY, code="invalid_api_key")
    tenant = request.app.state.settings.tenant_for_key(key)
    if tenant is None:
        # Never echo the key: it may be another service's secret pasted by mistake.
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    request.state.tenant = tenant
    return tenant

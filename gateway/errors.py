"""OpenAI error bodies: ``{"error": {"message", "type", "param", "code"}}`` with the
status OpenAI gives, for every failure the gateway answers — ours, FastAPI's request
validation, Starlette's unknown route, and anything unexpected (logged, never shown)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LedgerError, NotFound, StackError, TokenmillError, ValidationError
from ..logs import get_logger
from ..producers.bodies import param_of
from ..stack.errors import ServiceUnavailable
from .backend import RateLimited

__all__ = ["ApiError", "install"]

log = get_logger(__name__)

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An answer other than success, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_OF_STATUS.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def invalid(cls, exc: ValidationError) -> ApiError:
        return cls(400, str(exc), param=exc.field, code="invalid_value" if exc.field else None)

    @classmethod
    def unavailable(cls, exc: ServiceUnavailable) -> ApiError:
        """503 naming the lost service, in words meant for the caller (``exc.detail``,
        with addresses and library errors, is for the logs only)."""
        return cls(503, f"{exc}.", code="service_unavailable", headers={"Retry-After": "1"})

    @classmethod
    def not_found(cls, what: str, ident: str, *, param: str | None = None) -> ApiError:
        # The same answer for an unknown id and another tenant's: ids leak nothing.
        return cls(404, f"No such {what}: '{ident}'", param=param, code=f"{what}_not_found")


def install(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ValidationError)
    async def _invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return ApiError.invalid(exc).response()

    @app.exception_handler(NotFound)
    async def _missing(_: Request, exc: NotFound) -> JSONResponse:
        return ApiError(404, str(exc), code="not_found").response()

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        param = param_of(loc) or None
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return ApiError(400, msg, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Unknown request URL" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(RateLimited)
    async def _limited(_: Request, exc: RateLimited) -> JSONResponse:
        return ApiError(429, "Rate limit reached for requests per minute.", code="rate_limit_exceeded",
                        headers={"Retry-After": str(int(exc.retry_after + 0.999))}).response()

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        log.warning("a service behind the gateway is unavailable", path=request.url.path,
                    service=exc.service, error=str(exc), detail=exc.detail)
        return ApiError.unavailable(exc).response()

    @app.exception_handler(StackError)
    @app.exception_handler(LedgerError)
    async def _stack(request: Request, exc: TokenmillError) -> JSONResponse:
        log.warning("a service behind the gateway failed", path=request.url.path, error=str(exc))
        return ApiError(503, "A service behind the API is unavailable; retry shortly.",
                        headers={"Retry-After": "1"}).response()

    @app.exception_handler(TokenmillError)
    async def _ours(request: Request, exc: TokenmillError) -> JSONResponse:
        log.error("request failed", path=request.url.path, error=repr(exc))
        return ApiError(500, "The server had an error while processing your request.").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", path=request.url.path)
        return ApiError(500, "The server had an error while processing your request.").response()

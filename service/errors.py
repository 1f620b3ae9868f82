"""Errors of the service's routes: `ClientError`, the JSON error bodies, and the app's exception handlers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import FlowerError, Kind
from service.telemetry import Metrics


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": {"kind", "message"}}."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers  # extra response headers, e.g. Retry-After or Connection: close


# The one table of how each kind of core.errors.FlowerError is answered over HTTP.
STATUS = {Kind.INVALID: 400, Kind.NOT_FOUND: 404, Kind.CONFLICT: 409, Kind.TOO_LARGE: 413, Kind.UNAVAILABLE: 503}


def client_error(err: FlowerError) -> ClientError:
    """A FlowerError as the ClientError its kind is answered with (the status from STATUS, its code as the kind)."""
    return ClientError(STATUS[err.kind], err.code, str(err))


def error_response(metrics: Metrics | None, status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error body, counted by kind."""
    if metrics is not None:
        metrics.error(kind)
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


def plain_error_response(metrics: Metrics | None, status: int, kind: str, message: str,
                         headers: dict[str, str] | None = None) -> JSONResponse:
    """The TF-Serving and Open Inference error body, {"error": message}, counted by kind."""
    if metrics is not None:
        metrics.error(kind)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _metrics_of(request: Request) -> Metrics | None:
    """The metrics registry of the app that received the request (None before the state exists)."""
    state = getattr(request.app.state, "service", None)
    return state.metrics if state is not None else None


async def _client_error(request: Request, err: ClientError) -> JSONResponse:
    """A ClientError raised by a route or dependency."""
    return error_response(_metrics_of(request), err.status, err.kind, err.message, err.headers)


async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's parameter validation, in the service's error shape."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return error_response(_metrics_of(request), 422, "invalid_request", problems or "invalid request")


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's 404/405 and other HTTP errors, in the service's error shape."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return error_response(_metrics_of(request), err.status_code, kind, str(err.detail), err.headers)


async def _server_error(request: Request, err: Exception) -> JSONResponse:
    """Anything unexpected: a 500 that names only the exception type."""
    return error_response(_metrics_of(request), 500, "internal", f"internal error: {type(err).__name__}")


async def _flower_error(request: Request, err: FlowerError) -> JSONResponse:
    """A FlowerError that reached a route: answered with its kind's status (STATUS)."""
    return await _client_error(request, client_error(err))


def register_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with {"error": {"kind", "message"}} and count it by kind."""
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(FlowerError, _flower_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

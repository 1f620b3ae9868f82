"""The FastAPI application: `create_app(settings)`; models are loaded in the lifespan, never at import.

    python -m service --ensemble demo/ensemble        # see service/cli.py
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batching import DynamicBatcher
from service.metrics import Metrics
from service.settings import Settings, get_settings


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": {"kind", "message"}}."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class ServiceState:
    """What the routes share: settings, the loaded ensemble, the batcher and the metrics."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    ensemble: Any = None
    batcher: DynamicBatcher | None = None
    warm_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """Models loaded and every member warmed up."""
        return self.ensemble is not None and self.ensemble.ready

    def run_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batch function: decoded images -> (blended probs, members' probs) per image."""
        blended, members = self.ensemble.predict(images)
        return [(blended[i], members[:, i]) for i in range(len(images))]


class RequestMetrics:
    """Pure ASGI middleware counting requests by method, route template and status, with latency.

    (A pure ASGI middleware costs a fraction of what @app.middleware("http") adds per request.)
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            scope["app"].state.service.metrics.request(scope["method"], route, status[0], time.perf_counter() - start)


def get_state(request: Request) -> ServiceState:
    """The application's shared state."""
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def error_response(state: ServiceState | None, status: int, kind: str, message: str) -> JSONResponse:
    """A JSON error body, counted by kind."""
    if state is not None:
        state.metrics.error(kind)
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status)


def load_models(settings: Settings) -> Any:
    """Load what the settings name: an ensemble directory or a single run directory."""
    from service.models import load_ensemble, load_run

    if bool(settings.ensemble) == bool(settings.run):
        raise ValueError("give exactly one of --ensemble or --run (FLOWER_ENSEMBLE / FLOWER_RUN)")
    return load_ensemble(settings.ensemble) if settings.ensemble else load_run(settings.run)


def create_app(settings: Settings | None = None, ensemble: Any = None) -> FastAPI:
    """Build the app. `ensemble` may be given already loaded (tests); else the lifespan loads it."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: ServiceState = app.state.service
        loop = asyncio.get_running_loop()
        state.ensemble = ensemble if ensemble is not None else await loop.run_in_executor(None, load_models, settings)
        state.batcher = DynamicBatcher(state.run_batch, settings.max_batch_size, settings.max_wait_ms,
                                       settings.batching, on_batch=state.metrics.batch)
        await state.batcher.start()
        state.warm_task = asyncio.create_task(_warm_up(state))
        yield
        state.warm_task.cancel()
        await state.batcher.stop()

    app = FastAPI(
        title="Flower ensemble classifier",
        version="1.0",
        description="Classifies photos with a blended ensemble of image classifiers. Send images to "
                    "`POST /v1/predict` as multipart field `files`, or use the TensorFlow-Serving-compatible "
                    "`POST /v1/models/{name}:predict` with base64 images.",
        lifespan=lifespan,
    )
    app.state.service = ServiceState(settings)

    app.add_middleware(RequestMetrics)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, err: ClientError):
        return error_response(request.app.state.service, err.status, err.kind, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return error_response(request.app.state.service, 422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(request.app.state.service, err.status_code, kind, str(err.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        return error_response(request.app.state.service, 500, "internal", f"internal error: {type(err).__name__}")

    from service.routes import ops, predict, tfserving

    app.include_router(predict.router)
    app.include_router(tfserving.router)
    app.include_router(ops.router)
    _document_model_name(app, settings.model_name)
    return app


def _document_model_name(app: FastAPI, model_name: str) -> None:
    """Say in the OpenAPI schema which model name the TensorFlow-Serving routes serve."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["name"] == "name" and parameter["in"] == "path":
                            parameter["schema"] = {"type": "string", "enum": [model_name], "example": model_name}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _warm_up(state: ServiceState) -> None:
    """Run a warm-up prediction for every member off the event loop; /readyz turns true after it."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, state.ensemble.warm_up)

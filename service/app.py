"""The FastAPI application: `create_app(settings)`; models are loaded in the lifespan, never at import.

    flower serve --ensemble demo/ensemble        # see service/serving.py
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ConfigError
from service.batching import DynamicBatcher
from service.deps import KeyGuard, ServiceState
from service.errors import register_error_handlers
from service.inference import batch_function
from service.limits import BodyGuard
from service.predictor import load_ensemble, load_run, load_version
from service.repository import ModelRepository, RepositoryError, Version, public_reason
from service.routes import ops, predict, tfserving, v2
from service.settings import Settings, get_settings
from service.telemetry import RequestMetrics

logger = logging.getLogger(__name__)

DESCRIPTION = ("Classifies photos with a blended ensemble of image classifiers. Send images to `POST /v1/predict` "
               "as multipart field `files`, or use the TensorFlow-Serving-compatible `POST /v1/models/{name}:predict` "
               "with base64 images.")


def load_models(settings: Settings) -> ModelRepository:
    """Load what the settings name, checked and warmed up: every version of a model repository (a version that
    fails is kept with its reason), or the one ensemble or run directory as version 1 (a failure raises)."""
    given = [name for name in ("ensemble", "run", "model_repository") if getattr(settings, name)]
    if len(given) != 1:
        raise ConfigError("give exactly one of --ensemble, --run or --model-repository (FLOWER_ENSEMBLE / FLOWER_RUN "
                          "/ FLOWER_MODEL_REPOSITORY)")
    loader = partial(load_version, tta=settings.tta, runtime=settings.runtime)
    if settings.model_repository:
        repository = ModelRepository(Path(settings.model_repository), loader, _unstarted)
        repository.preload()
        return repository
    load = partial(load_ensemble, settings.ensemble) if settings.ensemble else partial(load_run, settings.run)
    predictor = load(tta=settings.tta, runtime=settings.runtime)
    repository = ModelRepository(None, loader, _unstarted)
    repository.add(settings.model_name, 1, Path(settings.ensemble or settings.run), predictor)
    return repository


def _unstarted(predictor: Any) -> None:
    """The batcher factory until the app's own is set (the app makes every batcher on its event loop)."""
    raise RuntimeError("the repository's batchers are made by the app")


def create_app(settings: Settings | None = None, ensemble: Any = None,
               repository: ModelRepository | None = None) -> FastAPI:
    """Build the app. The models may come loaded: a repository (the command line), or one predictor (tests,
    warmed up in the background); else the lifespan loads them off the event loop."""
    settings = settings or get_settings()
    handed = []  # a predictor handed in is warmed up (again) in the background: /readyz waits for it
    if ensemble is not None:
        repository = ModelRepository(None, partial(load_version, tta=settings.tta, runtime=settings.runtime),
                                     _unstarted)
        handed.append(repository.add(settings.model_name, 1, Path(settings.ensemble or settings.run or "."),
                                     ensemble))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.service
        loop = asyncio.get_running_loop()
        state.repository = repository or await loop.run_in_executor(None, load_models, settings)
        state.repository.make_batcher = partial(_make_batcher, state)
        state.repository.on_change = partial(_note_change, state)
        for versions in state.repository.models.values():  # the versions loaded before the metrics were wired
            for version in versions.values():
                _note_change(state, version.model, version.number, "failed" if version.error else "loaded",
                             version.error)
        await state.repository.start()
        state.warm_task = asyncio.create_task(warm_up(handed))
        if state.repository.root is not None and settings.poll_seconds > 0:
            state.poll_task = asyncio.create_task(poll_forever(state))
        yield
        for task in (state.warm_task, state.poll_task):
            if task is not None:
                task.cancel()
        await state.repository.close()
        state.metrics.close()

    app = FastAPI(title="Flower ensemble classifier", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = ServiceState(settings)
    app.add_middleware(BodyGuard)  # body size and deadline, inside the metrics so that its answers are counted
    app.add_middleware(KeyGuard)  # protect 'all': the API key before anything else is read
    app.add_middleware(RequestMetrics)
    app.add_middleware(HeadAsGet)
    register_error_handlers(app)
    for router in (predict.router, tfserving.router, v2.router, ops.router):
        app.include_router(router)
    if not settings.model_repository:
        _document_model_name(app, settings.model_name)
    return app


class HeadAsGet:
    """Pure ASGI middleware: HEAD is answered wherever GET is, as GET without the body (HTTP's HEAD).

    The routes see GET; the method is HEAD again before the answer starts, so the server (and the metrics) see
    the request as it came, and the server sends the headers alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a HEAD request on as GET; send its answer's headers, never its body."""
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            scope["method"] = "HEAD"
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        scope["method"] = "GET"  # the same scope object the server holds: it is set back before anything is sent
        try:
            await self.app(scope, receive, send_headers_only)
        finally:
            scope["method"] = "HEAD"


def _make_batcher(state: ServiceState, predictor: Any) -> DynamicBatcher:
    """A version's batcher (started by the repository), and its members' timings into the metrics."""
    settings = state.settings
    if hasattr(predictor, "on_member"):  # the predictor reports each member's inference time
        predictor.on_member = state.metrics.member
    return DynamicBatcher(batch_function(predictor), settings.max_batch_size, settings.max_wait_ms,
                          settings.batching, max_queue=settings.max_queue, timeout_ms=settings.request_timeout_ms,
                          metrics=state.metrics)


def _note_change(state: ServiceState, model: str, version: int, outcome: str, error: str | None) -> None:
    """Count a version's load, failure or unload in the metrics."""
    if outcome == "unloaded":
        state.metrics.model_unload(model, str(version))
    else:
        state.metrics.model_load(model, str(version), outcome)


async def poll_forever(state: ServiceState) -> None:
    """Check the repository every --poll-seconds for new, changed and removed versions (hot reload)."""
    said = None
    while True:
        await asyncio.sleep(state.settings.poll_seconds)
        try:
            await state.repository.poll()
            said = None
        except RepositoryError as err:  # the folder vanished: said once, until it is back
            if str(err) != said:
                logger.error("%s; the versions loaded keep serving", err)
            said = str(err)
        except Exception:  # noqa: BLE001 - any other failure of a poll is logged; serving goes on
            logger.exception("checking the model repository failed; the versions loaded keep serving")


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


async def warm_up(versions: list[Version]) -> None:
    """Run a warm-up prediction off the event loop for each version handed in loaded (the repository's own are
    warmed up as they load); /readyz turns true after it. A failure is logged with its traceback and becomes
    the version's error, which /readyz and the status routes report."""
    loop = asyncio.get_running_loop()
    for version in versions:
        try:
            await loop.run_in_executor(None, version.predictor.warm_up)
        except Exception as err:  # noqa: BLE001 - any failure leaves the version unready; say why
            version.detail = f"the warm-up prediction failed: {type(err).__name__}: {err}"
            version.error = public_reason(version.detail, version.path)
            version.error_kind = "warm_up_failed"
            logger.exception("the warm-up prediction failed; the service stays unready (/readyz answers 503)")

"""The FastAPI application: `create_app(settings)`; models are loaded in the lifespan, never at import.

    flower serve --ensemble demo/ensemble        # see service/cli.py
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.batching import DynamicBatcher
from service.deps import ServiceState
from service.errors import register_error_handlers
from service.limits import BodyGuard
from service.predictor import EnsemblePredictor, load_ensemble, load_run
from service.routes import ops, predict, tfserving
from service.settings import Settings, get_settings
from service.telemetry import RequestMetrics

logger = logging.getLogger(__name__)

DESCRIPTION = ("Classifies photos with a blended ensemble of image classifiers. Send images to `POST /v1/predict` "
               "as multipart field `files`, or use the TensorFlow-Serving-compatible `POST /v1/models/{name}:predict` "
               "with base64 images.")


def load_models(settings: Settings) -> EnsemblePredictor:
    """Load what the settings name: an ensemble directory or a single run directory."""
    if bool(settings.ensemble) == bool(settings.run):
        raise ValueError("give exactly one of --ensemble or --run (FLOWER_ENSEMBLE / FLOWER_RUN)")
    return load_ensemble(settings.ensemble) if settings.ensemble else load_run(settings.run)


def create_app(settings: Settings | None = None, ensemble: Any = None) -> FastAPI:
    """Build the app. `ensemble` may be given already loaded (tests); else the lifespan loads it."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.service
        loop = asyncio.get_running_loop()
        state.ensemble = ensemble if ensemble is not None else await loop.run_in_executor(None, load_models, settings)
        state.batcher = DynamicBatcher(state.run_batch, settings.max_batch_size, settings.max_wait_ms,
                                       settings.batching, on_batch=state.metrics.batch)
        await state.batcher.start()
        state.warm_task = asyncio.create_task(warm_up(state))
        yield
        state.warm_task.cancel()
        await state.batcher.stop()

    app = FastAPI(title="Flower ensemble classifier", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = ServiceState(settings)
    app.add_middleware(BodyGuard)  # body size and deadline, inside the metrics so that its answers are counted
    app.add_middleware(RequestMetrics)
    register_error_handlers(app)
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


async def warm_up(state: ServiceState) -> None:
    """Run a warm-up prediction for every member off the event loop; /readyz turns true after it.

    A failure is logged with its traceback and kept in `state.warm_up_error`, which /readyz reports.
    """
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, state.ensemble.warm_up)
    except Exception as err:  # noqa: BLE001 - any failure leaves the service unready; say why
        state.warm_up_error = f"{type(err).__name__}: {err}"
        logger.exception("the warm-up prediction failed; the service stays unready (/readyz answers 503)")

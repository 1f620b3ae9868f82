"""What the routes depend on: the shared `ServiceState` (`StateDep`) and the optional API key check (a dependency of
the prediction routes, and `KeyGuard` in front of every route under protect 'all')."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.batching import DynamicBatcher
from service.errors import ClientError, client_error, error_response
from service.inference import InferencePath
from service.limits import PixelBudget
from service.repository import ModelRepository, NotServed, Version
from service.settings import Settings
from service.telemetry import Metrics


@dataclass
class ServiceState:
    """What the routes share: settings, the model repository (every served model and version) and the metrics.

    `ensemble`, `batcher` and `warm_up_error` are those of the default model's version: the latest available
    one (or, before any is, the first loaded); the routes that name a model or version use `use(...)`.
    """

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    repository: ModelRepository | None = None
    warm_task: asyncio.Task | None = None
    poll_task: asyncio.Task | None = None
    pixels: PixelBudget = field(init=False)  # decoded pixels held by the requests in flight

    def __post_init__(self) -> None:
        self.pixels = PixelBudget(self.settings.max_inflight_pixels)

    @property
    def default_model(self) -> str:
        """The model a request that names none gets: the model name setting, or the repository's only model."""
        names = self.repository.names if self.repository is not None else []
        if self.settings.model_name in names or len(names) != 1:
            return self.settings.model_name
        return names[0]

    def default_version(self) -> Version | None:
        """The default model's latest available version, else its first version (loading or failed), else None."""
        if self.repository is None:
            return None
        latest = self.repository.latest(self.default_model)
        versions = self.repository.models.get(self.default_model, {})
        return latest or (versions[min(versions)] if versions else None)

    @property
    def ensemble(self) -> Any:
        """The default version's predictor (service/predictor.py, or a stand-in with the same methods)."""
        version = self.default_version()
        return version.predictor if version is not None else None

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The default version's batcher."""
        version = self.default_version()
        return version.batcher if version is not None else None

    @property
    def warm_up_error(self) -> str | None:
        """Why the default version cannot serve ("ExceptionType: message"), else None."""
        version = self.default_version()
        return version.error if version is not None else None

    @property
    def ready(self) -> bool:
        """Every model has an available version: loaded and warmed up."""
        return self.repository is not None and self.repository.ready

    @property
    def decode_target(self) -> int:
        """The default version's largest member input size (huge images are reduced to no less than twice it)."""
        return decode_target(self.ensemble)

    @contextmanager
    def use(self, name: str | None = None, version: int | str | None = None,
            label: str | None = None) -> Iterator[Version]:
        """The version a request is for, held while the request uses it (a swap or unload waits for it).

        Raises ClientError 404 (unknown model, version or label) or 503 (none available, or it failed to load)."""
        if self.repository is None:
            raise ClientError(503, "not_ready", "the models are still loading")
        try:
            chosen = self.repository.resolve(name or self.default_model, version, label)
        except NotServed as err:
            raise client_error(err) from None
        chosen.enter()
        try:
            yield chosen
        finally:
            chosen.leave()

    def inference(self, served: Version) -> InferencePath:
        """The inference path of a version: its batcher, within this server's decoding limits and pixel budgets."""
        settings = self.settings
        return InferencePath(served.batcher.submit_many, settings.max_pixels, decode_target(served.predictor),
                             settings.downscale_pixels, settings.max_request_pixels, self.pixels, logged=True)


def decode_target(predictor: Any) -> int:
    """A predictor's largest member input size (0: never reduce)."""
    sizes = [getattr(m, "image_size", 0) for m in predictor.members] if predictor is not None else []
    return max(sizes, default=0)


async def get_state(request: Request) -> ServiceState:
    """The application's shared state. A coroutine: FastAPI runs a plain function dependency in its thread pool,
    a hand-off to a thread and back on every request (docs/BENCHMARKS.md, "Fixed cost per request")."""
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


UNAUTHORIZED = "this route needs the header 'Authorization: Bearer <API key>'"
CHALLENGE = {"www-authenticate": "Bearer"}
OPEN_ROUTES = ("/healthz", "/readyz")  # answered without the key under protect 'all' (load balancers' probes)


def authorized(headers: Headers, settings: Settings) -> bool:
    """No API key is set, or the request carries it as 'Authorization: Bearer <key>'."""
    if not settings.api_key:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())


async def require_api_key(request: Request) -> None:
    """When an API key is set, demand 'Authorization: Bearer <key>' (a coroutine, as get_state)."""
    if not authorized(request.headers, request.app.state.service.settings):
        raise ClientError(401, "unauthorized", UNAUTHORIZED, CHALLENGE)


class KeyGuard:
    """Pure ASGI middleware: under protect 'all', every request but those to OPEN_ROUTES needs the API key (the
    OpenAPI page and schema, /metrics, status and metadata too, and paths that match no route)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 401 at once to a request without the key that protect 'all' covers; pass the others on."""
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            state: ServiceState = scope["app"].state.service
            if state.settings.protect == "all" and not authorized(Headers(scope=scope), state.settings):
                response = error_response(state.metrics, 401, "unauthorized", UNAUTHORIZED, CHALLENGE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

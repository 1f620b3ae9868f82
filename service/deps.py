"""What the routes depend on: the shared `ServiceState` (`StateDep`) and the optional API key check."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from service.batching import DynamicBatcher
from service.errors import ClientError
from service.limits import PixelBudget
from service.settings import Settings
from service.telemetry import Metrics


@dataclass
class ServiceState:
    """What the routes share: settings, the loaded ensemble, the batcher and the metrics."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    ensemble: Any = None  # an EnsemblePredictor (service/predictor.py) or a stand-in with the same methods
    batcher: DynamicBatcher | None = None
    warm_task: asyncio.Task | None = None
    warm_up_error: str | None = None  # "ExceptionType: message" when the warm-up failed
    pixels: PixelBudget = field(init=False)  # decoded pixels held by the requests in flight

    def __post_init__(self) -> None:
        self.pixels = PixelBudget(self.settings.max_inflight_pixels)

    @property
    def ready(self) -> bool:
        """Models loaded and every member warmed up."""
        return self.ensemble is not None and self.ensemble.ready

    @property
    def decode_target(self) -> int:
        """The largest member's input size: huge images are reduced to no less than this (0: never reduce)."""
        sizes = [getattr(m, "image_size", 0) for m in self.ensemble.members] if self.ensemble is not None else []
        return max(sizes, default=0)

    def run_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batch function: decoded images -> (blended probs, members' probs) per image."""
        blended, members = self.ensemble.predict(images)
        return [(blended[i], members[:, i]) for i in range(len(images))]


def get_state(request: Request) -> ServiceState:
    """The application's shared state."""
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def require_api_key(request: Request) -> None:
    """When an API key is set, demand 'Authorization: Bearer <key>'."""
    key = request.app.state.service.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ClientError(401, "unauthorized", "this route needs the header 'Authorization: Bearer <API key>'")

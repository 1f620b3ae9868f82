"""Service settings: command-line flags, or environment variables prefixed FLOWER_ (e.g. FLOWER_API_KEY)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.photos import DEFAULT_MAX_PIXELS
from core.runtimes import AUTO, CHOICES
from service.repository import model_name_problem


class Settings(BaseSettings):
    """Everything the service can be told."""

    model_config = SettingsConfigDict(env_prefix="FLOWER_")

    ensemble: str | None = Field(None, description="ensemble directory or ensemble.json to serve")
    run: str | None = Field(None, description="a single run directory to serve (instead of an ensemble)")
    model_repository: str | None = Field(None, description="a model repository to serve instead: "
                                         "DIR/<model name>/<version number>/ (each an ensemble or run directory)")
    poll_seconds: float = Field(10.0, ge=0, le=86400, description="how often the model repository is checked for "
                                "new, changed and removed versions (0: only at start)")
    model_name: str = Field("flowers", description="the model's name in the routes for --ensemble/--run; with a "
                            "repository, the model that requests naming none get (when there are several)")
    tta: int = Field(1, ge=1, le=32, description="test-time augmentation passes per image and member (1: none); "
                     "the offline predictions' passes, which the blend weights were learned on")
    runtime: Literal[CHOICES] = Field(AUTO, description="what runs each member's pixel model: 'auto' (the fastest "
                                      "converted one, litert then onnx, whose warm-up answers match TensorFlow's "
                                      "within 1e-4; else TensorFlow, saying why), 'tensorflow' (the SavedModel), or "
                                      "'litert' / 'onnx' (refused at load, naming the reason, when unusable)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads the models)")
    batching: bool = Field(True, description="gather concurrent requests into one batch per model call")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long a batch waits for more images "
                               "(0: greedy, take what is queued when the model is free)")
    max_queue: int = Field(256, ge=1, description="most images waiting for the model (with --no-batching: being "
                           "served); a request that would pass it answers 503 'overloaded' with Retry-After at once")
    request_timeout_ms: float = Field(30_000.0, ge=0, description="a request's deadline from queueing its decoded "
                                      "images until the model answers them (0: none); later it answers 504 "
                                      "'timeout' and its images still waiting are dropped")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1,
                            description="largest accepted width x height (decompression bombs)")
    max_images: int = Field(16, ge=1, description="most images in one request")
    max_request_pixels: int = Field(100_000_000, ge=1, description="most decoded pixels in one request, all its "
                                    "images together (about 3 bytes each while it is served); more answers 413")
    max_inflight_pixels: int = Field(200_000_000, ge=1, description="most decoded pixels of all requests being "
                                     "served at once; a request that would exceed it answers 503 with Retry-After")
    downscale_pixels: int = Field(4_000_000, ge=1, description="images of more pixels are reduced while decoding "
                                  "(JPEG: DCT scaling; others: right after) to no less than the largest member's "
                                  "input size; smaller ones decode exactly as in training")
    body_timeout: float = Field(60.0, gt=0, description="seconds a client has to send a request's whole body; "
                                "a slower upload is answered 408")
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    limit_concurrency: int = Field(128, ge=1, description="most connections and requests at once; more are "
                                   "answered 503 by uvicorn")
    default_top_k: int = Field(5, ge=1)
    api_key: str | None = Field(None, description="when set, the routes --protect names need 'Authorization: Bearer "
                                "<key>'")
    protect: Literal["predict", "all"] = Field("predict", description="what the API key protects: 'predict', the "
                                               "prediction routes; 'all', every route but /healthz and /readyz "
                                               "(status, metadata, /metrics, /docs, the page)")

    @field_validator("protect")
    @classmethod
    def _key_to_protect_with(cls, protect: str, info: ValidationInfo) -> str:
        """Protecting every route needs a key (a field before this one): without one nothing would be protected."""
        if protect == "all" and info.data.get("api_key") is None and "api_key" in info.data:
            raise ValueError("'all' needs an API key (--api-key or FLOWER_API_KEY); without one no route is "
                             "protected")
        return protect

    @field_validator("model_name")
    @classmethod
    def _routable_name(cls, name: str) -> str:
        """A model name the routes can carry (the model repository's rule for its folders)."""
        problem = model_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: str | None) -> str | None:
        """A key a client can send: surrounding whitespace (a secret file's last newline) is dropped; an empty key,
        one that is not printable ASCII (an HTTP header cannot carry it as typed) or holds a space is refused."""
        if key is None:
            return None
        key = key.strip()
        if not key:
            raise ValueError("the API key is empty (or only whitespace)")
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError("the API key must be printable ASCII without spaces: a client sends it in the header "
                             "'Authorization: Bearer <key>', which cannot carry other characters as typed")
        return key

    @model_validator(mode="after")
    def _budgets_agree(self) -> Settings:
        """A request may not need more pixels than all requests together may hold."""
        if self.max_request_pixels > self.max_inflight_pixels:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels}) must not exceed max_inflight_pixels "
                             f"({self.max_inflight_pixels}), or such a request could never be served")
        return self

    def body_limit(self, path: str) -> int:
        """The most bytes a request body to `path` may have: the images' bytes, base64 on the TF-Serving routes,
        plus room for the multipart headers, the form fields or the JSON around them."""
        images = self.max_images * self.max_image_bytes
        if path.endswith(":predict") or path.endswith("/infer"):  # base64 in JSON (or binary tensors)
            return images * 4 // 3 + 64 * 1024
        return images + 64 * 1024


@lru_cache
def get_settings() -> Settings:
    """The settings read from the environment (overridable in tests)."""
    return Settings()

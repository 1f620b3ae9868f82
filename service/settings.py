"""Service settings: command-line flags, or environment variables prefixed FLOWER_ (e.g. FLOWER_API_KEY)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service can be told."""

    model_config = SettingsConfigDict(env_prefix="FLOWER_")

    ensemble: str | None = Field(None, description="ensemble directory or ensemble.json to serve")
    run: str | None = Field(None, description="a single run directory to serve (instead of an ensemble)")
    model_name: str = Field("flowers", description="name of the model in the TensorFlow-Serving routes")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads the models)")
    batching: bool = Field(True, description="gather concurrent requests into one batch per model call")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long a batch waits for more images "
                               "(0: greedy, take what is queued when the model is free)")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted width x height (decompression bombs)")
    max_images: int = Field(16, ge=1, description="most images in one request")
    default_top_k: int = Field(5, ge=1)
    api_key: str | None = Field(None, description="when set, prediction routes need 'Authorization: Bearer <key>'")


@lru_cache
def get_settings() -> Settings:
    """The settings read from the environment (overridable in tests)."""
    return Settings()

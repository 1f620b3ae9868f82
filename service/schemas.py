"""Response schemas of the service's own routes (the TensorFlow-Serving routes use that API's shapes)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong: a stable kind and a sentence for people."""

    kind: str = Field(examples=["not_an_image"])
    message: str = Field(examples=["the data is not an image in a supported format (JPEG, PNG, GIF, BMP, WebP)"])


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer of the service's own routes."""

    error: ErrorDetail


class ClassScore(BaseModel):
    """One class and its blended probability."""

    index: int = Field(examples=[48])
    name: str = Field(examples=["daisy"])
    probability: float = Field(examples=[0.93])


class MemberVote(BaseModel):
    """A member's own top class for the image."""

    member: str = Field(examples=["effnet-b7-ns-512"])
    index: int = Field(examples=[48])
    name: str = Field(examples=["daisy"])
    probability: float = Field(examples=[0.91])


class ImageResult(BaseModel):
    """The answer for one uploaded image: its top classes, or the error that stopped it."""

    filename: str | None = Field(None, examples=["daisy.jpg"])
    ok: bool = True
    top: list[ClassScore] = Field(default_factory=list)
    probabilities: list[float] | None = Field(None, description="blended probabilities of every class, on request")
    members: list[MemberVote] | None = Field(None, description="each member's top class, on request")
    error: ErrorDetail | None = None


class PredictResponse(BaseModel):
    """One result per uploaded image, in upload order."""

    model: str = Field(examples=["flowers"])
    version: int = Field(1, examples=[1], description="the model version that answered")
    classes: int = Field(examples=[104])
    results: list[ImageResult]

    model_config = {
        "json_schema_extra": {
            "examples": [{
                "model": "flowers", "classes": 104,
                "results": [{"filename": "daisy.jpg", "ok": True,
                             "top": [{"index": 48, "name": "daisy", "probability": 0.93},
                                     {"index": 49, "name": "common dandelion", "probability": 0.03}]}],
            }]
        }
    }


class HealthResponse(BaseModel):
    """Liveness."""

    status: str = Field(examples=["ok"])


class ReadyResponse(BaseModel):
    """Readiness: models loaded and warmed up."""

    ready: bool
    members: list[str]
    warmed_up: list[str]
    error: str | None = Field(None, description="why the service is not ready, when the warm-up failed",
                              examples=["RuntimeError: the SavedModel cannot run on this device"])
    models: dict[str, dict[str, str]] = Field(default_factory=dict, description="every model's versions and their "
                                              "state (AVAILABLE, LOADING, END)",
                                              examples=[{"flowers": {"1": "AVAILABLE", "2": "END"}}])
    default_model: str = Field("", description="the model a request that names none gets (the page shows it first)",
                               examples=["flowers"])

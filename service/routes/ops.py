"""Operations routes: liveness, readiness, Prometheus metrics, and the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from service.deps import StateDep, authorized
from service.schemas import HealthResponse, ReadyResponse
from service.telemetry import CONTENT_TYPE

router = APIRouter(tags=["operations"])
PAGE = (Path(__file__).resolve().parents[1] / "page.html").read_text()


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """Answers as long as the process serves requests."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, summary="Readiness")
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    """200 once every model has a version loaded and warmed up, else 503 (with the default model's error, when it
    failed); `members` are the default model's, `models` every model's versions and their states. Under protect
    'all', a request without the API key gets `ready` alone."""
    ready = state.ready
    status = 200 if ready else 503
    if state.settings.protect == "all" and not authorized(request.headers, state.settings):
        return JSONResponse({"ready": ready}, status_code=status)
    members = [m.name for m in state.ensemble.members] if state.ensemble is not None else []
    warmed = sorted(getattr(state.ensemble, "warmed_up", members)) if state.ensemble is not None else []
    models = {name: {str(n): v.state for n, v in sorted(versions.items())}
              for name, versions in (state.repository.models.items() if state.repository is not None else [])}
    error = state.warm_up_error or _problems(state)
    body = ReadyResponse(ready=ready, members=members, warmed_up=warmed, error=error, models=models,
                         default_model=state.default_model)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def _problems(state) -> str | None:
    """The repository's failed versions and unreadable labels files, one clause each, else None."""
    problems = state.repository.problems() if state.repository is not None else []
    return "; ".join(problems) or None


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(state: StateDep) -> PlainTextResponse:
    """Requests, latencies, batches, queue, refusals and errors by kind, in Prometheus text format (every
    worker's, added up, under --workers N)."""
    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse, summary="Web page", include_in_schema=True)
async def page() -> HTMLResponse:
    """A page to drop or pick a photo and see the top classes as bars, with the members' votes."""
    return HTMLResponse(PAGE)

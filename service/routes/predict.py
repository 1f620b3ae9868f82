"""POST /v1/predict: one or more images as multipart field `files`; top classes per image."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.deps import ServiceState, StateDep, require_api_key
from service.errors import ClientError
from service.images import ImageError, decode_image
from service.schemas import ClassScore, ErrorDetail, ErrorResponse, ImageResult, MemberVote, PredictResponse

router = APIRouter(tags=["predict"])
INLINE_DECODE_BYTES = 48 * 1024  # about a 300 px JPEG: well under a millisecond to decode
FORM_FIELDS = {"files", "top_k", "include_probabilities", "include_members"}

MULTIPART_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["files"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "one or more images (JPEG, PNG, GIF, BMP, WebP), each as a part named 'files'"},
            "top_k": {"type": "integer", "minimum": 1, "description": "how many top classes per image (default 5)"},
            "include_probabilities": {"type": "boolean", "description": "also return every class's probability"},
            "include_members": {"type": "boolean", "description": "also return each member's top class"},
        },
    }}},
}
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "malformed request, no files, too many images, wrong field names"),
    (401, "missing or wrong API key"), (413, "request larger than the limits"),
    (415, "not multipart/form-data"), (422, "an option out of range"),
    (503, "models not loaded yet, or their warm-up failed"))}


def _flag(value: object, name: str) -> bool:
    """Parse a boolean form field."""
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ClientError(422, "invalid_option", f"{name} must be true or false, got {value!r}")


def _top_k(value: object, default: int, classes: int) -> int:
    """Parse and range-check top_k."""
    if value is None:
        return min(default, classes)
    try:
        k = int(str(value))
    except ValueError:
        raise ClientError(422, "invalid_option", f"top_k must be an integer, got {value!r}") from None
    if not 1 <= k <= classes:
        raise ClientError(422, "invalid_option", f"top_k must be between 1 and {classes}, got {k}")
    return k


async def _read_form(request: Request, state: ServiceState) -> tuple[list[UploadFile], dict]:
    """Parse the multipart body within the configured limits."""
    settings = state.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ClientError(415, "unsupported_media_type", "send images as multipart/form-data with field 'files'")
    limit = settings.max_images * settings.max_image_bytes + 64 * 1024
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ClientError(413, "request_too_large", f"the request has {length} bytes, more than the limit of {limit}")
    try:
        form = await request.form(max_files=settings.max_images + 1, max_fields=len(FORM_FIELDS) + 4)
    except (MultiPartException, HTTPException) as err:  # Starlette re-raises parser errors as HTTP 400
        message = getattr(err, "message", None) or str(getattr(err, "detail", err))
        if "Too many files" in message:
            raise ClientError(400, "too_many_images", f"more than {settings.max_images} images in one request") \
                from None
        raise ClientError(400, "malformed_multipart", f"the multipart body cannot be read: {message}") from None
    except Exception as err:  # noqa: BLE001 - any other parser failure is the client's malformed body
        raise ClientError(400, "malformed_multipart", f"the multipart body cannot be read: {err}") from None
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ClientError(400, "unknown_field", f"unknown form field(s) {unknown}; images go in field 'files', "
                                                f"options are {sorted(FORM_FIELDS - {'files'})}")
    files = form.getlist("files")
    if not files:
        raise ClientError(400, "no_files", "no images: send one or more files in the multipart field 'files'")
    if any(not isinstance(f, UploadFile) for f in files):
        raise ClientError(400, "not_a_file", "field 'files' must hold file uploads, not text values")
    if len(files) > settings.max_images:
        raise ClientError(400, "too_many_images",
                          f"{len(files)} images in one request; the limit is {settings.max_images}")
    options = {k: form.get(k) for k in FORM_FIELDS - {"files"}}
    if any(isinstance(v, UploadFile) for v in options.values()):
        raise ClientError(400, "unknown_field", "only field 'files' may hold files")
    return files, options


def _unready(state: ServiceState) -> ClientError:
    """The 503 while not ready: the warm-up's error once it failed, else 'still loading'."""
    if state.warm_up_error:
        return ClientError(503, "warm_up_failed", f"the warm-up prediction failed, so the service cannot predict "
                                                  f"(see /readyz and the server log): {state.warm_up_error}")
    return ClientError(503, "not_ready", "the models are still loading or warming up; retry shortly")


async def decode_uploads(files: list[UploadFile], state: ServiceState) -> list[np.ndarray | ImageError]:
    """Read and decode every upload off the event loop; a bad one becomes its own ImageError."""
    loop = asyncio.get_running_loop()
    settings = state.settings
    decoded: list[np.ndarray | ImageError] = []
    for upload in files:
        data = await upload.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            decoded.append(ImageError("too_large", f"the image is larger than the limit of "
                                                   f"{settings.max_image_bytes} bytes"))
            continue
        try:
            if len(data) <= INLINE_DECODE_BYTES:  # a small file decodes faster than a thread hand-off
                decoded.append(decode_image(data, settings.max_pixels))
            else:
                decoded.append(await loop.run_in_executor(None, decode_image, data, settings.max_pixels))
        except ImageError as err:
            decoded.append(err)
    return decoded


@router.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
             dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": MULTIPART_BODY}, summary="Classify one or more images")
async def predict(request: Request, state: StateDep) -> PredictResponse:
    """Top-k classes per image with blended probabilities; one bad image fails only its own entry."""
    if not state.ready:
        raise _unready(state)
    files, options = await _read_form(request, state)
    classes = state.ensemble.classes
    k = _top_k(options["top_k"] or request.query_params.get("top_k"), state.settings.default_top_k, len(classes))
    with_probs = _flag(options["include_probabilities"] or request.query_params.get("include_probabilities"),
                       "include_probabilities")
    with_members = _flag(options["include_members"] or request.query_params.get("include_members"),
                         "include_members")
    decoded = await decode_uploads(files, state)
    good = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
    outputs = await state.batcher.submit_many([decoded[i] for i in good])
    by_index = dict(zip(good, outputs, strict=True))
    results = []
    for i, upload in enumerate(files):
        if i not in by_index:
            state.metrics.error(decoded[i].kind)
            results.append(ImageResult(filename=upload.filename, ok=False,
                                       error=ErrorDetail(kind=decoded[i].kind, message=decoded[i].message)))
            continue
        blended, members = by_index[i]
        order = np.argsort(-blended)[:k]
        result = ImageResult(filename=upload.filename,
                             top=[ClassScore(index=int(c), name=classes[c], probability=float(blended[c]))
                                  for c in order])
        if with_probs:
            result.probabilities = [float(p) for p in blended]
        if with_members:
            result.members = [MemberVote(member=m.name, index=int(p.argmax()), name=classes[int(p.argmax())],
                                         probability=float(p.max()))
                              for m, p in zip(state.ensemble.members, members, strict=True)]
        results.append(result)
    return PredictResponse(model=state.settings.model_name, classes=len(classes), results=results)

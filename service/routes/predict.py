"""POST /v1/predict: one or more images as multipart field `files`; top classes per image."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.deps import ServiceState, StateDep, require_api_key
from service.errors import ClientError
from service.images import ImageError
from service.inference import EncodedImage, Prediction
from service.repository import Version
from service.schemas import ClassScore, ErrorDetail, ErrorResponse, ImageResult, MemberVote, PredictResponse

logger = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])
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
    (401, "missing or wrong API key"), (408, "the body did not arrive within --body-timeout"),
    (413, "request larger than the limits: bytes, or decoded pixels of all its images"),
    (415, "not multipart/form-data"), (422, "an option out of range"),
    (503, "models not loaded yet, their warm-up failed, the server is decoding too many pixels, or it could not "
          "spool an upload to its temporary folder (Retry-After)"))}


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


class _Parser(MultiPartParser):
    """Starlette's multipart parser, noting whether the body reached its closing boundary ('--BOUNDARY--')."""

    ended = False

    def on_end(self) -> None:
        self.ended = True
        super().on_end()


async def _read_form(request: Request, state: ServiceState) -> tuple[FormData, list[UploadFile], dict]:
    """Parse the multipart body within the configured limits (the body's size and deadline: service.limits)."""
    settings = state.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ClientError(415, "unsupported_media_type", "send images as multipart/form-data with field 'files'")
    received = 0

    async def stream():
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            yield chunk

    parser = _Parser(request.headers, stream(), max_files=settings.max_images + 1, max_fields=len(FORM_FIELDS) + 4)
    try:
        form = await parser.parse()
    except ClientError:  # the body broke its size limit or deadline while it streamed
        raise
    except MultiPartException as err:
        if "Too many files" in err.message:
            raise ClientError(400, "too_many_images", f"more than {settings.max_images} images in one request") \
                from None
        raise ClientError(400, "malformed_multipart", f"the multipart body cannot be read: {err.message}") from None
    except OSError as err:  # spooling an upload of over 1 MB to the temporary folder failed: the server's fault
        logger.error("an upload could not be spooled to the temporary folder: %s", err)
        raise ClientError(503, "upload_spool_failed", "the server could not store the upload "
                          f"({err.strerror or err}); try again later", headers={"Retry-After": "30"}) from None
    except Exception as err:  # noqa: BLE001 - any other parser failure is the client's malformed body
        raise ClientError(400, "malformed_multipart", f"the multipart body cannot be read: {err}") from None
    try:
        if received and not parser.ended:
            boundary = request.headers["content-type"].partition("boundary=")[2].split(";")[0].strip().strip('"')
            raise ClientError(400, "malformed_multipart", f"the multipart body ends before its closing boundary "
                                                          f"'--{boundary}--' (a cut-off upload?)")
        files, options = _check_form(form, settings.max_images)
    except BaseException:
        await form.close()
        raise
    return form, files, options


def _check_form(form: FormData, max_images: int) -> tuple[list[UploadFile], dict]:
    """The uploads and options of a parsed form, checked."""
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ClientError(400, "unknown_field", f"unknown form field(s) {unknown}; images go in field 'files', "
                                                f"options are {sorted(FORM_FIELDS - {'files'})}")
    files = form.getlist("files")
    if not files:
        raise ClientError(400, "no_files", "no images: send one or more files in the multipart field 'files'")
    if any(not isinstance(f, UploadFile) for f in files):
        raise ClientError(400, "not_a_file", "field 'files' must hold file uploads, not text values")
    if len(files) > max_images:
        raise ClientError(400, "too_many_images", f"{len(files)} images in one request; the limit is {max_images}")
    options = {k: form.get(k) for k in FORM_FIELDS - {"files"}}
    if any(isinstance(v, UploadFile) for v in options.values()):
        raise ClientError(400, "unknown_field", "only field 'files' may hold files")
    return files, options


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    """An upload's bytes from the start; ImageError 'too_large' over `limit`."""
    await upload.seek(0)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ImageError("too_large", f"the image is larger than the limit of {limit} bytes")
    return data


@router.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=ERRORS,
             dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": MULTIPART_BODY}, summary="Classify one or more images")
async def predict(request: Request, state: StateDep) -> PredictResponse:
    """Top-k classes per image with blended probabilities; one bad image fails only its own entry."""
    with state.use(request.query_params.get("model"), request.query_params.get("version")) as served:
        form, files, options = await _read_form(request, state)
        try:
            return await _predict(request, state, served, files, options)
        finally:
            await form.close()  # the uploads' temporary files


async def _predict(request: Request, state: ServiceState, served: Version, files: list[UploadFile],
                   options: dict) -> PredictResponse:
    """The prediction for parsed uploads by one version: each upload through the inference path."""
    classes = served.predictor.classes
    k = _top_k(options["top_k"] or request.query_params.get("top_k"), state.settings.default_top_k, len(classes))
    with_probs = _flag(options["include_probabilities"] or request.query_params.get("include_probabilities"),
                       "include_probabilities")
    with_members = _flag(options["include_members"] or request.query_params.get("include_members"),
                         "include_members")
    limit = state.settings.max_image_bytes
    images = [EncodedImage(str(upload.filename), partial(_read_upload, upload, limit)) for upload in files]
    results = await state.inference(served).infer(images)
    answers = []
    for upload, result in zip(files, results, strict=True):
        if isinstance(result, ImageError):
            state.metrics.error(result.kind)
            answers.append(ImageResult(filename=upload.filename, ok=False,
                                       error=ErrorDetail(kind=result.kind, message=result.message)))
        else:
            answers.append(_image_result(served, upload.filename, result, k, with_probs, with_members))
    return PredictResponse(model=served.model, version=served.number, classes=len(classes), results=answers)


def _image_result(served: Version, filename: str | None, result: Prediction, k: int, with_probs: bool,
                  with_members: bool) -> ImageResult:
    """One image's entry: its top k classes, and its probabilities and members' votes when asked."""
    classes = served.predictor.classes
    blended = result.blended
    answer = ImageResult(filename=filename, top=[ClassScore(index=int(c), name=classes[c],
                                                            probability=float(blended[c]))
                                                 for c in np.argsort(-blended)[:k]])
    if with_probs:
        answer.probabilities = [float(p) for p in blended]
    if with_members:
        answer.members = [MemberVote(member=m.name, index=int(p.argmax()), name=classes[int(p.argmax())],
                                     probability=float(p.max()))
                          for m, p in zip(served.predictor.members, result.members, strict=True)]
    return answer

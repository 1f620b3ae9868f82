"""TensorFlow-Serving-compatible routes, so clients written for TF Serving work unchanged.

POST /v1/models/{name}:predict  {"instances": [{"b64": "..."}]}  ->  {"predictions": [[p_0, ..., p_C-1], ...]}
                                {"inputs": [{"b64": "..."}]}     ->  {"outputs": [[...], ...]}
GET  /v1/models/{name}           model status;  GET /v1/models/{name}/metadata  signature metadata.
Errors answer {"error": "..."} as TF Serving does.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.bodies import load_json
from service.deps import ServiceState, StateDep, require_api_key
from service.errors import ClientError, plain_error_response
from service.images import ImageError
from service.inference import base64_image, encoded_blobs
from service.predictor import served_model_info
from service.repository import VERSION_FOLDER, Version

router = APIRouter(tags=["tensorflow-serving"])

PREDICT_BODY = {
    "required": True,
    "content": {"application/json": {
        "schema": {"type": "object", "properties": {
            "instances": {"type": "array", "items": {"oneOf": [
                {"type": "object", "properties": {"b64": {"type": "string"}}, "required": ["b64"]},
                {"type": "object", "properties": {"image_bytes": {"type": "object",
                                                                  "properties": {"b64": {"type": "string"}}}}},
            ]}},
            "inputs": {"oneOf": [
                {"type": "array", "items": {"type": "object", "properties": {"b64": {"type": "string"}}}},
                {"type": "object", "properties": {"image_bytes": {"type": "array"}}},
            ]},
            "signature_name": {"type": "string"},
        }},
        "example": {"instances": [{"b64": "/9j/4AAQSkZJRgABAQ..."}]},
    }},
}
TF_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}},
                                             "example": {"error": "instance 0: the data is not an image"}}}}


def _from_client_error(state: ServiceState, err: ClientError) -> JSONResponse:
    """A ClientError (body limits, pixel budgets) in TF Serving's error shape."""
    return plain_error_response(state.metrics, err.status, err.kind, err.message, err.headers)


def _b64_items(body: object) -> tuple[list, str]:
    """The list of base64 items and which answer key ('predictions' or 'outputs') the format implies."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with 'instances' or 'inputs'")
    if "instances" in body:
        items, key = body["instances"], "predictions"
    elif "inputs" in body:
        items, key = body["inputs"], "outputs"
        if isinstance(items, dict):
            items = items.get("image_bytes")
    else:
        raise ValueError("the body must have 'instances' (row format) or 'inputs' (columnar format)")
    if not isinstance(items, list) or not items:
        raise ValueError("'instances'/'inputs' must be a non-empty list of {\"b64\": \"...\"} objects")
    signature = body.get("signature_name", "")
    if signature not in ("", "serving_default") or not isinstance(signature, str):
        raise ValueError(f"signature_name {signature!r} is not served: this model serves only 'serving_default' "
                         f"(or leave signature_name out)")
    return items, key


def _decode_b64(item: object, index: int, max_bytes: int) -> bytes | ImageError:
    """Accept {"b64": s} or {"image_bytes": {"b64": s}}; base64 of an image over `max_bytes` is too_large undecoded."""
    if isinstance(item, dict) and "image_bytes" in item:
        item = item["image_bytes"]
    if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
        raise ValueError(f"instance {index}: expected {{\"b64\": \"<base64 image>\"}}")
    try:
        return base64_image(item["b64"], max_bytes)
    except ValueError as err:
        raise ValueError(f"instance {index}: 'b64' is {err}") from None


PREDICT_RESPONSES = {200: {"content": {"application/json": {"example": {"predictions": [[0.01, 0.93, 0.06]]}}}},
                     400: TF_ERROR, 404: TF_ERROR, 408: TF_ERROR, 413: TF_ERROR, 503: TF_ERROR, 504: TF_ERROR}


@router.post("/v1/models/{name}:predict", dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": PREDICT_BODY}, responses=PREDICT_RESPONSES,
             summary="Classify base64 images with the latest version (TensorFlow Serving REST API)")
async def tf_predict(name: str, request: Request, state: StateDep) -> JSONResponse:
    """Blended probabilities per instance, in TensorFlow Serving's request and response shapes."""
    return await _tf_predict(request, state, name)


@router.post("/v1/models/{name}/versions/{version}:predict", dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": PREDICT_BODY}, responses=PREDICT_RESPONSES,
             summary="Classify base64 images with one version (TensorFlow Serving REST API)")
async def tf_predict_version(name: str, version: str, request: Request, state: StateDep) -> JSONResponse:
    """As :predict, by the given version of the model."""
    return await _tf_predict(request, state, name, version=version)


@router.post("/v1/models/{name}/labels/{label}:predict", dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": PREDICT_BODY}, responses=PREDICT_RESPONSES,
             summary="Classify base64 images with the version a label names (TensorFlow Serving REST API)")
async def tf_predict_label(name: str, label: str, request: Request, state: StateDep) -> JSONResponse:
    """As :predict, by the version the model's labels.json gives this label (e.g. stable, canary)."""
    return await _tf_predict(request, state, name, label=label)


async def _tf_predict(request: Request, state: ServiceState, name: str, version: str | None = None,
                      label: str | None = None) -> JSONResponse:
    """Resolve the version, read and check the body, decode, predict; every failure in TF Serving's error shape."""
    try:
        with state.use(name, version, label) as served:
            return await _predict_with(request, state, served)
    except ClientError as err:
        return _from_client_error(state, err)


async def _predict_with(request: Request, state: ServiceState, served: Version) -> JSONResponse:
    """The prediction of one version for a TF-Serving request body."""
    settings = state.settings
    raw = await request.body()  # its size and deadline are enforced while it streams (service.limits)
    try:
        body = load_json(raw, hint=f": at most {settings.max_images} instances of one image each")
        del raw
        items, key = _b64_items(body)
        if len(items) > settings.max_images:
            return plain_error_response(state.metrics, 400, "too_many_images", f"{len(items)} instances in one "
                                                                               f"request; the limit is "
                                                                               f"{settings.max_images}")
        blobs = [_decode_b64(item, i, settings.max_image_bytes) for i, item in enumerate(items)]
        del body, items
    except json.JSONDecodeError as err:
        return plain_error_response(state.metrics, 400, "malformed_json", f"the body is not valid JSON: {err}")
    except (ValueError, RecursionError) as err:
        return plain_error_response(state.metrics, 400, "malformed_request", str(err))
    try:
        results = await state.inference(served).infer(encoded_blobs(blobs, settings.max_image_bytes, "instance"),
                                                      strict=True)
    except ImageError as err:
        return plain_error_response(state.metrics, 400, err.kind, err.message)
    for i, result in enumerate(results):
        if isinstance(result, ImageError):  # strict: only an output that is not finite is left to fail
            return plain_error_response(state.metrics, 503, result.kind, f"instance {i}: the model's output is "
                                                                         f"not finite (NaN or infinity), so there "
                                                                         f"is no answer for it")
    return JSONResponse({key: [[float(p) for p in result.blended] for result in results]})


def _version_status(version: Version) -> dict:
    """One entry of TF Serving's model_version_status."""
    code, message = ("OK", "") if version.error is None else ("UNKNOWN", version.error)
    if version.reload_error is not None and version.error is None:
        code, message = "UNKNOWN", (f"its files changed and failed to load ({version.reload_error}); the copy "
                                    f"loaded before serves on")
    return {"version": str(version.number), "state": version.state,
            "status": {"error_code": code, "error_message": message}}


@router.get("/v1/models/{name}", responses={404: TF_ERROR}, summary="Model status (TensorFlow Serving REST API)")
async def tf_status(name: str, state: StateDep) -> JSONResponse:
    """Every version's state: AVAILABLE once warmed up, LOADING before; END with error_code UNKNOWN and the
    reason when it failed to load or warm up (as TF Serving reports a version that failed to load); under
    "skipped", the folders in the model's folder that are not versions, and why."""
    versions = state.repository.models.get(name) if state.repository is not None else None
    if not versions:
        return _unknown(state, name)
    answer = {"model_version_status": [_version_status(v) for _, v in sorted(versions.items(), reverse=True)]}
    skipped = state.repository.skipped_of(name)
    if skipped:  # folders in the model's folder that are not versions, and why (not in TF Serving's answer)
        answer["skipped"] = skipped
    return JSONResponse(answer)


@router.get("/v1/models/{name}/versions/{version}", responses={404: TF_ERROR},
            summary="One version's status (TensorFlow Serving REST API)")
async def tf_version_status(name: str, version: str, state: StateDep) -> JSONResponse:
    """The version's state, as in the model status."""
    versions = state.repository.models.get(name, {}) if state.repository is not None else {}
    chosen = versions.get(int(version)) if VERSION_FOLDER.fullmatch(version) else None
    if chosen is None:
        return _unknown(state, name, version)
    return JSONResponse({"model_version_status": [_version_status(chosen)]})


def _unknown(state: ServiceState, name: str, version: str | None = None) -> JSONResponse:
    """TF Serving's 404 for a model (or version) this server does not serve."""
    names = state.repository.names if state.repository is not None else []
    what = f"Specific({name}, {version})" if version else f"Latest({name})"
    served = ", ".join(map(repr, names)) or "no model yet"
    return plain_error_response(state.metrics, 404, "unknown_model",
                                f"Servable not found for request: {what}; this server serves {served}")


def _metadata(state: ServiceState, served: Version) -> JSONResponse:
    """The serving_default signature (image_bytes -> probabilities) and what the version is made of."""
    classes = len(served.predictor.classes)
    signature = {
        "inputs": {"image_bytes": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1", "name": ""}],
                                                                          "unknown_rank": False},
                                   "name": "serving_default_image_bytes:0"}},
        "outputs": {"probabilities": {"dtype": "DT_FLOAT",
                                      "tensor_shape": {"dim": [{"size": "-1", "name": ""},
                                                               {"size": str(classes), "name": ""}],
                                                       "unknown_rank": False},
                                      "name": "StatefulPartitionedCall:0"}},
        "method_name": "tensorflow/serving/predict",
    }
    labels = sorted(k for k, v in state.repository.labels.get(served.model, {}).items() if v == served.number)
    return JSONResponse({"model_spec": {"name": served.model, "signature_name": "", "version": str(served.number)},
                         "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
                         "flower": {**served_model_info(served.predictor), "labels": labels,
                                    "loaded_at": served.loaded_at}})


@router.get("/v1/models/{name}/metadata", responses={404: TF_ERROR, 503: TF_ERROR},
            summary="Signature metadata of the latest version (TensorFlow Serving REST API)")
async def tf_metadata(name: str, state: StateDep) -> JSONResponse:
    """The serving_default signature: image_bytes (string) -> probabilities (float, classes wide); under "flower",
    the members (image size, fit, blend weight), blend, serve-time TTA passes, classes and labels."""
    return _metadata_of(state, name)


@router.get("/v1/models/{name}/versions/{version}/metadata", responses={404: TF_ERROR, 503: TF_ERROR},
            summary="Signature metadata of one version (TensorFlow Serving REST API)")
async def tf_version_metadata(name: str, version: str, state: StateDep) -> JSONResponse:
    """As /metadata, for the given version."""
    return _metadata_of(state, name, version)


def _metadata_of(state: ServiceState, name: str, version: str | None = None) -> JSONResponse:
    """Metadata of a resolved version, or the TF-Serving error saying why there is none."""
    try:
        with state.use(name, version) as served:
            return _metadata(state, served)
    except ClientError as err:
        return _from_client_error(state, err)

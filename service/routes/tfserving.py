"""TensorFlow-Serving-compatible routes, so clients written for TF Serving work unchanged.

POST /v1/models/{name}:predict  {"instances": [{"b64": "..."}]}  ->  {"predictions": [[p_0, ..., p_C-1], ...]}
                                {"inputs": [{"b64": "..."}]}     ->  {"outputs": [[...], ...]}
GET  /v1/models/{name}           model status;  GET /v1/models/{name}/metadata  signature metadata.
Errors answer {"error": "..."} as TF Serving does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.deps import ServiceState, StateDep, require_api_key
from service.errors import ClientError
from service.images import ImageError, decode_image, decoded_pixels
from service.limits import check_request_pixels

router = APIRouter(tags=["tensorflow-serving"])
logger = logging.getLogger(__name__)

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


def tf_error(state: ServiceState, status: int, kind: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """A TF-Serving style error body."""
    state.metrics.error(kind)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _from_client_error(state: ServiceState, err: ClientError) -> JSONResponse:
    """A ClientError (body limits, pixel budgets) in TF Serving's error shape."""
    return tf_error(state, err.status, err.kind, err.message, err.headers)


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


def _decode_b64(item: object, index: int) -> bytes:
    """Accept {"b64": s} or {"image_bytes": {"b64": s}}."""
    if isinstance(item, dict) and "image_bytes" in item:
        item = item["image_bytes"]
    if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
        raise ValueError(f"instance {index}: expected {{\"b64\": \"<base64 image>\"}}")
    try:
        return base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"instance {index}: 'b64' is not valid base64") from None


def _check_name(state: ServiceState, name: str) -> JSONResponse | None:
    """404 for a model name this server does not serve."""
    if name != state.settings.model_name:
        return tf_error(state, 404, "unknown_model", f"Servable not found for request: Latest({name}); this server "
                                                      f"serves {state.settings.model_name!r}")
    return None


@router.post("/v1/models/{name}:predict", dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": PREDICT_BODY},
             responses={200: {"content": {"application/json": {"example": {"predictions": [[0.01, 0.93, 0.06]]}}}},
                        400: TF_ERROR, 404: TF_ERROR, 408: TF_ERROR, 413: TF_ERROR, 503: TF_ERROR},
             summary="Classify base64 images (TensorFlow Serving REST API)")
async def tf_predict(name: str, request: Request, state: StateDep) -> JSONResponse:
    """Blended probabilities per instance, in TensorFlow Serving's request and response shapes."""
    missing = _check_name(state, name)
    if missing:
        return missing
    if not state.ready and state.warm_up_error:
        return tf_error(state, 503, "warm_up_failed", f"the warm-up prediction failed, so the service cannot "
                                                      f"predict: {state.warm_up_error}")
    if not state.ready:
        return tf_error(state, 503, "not_ready", "the models are still loading or warming up")
    settings = state.settings
    try:
        raw = await request.body()  # its size and deadline are enforced while it streams (service.limits)
    except ClientError as err:
        return _from_client_error(state, err)
    try:
        body = json.loads(raw)
        del raw
        items, key = _b64_items(body)
        if len(items) > settings.max_images:
            return tf_error(state, 400, "too_many_images",
                            f"{len(items)} instances in one request; the limit is {settings.max_images}")
        blobs = [_decode_b64(item, i) for i, item in enumerate(items)]
        del body, items
    except json.JSONDecodeError as err:
        return tf_error(state, 400, "malformed_json", f"the body is not valid JSON: {err}")
    except (ValueError, RecursionError) as err:
        return tf_error(state, 400, "malformed_request", str(err))
    target = state.decode_target
    pixels = 0
    for i, blob in enumerate(blobs):
        if len(blob) > settings.max_image_bytes:
            return tf_error(state, 400, "too_large", f"instance {i}: larger than {settings.max_image_bytes} bytes")
        try:
            pixels += decoded_pixels(blob, settings.max_pixels, target, settings.downscale_pixels)
        except ImageError as err:
            return tf_error(state, 400, err.kind, f"instance {i}: {err.message}")
    try:
        check_request_pixels(pixels, settings.max_request_pixels)
        with state.pixels.hold(pixels):
            outputs = await _decode_and_predict(state, blobs)
    except ClientError as err:
        return _from_client_error(state, err)
    except ImageError as err:
        return tf_error(state, 400, err.kind, err.message)
    for i, (blended, _) in enumerate(outputs):
        if not np.isfinite(blended).all():
            logger.warning("the model's output is not finite for instance %d of a TF-Serving request", i)
            return tf_error(state, 503, "non_finite_output", f"instance {i}: the model's output is not finite "
                                                             f"(NaN or infinity), so there is no answer for it")
    return JSONResponse({key: [[float(p) for p in blended] for blended, _ in outputs]})


async def _decode_and_predict(state: ServiceState, blobs: list[bytes]) -> list:
    """Decode every instance off the event loop and predict; ImageError names the instance that failed."""
    loop = asyncio.get_running_loop()
    settings = state.settings
    images = []
    for i, blob in enumerate(blobs):
        try:
            images.append(await loop.run_in_executor(None, decode_image, blob, settings.max_pixels,
                                                     state.decode_target, settings.downscale_pixels))
        except ImageError as err:
            raise ImageError(err.kind, f"instance {i}: {err.message}") from None
    return await state.batcher.submit_many(images)


@router.get("/v1/models/{name}", responses={404: TF_ERROR}, summary="Model status (TensorFlow Serving REST API)")
async def tf_status(name: str, state: StateDep) -> JSONResponse:
    """AVAILABLE once warmed up, LOADING before; END with error_code UNKNOWN and the error when the warm-up failed
    (as TF Serving reports a version that failed to load)."""
    missing = _check_name(state, name)
    if missing:
        return missing
    if state.ready:
        status, code, message = "AVAILABLE", "OK", ""
    elif state.warm_up_error:
        status, code, message = "END", "UNKNOWN", f"the warm-up prediction failed: {state.warm_up_error}"
    else:
        status, code, message = "LOADING", "OK", ""
    return JSONResponse({"model_version_status": [
        {"version": "1", "state": status, "status": {"error_code": code, "error_message": message}}]})


@router.get("/v1/models/{name}/metadata", responses={404: TF_ERROR},
            summary="Signature metadata (TensorFlow Serving REST API)")
async def tf_metadata(name: str, state: StateDep) -> JSONResponse:
    """The serving_default signature: image_bytes (string) -> probabilities (float, classes wide)."""
    missing = _check_name(state, name)
    if missing:
        return missing
    classes = len(state.ensemble.classes) if state.ensemble is not None else -1
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
    return JSONResponse({"model_spec": {"name": name, "signature_name": "", "version": "1"},
                         "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}}})

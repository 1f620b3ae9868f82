"""The Open Inference Protocol (KServe v2, as Triton speaks it), beside the TF-Serving routes.

GET  /v2, /v2/health/live, /v2/health/ready
GET  /v2/models/{name}[/versions/{v}]           metadata: inputs image_bytes (BYTES [-1]) or images (FP32
                                                 [-1,-1,-1,3], RGB 0..255); output probabilities (FP32 [-1,C])
GET  /v2/models/{name}[/versions/{v}]/ready
POST /v2/models/{name}[/versions/{v}]/infer      one input, image_bytes or images; outputs probabilities and,
                                                 when asked, top_classes (BYTES [N,k] "probability:index:name")

Requests and answers are JSON, or JSON followed by binary tensors (Triton's binary data extension: header
Inference-Header-Content-Length; BYTES elements each prefixed by a 4-byte little-endian length). In JSON,
BYTES elements are base64 strings. Asking an output for `"classification": k` (tritonclient's class_count)
answers the top k as BYTES "probability:index:name", as Triton's classification extension does. Errors are
{"error": "..."} with 400, 404 or 503.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service.bodies import Numbers, load_json
from service.deps import ServiceState, StateDep, require_api_key
from service.errors import ClientError, plain_error_response
from service.images import ImageError
from service.inference import base64_image, encoded_blobs
from service.repository import Version

router = APIRouter(tags=["open-inference-protocol"])
HEADER_LENGTH = "inference-header-content-length"
MANY_VALUES = ": one input of at most --max-images images; send pixels as binary data or as one array of plain numbers"
V2_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}},
                                             "example": {"error": "unexpected inference input 'x'"}}}}
TENSOR = {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
          "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {"type": "array"}}
INFER_BODY = {
    "required": True,
    "content": {"application/json": {
        "schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                                  "properties": TENSOR}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                   "properties": {"name": {"type": "string"},
                                                                  "parameters": {"type": "object"}}}},
        }},
        "example": {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                "data": ["/9j/4AAQSkZJRgABAQ..."]}]},
    }},
}


class ProtocolError(ValueError):
    """A request that breaks the protocol; answered 400 with the message."""


@router.get("/v2", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> dict:
    """The server's name, version and protocol extensions."""
    return {"name": "flower-ensemble", "version": "1", "extensions": ["binary_tensor_data", "classification"]}


@router.get("/v2/health/live", summary="Liveness (Open Inference Protocol)")
async def live() -> dict:
    """200 while the process serves requests."""
    return {"live": True}


@router.get("/v2/health/ready", responses={400: V2_ERROR}, summary="Readiness (Open Inference Protocol)")
async def ready(state: StateDep) -> JSONResponse:
    """200 when every model has a version loaded and warmed up, else 400 (the protocol's 4xx for false)."""
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 400)


def _inputs_and_outputs(served: Version) -> tuple[list[dict], list[dict]]:
    """The tensors a version takes and gives."""
    classes = len(served.predictor.classes)
    inputs = [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
              {"name": "images", "datatype": "FP32", "shape": [-1, -1, -1, 3]}]
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
               {"name": "top_classes", "datatype": "BYTES", "shape": [-1, -1]}]
    return inputs, outputs


def _model_metadata(state: ServiceState, served: Version) -> dict:
    """The protocol's model metadata."""
    inputs, outputs = _inputs_and_outputs(served)
    versions = sorted(state.repository.models.get(served.model, {}))
    return {"name": served.model, "versions": [str(v) for v in versions], "platform": "flower_ensemble",
            "inputs": inputs, "outputs": outputs}


def _resolved(state: ServiceState, name: str, version: str | None) -> tuple[Version | None, JSONResponse | None]:
    """A version by name and number (the latest when none), or the protocol's error for it."""
    try:
        with state.use(name, version or None) as served:
            return served, None
    except ClientError as err:
        return None, plain_error_response(state.metrics, err.status, err.kind, err.message, err.headers)


@router.get("/v2/models/{name}", responses={404: V2_ERROR, 503: V2_ERROR}, summary="Model metadata (Open Inference "
                                                                                  "Protocol)")
async def model_metadata(name: str, state: StateDep) -> JSONResponse:
    """The model's versions, inputs and outputs."""
    served, problem = _resolved(state, name, None)
    return problem or JSONResponse(_model_metadata(state, served))


@router.get("/v2/models/{name}/versions/{version}", responses={404: V2_ERROR, 503: V2_ERROR},
            summary="Model version metadata (Open Inference Protocol)")
async def version_metadata(name: str, version: str, state: StateDep) -> JSONResponse:
    """As the model metadata, for one version."""
    served, problem = _resolved(state, name, version)
    return problem or JSONResponse(_model_metadata(state, served))


@router.get("/v2/models/{name}/ready", responses={400: V2_ERROR, 404: V2_ERROR},
            summary="Model readiness (Open Inference Protocol)")
async def model_ready(name: str, state: StateDep) -> JSONResponse:
    """200 when the model's latest version is available, else 400 (404 for a model not served)."""
    return _readiness(state, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", responses={400: V2_ERROR, 404: V2_ERROR},
            summary="Model version readiness (Open Inference Protocol)")
async def version_ready(name: str, version: str, state: StateDep) -> JSONResponse:
    """200 when that version is available, else 400 (404 for a version not served)."""
    return _readiness(state, name, version)


def _readiness(state: ServiceState, name: str, version: str | None) -> JSONResponse:
    """The ready answer: 200 true, 400 false, 404 unknown."""
    served, problem = _resolved(state, name, version)
    if problem is not None and problem.status_code == 404:
        return problem
    return JSONResponse({"name": name, "ready": served is not None}, status_code=200 if served is not None else 400)


INFER_RESPONSES = {200: {"content": {"application/json": {"example": {
    "model_name": "flowers", "model_version": "1",
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": [0.01, 0.93, 0.06]}]}}}},
    400: V2_ERROR, 404: V2_ERROR, 408: V2_ERROR, 413: V2_ERROR, 503: V2_ERROR, 504: V2_ERROR}


@router.post("/v2/models/{name}/infer", dependencies=[Depends(require_api_key)], responses=INFER_RESPONSES,
             openapi_extra={"requestBody": INFER_BODY}, summary="Inference (Open Inference Protocol)")
async def infer(name: str, request: Request, state: StateDep) -> Response:
    """Probabilities (and top classes when asked) for encoded images or RGB pixels, by the latest version."""
    return await _infer(request, state, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Depends(require_api_key)],
             responses=INFER_RESPONSES, openapi_extra={"requestBody": INFER_BODY},
             summary="Inference by one version (Open Inference Protocol)")
async def infer_version(name: str, version: str, request: Request, state: StateDep) -> Response:
    """As /infer, by the given version."""
    return await _infer(request, state, name, version)


async def _infer(request: Request, state: ServiceState, name: str, version: str | None) -> Response:
    """Resolve, parse, predict and answer; every failure in the protocol's error shape."""
    try:
        with state.use(name, version) as served:
            body = await request.body()  # size and deadline enforced while it streams (service.limits)
            document, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
            del body
            tensor, outputs = _parse_request(document, binary, state.settings.max_images,
                                             state.settings.max_image_bytes)
            request_id = document.get("id")
            del document, binary  # the body goes with them: only the tensor is held while it is predicted
            blended = await _predict_tensor(state, served, tensor)
            return _answer(served, request_id, outputs, blended)
    except ClientError as err:
        return plain_error_response(state.metrics, err.status, err.kind, err.message, err.headers)
    except ImageError as err:
        return plain_error_response(state.metrics, 400, err.kind, err.message)
    except ProtocolError as err:
        return plain_error_response(state.metrics, 400, "malformed_request", str(err))


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON document (a long array of plain numbers in it left as `Numbers`) and the binary part after it
    (the binary data extension), within service.bodies' bounds."""
    if not body:
        raise ProtocolError("the body is empty: send a JSON object with 'inputs'")
    try:
        length = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length must be a number, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {length} does not fit the body of {len(body)} bytes")
    try:
        document = load_json(body[:length], numbers=True, hint=MANY_VALUES)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # incl. integers too long to convert
        raise ProtocolError(f"the request's JSON cannot be read: {err}") from None
    if not isinstance(document, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'")
    return document, memoryview(body)[length:]


def _parse_request(document: dict, binary: memoryview, max_images: int,
                   max_image_bytes: int) -> tuple[tuple[str, Any], list[dict]]:
    """The one input as ("image_bytes", [bytes]) or ("images", array [N,H,W,3]), and the outputs asked for."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError("'inputs' must hold exactly one tensor: 'image_bytes' (BYTES) or 'images' (FP32)")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not shape or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of sizes, got {shape!r}")
    if shape[0] > max_images:
        raise ClientError(400, "too_many_images", f"{shape[0]} images in one request; the limit is {max_images}")
    size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor.get("parameters"),
                                                                                 dict) else None
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size != len(binary)):
        raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not match the {len(binary)} bytes "
                            f"after the JSON")
    raw = binary if size is not None else None
    if raw is None and "data" not in tensor:
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary data")
    if name == "image_bytes" and datatype == "BYTES":
        return ("image_bytes", _bytes_elements(raw, tensor.get("data"), shape, max_image_bytes)), _outputs(document)
    if name == "images" and datatype == "FP32":
        return ("images", _pixels(raw, tensor.get("data"), shape)), _outputs(document)
    raise ProtocolError(f"unexpected inference input {name!r} of datatype {datatype!r}: give 'image_bytes' (BYTES, "
                        f"encoded images) or 'images' (FP32 [N,H,W,3], RGB 0..255)")


def _bytes_elements(raw: memoryview | None, data: Any, shape: list[int],
                    max_bytes: int) -> list[bytes | ImageError]:
    """The encoded images of a BYTES tensor: length-prefixed binary, or base64 strings in JSON; an element over
    `max_bytes` is its too_large error, never copied or decoded."""
    count = int(np.prod(shape))
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolError(f"input 'image_bytes' must have shape [N] or [N, 1], got {shape}")
    too_large = ImageError("too_large", f"larger than {max_bytes} bytes")
    if raw is not None:
        blobs, offset = [], 0
        while offset < len(raw) and len(blobs) <= count:  # one element past the shape is enough to refuse
            if offset + 4 > len(raw):
                raise ProtocolError("the binary BYTES data ends inside an element's 4-byte length")
            (length,) = struct.unpack_from("<I", raw, offset)
            blobs.append(bytes(raw[offset + 4:offset + 4 + length]) if length <= max_bytes else too_large)
            if offset + 4 + length > len(raw):
                raise ProtocolError(f"element {len(blobs) - 1} claims {length} bytes past the end of the data")
            offset += 4 + length
    else:
        try:
            flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else None
        except ValueError:  # ragged nesting
            flat = None
        if flat is None or not all(isinstance(e, str) for e in flat):
            raise ProtocolError("input 'image_bytes': 'data' must be a list of base64 strings")
        blobs = []
        for i, element in enumerate(flat):
            try:
                blobs.append(base64_image(element, max_bytes))
            except ValueError as err:
                raise ProtocolError(f"input 'image_bytes': element {i} is {err}") from None
    if len(blobs) != count:
        raise ProtocolError(f"input 'image_bytes' has {'more than ' * (len(blobs) > count)}{len(blobs)} elements "
                            f"for shape {shape}")
    return blobs


def _pixels(raw: memoryview | None, data: Any, shape: list[int]) -> np.ndarray:
    """The RGB pixels of an FP32 tensor [N,H,W,3]: little-endian binary, or numbers in JSON (a long array of plain
    numbers read straight into float32, service.bodies.Numbers)."""
    if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        raise ProtocolError(f"input 'images' must have shape [N, H, W, 3] with H, W >= 1, got {shape}")
    count = int(np.prod(shape, dtype=object))
    if raw is not None:
        if len(raw) != 4 * count:
            raise ProtocolError(f"input 'images': {len(raw)} bytes of binary data for shape {shape} "
                                f"({4 * count} expected)")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # a copy: the body is let go
    elif isinstance(data, Numbers):
        if len(data) != count:
            raise ProtocolError(f"input 'images' has {len(data)} values for shape {shape}")
        try:
            values = data.parse()
        except ValueError as err:
            raise ProtocolError(f"input 'images': 'data' must be a (nested) list of numbers: {err}") from None
    else:
        values = _json_numbers(data)
    if values.size != count:
        raise ProtocolError(f"input 'images' has {values.size} values for shape {shape}")
    if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise ProtocolError("input 'images': pixel values must be finite RGB values in 0..255")
    return values.reshape(shape)


def _json_numbers(data: Any) -> np.ndarray:
    """The numbers of a short JSON array parsed as Python values (nested lists of numbers), as float32."""
    flat = np.asarray(data, dtype=object).reshape(-1)  # ragged nesting leaves lists among the elements
    if not all(type(v) in (int, float) for v in flat):  # noqa: E721 - bool is an int subclass, and refused
        raise ProtocolError("input 'images': 'data' must be a (nested) list of numbers: no strings, booleans "
                            "or ragged lists")
    try:
        return flat.astype(np.float64).astype(np.float32)
    except OverflowError:
        raise ProtocolError("input 'images': 'data' holds huge integers, not pixel values") from None


def _outputs(document: dict) -> list[dict]:
    """The outputs asked for (default: probabilities), each {name, binary, classification}."""
    asked = document.get("outputs")
    parameters = document.get("parameters") if isinstance(document.get("parameters"), dict) else {}
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError(f"binary_data_output must be true or false, got {binary_default!r}")
    if asked is None:
        return [{"name": "probabilities", "binary": binary_default, "classification": 0}]
    if not isinstance(asked, list) or not asked:
        raise ProtocolError("'outputs' must be a non-empty list of {\"name\": ...}")
    chosen = []
    for output in asked:
        if not isinstance(output, dict) or output.get("name") not in ("probabilities", "top_classes"):
            raise ProtocolError(f"unexpected inference output {output!r}: this model gives 'probabilities' and "
                                f"'top_classes'")
        options = output.get("parameters") if isinstance(output.get("parameters"), dict) else {}
        k = options.get("classification", options.get("top_k", 5 if output["name"] == "top_classes" else 0))
        least = 1 if output["name"] == "top_classes" else 0
        if isinstance(k, bool) or not isinstance(k, int) or k < least:
            raise ProtocolError(f"output {output['name']!r}: classification must be a whole number of classes "
                                f">= {least}")
        binary = options.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {output['name']!r}: binary_data must be true or false, got {binary!r}")
        chosen.append({"name": output["name"], "binary": binary,
                       "classification": k})
    return chosen


async def _predict_tensor(state: ServiceState, served: Version, tensor: tuple[str, Any]) -> np.ndarray:
    """Blended probabilities [N, C] for the input tensor, through the version's inference path."""
    kind, value = tensor
    path = state.inference(served)
    if kind == "image_bytes":
        results = await path.infer(encoded_blobs(value, state.settings.max_image_bytes, "element"), strict=True)
    else:
        results = await path.infer_pixels(value, "element")
    if any(isinstance(result, ImageError) for result in results):  # strict: only a non-finite output fails here
        raise ClientError(503, "non_finite_output", "the model's output is not finite (NaN or infinity) for an image")
    blended = np.stack([result.blended for result in results]) if results else \
        np.zeros((0, len(served.predictor.classes)))
    return blended.astype(np.float32)


def _answer(served: Version, request_id: Any, outputs: list[dict], blended: np.ndarray) -> Response:
    """The response: JSON, with the binary outputs after it when any was asked for in binary."""
    classes = served.predictor.classes
    answer: dict[str, Any] = {"model_name": served.model, "model_version": str(served.number), "outputs": []}
    if isinstance(request_id, str):
        answer["id"] = request_id
    chunks = []
    for output in outputs:
        k = min(output["classification"], len(classes))
        if k:
            order = np.argsort(-blended, axis=1, kind="stable")[:, :k]
            values = [f"{blended[i, c]:.6f}:{c}:{classes[c]}" for i in range(len(blended)) for c in order[i]]
            entry, payload = {"name": output["name"], "datatype": "BYTES", "shape": [len(blended), k]}, values
        else:
            entry, payload = {"name": output["name"], "datatype": "FP32", "shape": list(blended.shape)}, blended
        if output["binary"]:
            data = _binary(payload)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = payload if isinstance(payload, list) else [float(p) for p in payload.reshape(-1)]
        answer["outputs"].append(entry)
    if not chunks:
        return JSONResponse(answer)
    head = json.dumps(answer).encode()
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _binary(payload: Any) -> bytes:
    """A tensor's binary form: float32 little-endian, or BYTES elements each after its 4-byte length."""
    if isinstance(payload, np.ndarray):
        return payload.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(e.encode())) + e.encode() for e in payload)

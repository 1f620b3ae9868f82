"""The Open Inference Protocol (KServe v2) routes, driven by a client nobody here wrote: tritonclient[http]."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.images import decode_image
from service.predictor import load_ensemble
from service.settings import Settings
from testkit.artifacts import CLASSES, free_port, image_bytes, make_ensemble, start_server

BLOBS = [image_bytes("JPEG", size=(64, 48), seed=s) for s in (1, 2)]


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    return make_ensemble(tmp_path_factory.mktemp("v2"))


@pytest.fixture(scope="module")
def expected(ensemble_dir):
    """The blend's own probabilities for BLOBS, without the service."""
    predictor = load_ensemble(ensemble_dir)
    return predictor.predict([decode_image(b, 10_000_000, 48) for b in BLOBS])[0]


@pytest.fixture(scope="module")
def client(ensemble_dir):
    port = free_port()
    server = start_server(["--ensemble", str(ensemble_dir)], port)
    try:
        yield triton.InferenceServerClient(f"127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(30)


def _bytes_input(binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(BLOBS)], "BYTES")
    tensor.set_data_from_numpy(np.array(BLOBS, dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_reads_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("flowers") and client.is_model_ready("flowers", "1")
    assert not client.is_model_ready("flowers", "9")
    metadata = client.get_model_metadata("flowers")
    assert metadata["name"] == "flowers" and metadata["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {"image_bytes": "BYTES", "images": "FP32"}
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]}
    assert client.get_server_metadata()["name"] == "flower-ensemble"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_from_encoded_images(client, expected, binary):
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("flowers", [_bytes_input()], outputs=outputs, request_id="r-7")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    assert result.get_response()["id"] == "r-7" and result.get_response()["model_version"] == "1"


def test_tritonclient_infers_from_fp32_pixels_in_binary_and_in_json(client, expected):
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) for b in BLOBS])
    for binary in (True, False):
        tensor = triton.InferInput("images", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer("flowers", [tensor], model_version="1")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def test_tritonclient_gets_the_top_classes_by_name(client, expected):
    result = client.infer("flowers", [_bytes_input()], outputs=[triton.InferRequestedOutput("probabilities",
                                                                                             class_count=2)])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    for row, probs in zip(top, expected, strict=True):
        order = np.argsort(-probs)[:2]
        assert [e.decode().split(":", 2)[1:] for e in row] == [[str(c), CLASSES[c]] for c in order]
        assert abs(float(row[0].decode().split(":")[0]) - probs[order[0]]) < 1e-5


def test_tritonclient_sees_the_protocols_errors(client):
    with pytest.raises(InferenceServerException, match="'nothing' is not served"):
        client.infer("nothing", [_bytes_input()])
    with pytest.raises(InferenceServerException, match="has no version 4"):
        client.infer("flowers", [_bytes_input()], model_version="4")
    bad = triton.InferInput("image_bytes", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="element 0: the data is not an image"):
        client.infer("flowers", [bad])
    wrong = triton.InferInput("pixels", [1, 2], "INT32")
    wrong.set_data_from_numpy(np.zeros((1, 2), np.int32))
    with pytest.raises(InferenceServerException, match="unexpected inference input 'pixels'"):
        client.infer("flowers", [wrong])


@pytest.mark.parametrize("body,text", [
    ({"inputs": []}, "exactly one tensor"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "not valid base64"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]}, "1 elements"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [300.0] * 12}]}, "0..255"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2, 2], "data": [1.0] * 4}]}, "[N, H, W, 3]"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": ["a", "b", "c"]}]}, "strings"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
      "outputs": [{"name": "logits"}]}, "unexpected inference output"),
    ([1, 2], "JSON object"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [10 ** 400, 1, 1]}]},
     "not pixel values"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [True, 1, 1]}]}, "booleans"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [[1], [1, 2], 3]}]},
     "ragged lists"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
      "outputs": [{"name": "probabilities", "parameters": {"binary_data": "false"}}]}, "true or false"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [["AAAA"], "B"]}]},
     "base64 strings"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [True, 1, 1, 3], "data": [1.0] * 3}]},
     "'shape' must be a list of sizes"),  # a boolean is no size (it was a 500 at the reshape)
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, False], "data": ["AAAA"]}]},
     "'shape' must be a list of sizes"),
])
def test_malformed_infer_requests_get_400_naming_the_problem(ensemble_dir, body, text):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir)))) as c:
        response = c.post("/v2/models/flowers/infer", json=body)
    assert response.status_code == 400 and text in response.json()["error"], response.text


def test_a_refused_request_leaves_the_keep_alive_connection_usable(ensemble_dir):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir)))) as c:
        bad = c.post("/v2/models/flowers/infer", json={"inputs": [{"name": "images", "datatype": "FP32",
                                                                   "shape": [True, 2, 2, 3], "data": [1.0] * 12}]})
        good = c.get("/v2/models/flowers/ready")
    assert bad.status_code == 400 and good.status_code == 200


def test_bodies_that_would_crash_or_cost_too_much_are_refused_with_their_reason(ensemble_dir):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir)))) as c:
        huge = c.post("/v2/models/flowers/infer", content=b'{"id": ' + b"9" * 5000 + b', "inputs": []}')
        assert huge.status_code == 400 and "cannot be read" in huge.json()["error"]  # an int too long to convert
        empty = c.post("/v2/models/flowers/infer", content=b"")
        assert empty.status_code == 400 and empty.json()["error"].startswith("the body is empty")
        head = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2, 2, 3], ' \
               b'"parameters": {"binary_data_size": 40}}]}'
        short = c.post("/v2/models/flowers/infer", content=head + b"\x00" * 40,
                       headers={"Inference-Header-Content-Length": str(len(head))})
        assert short.status_code == 400 and "40 bytes of binary data for shape [1, 2, 2, 3] (48 expected)" in \
            short.json()["error"]
        for odd in ("%C2%B2", "1%0A", "007"):
            assert c.get(f"/v1/models/flowers/versions/{odd}").status_code == 404, odd
            assert c.get(f"/v2/models/flowers/versions/{odd}/ready").status_code == 404, odd


def test_json_base64_images_and_a_cut_binary_body_in_plain_http(ensemble_dir, expected):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir)))) as c:
        body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                            "data": [base64.b64encode(b).decode() for b in BLOBS]}],
                "outputs": [{"name": "probabilities"}, {"name": "top_classes", "parameters": {"top_k": 1}}]}
        answer = c.post("/v2/models/flowers/versions/1/infer", json=body).json()
        probs, top = answer["outputs"]
        np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), expected, atol=1e-6)
        assert top["shape"] == [2, 1] and top["data"][0].endswith(CLASSES[int(np.argmax(expected[0]))])
        head = b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], ' \
               b'"parameters": {"binary_data_size": 40}}]}'
        cut = c.post("/v2/models/flowers/infer", content=head + b"\x00" * 10,
                     headers={"Inference-Header-Content-Length": str(len(head))})
        assert cut.status_code == 400 and "does not match" in cut.json()["error"]
        assert c.get("/v2/models/flowers/versions/2/ready").status_code == 404
        assert httpx.codes.is_success(c.get("/v2/health/live").status_code)

"""The server's memory while it answers one request: a bounded multiple of the request's body, whatever the body
holds (service/bodies.py; docs/SERVING.md, "Limits"). Each test serves one request in process and measures the
peak of the Python and numpy allocations made meanwhile (tracemalloc), so a parse that builds an object per value
shows up however the body is dressed."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from testkit.artifacts import make_ensemble

V2 = "/v2/models/flowers/infer"
TF = "/v1/models/flowers:predict"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(Settings(ensemble=str(make_ensemble(tmp_path_factory.mktemp("memory")))))) as c:
        yield c


def _peak(send: Callable[[], object]) -> tuple[object, int]:
    """What `send` returns, and the peak bytes allocated while it ran."""
    tracemalloc.start()
    try:
        answer = send()
        return answer, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _pixels_json(side: int, datatype: bytes, value: bytes = b"100.5") -> bytes:
    """An FP32 [1, side, side, 3] tensor as JSON numbers (`value` each), its datatype written as given."""
    data = b",".join([value] * (3 * side * side))
    return (b'{"inputs": [{"name": "images", "datatype": "' + datatype + b'", "shape": [1, %d, %d, 3], '
            b'"data": [' % (side, side) + data + b"]}]}")


def test_fp32_pixels_as_json_numbers_cost_a_few_times_their_text_however_the_datatype_is_written(client):
    # Pixels out of range: the whole tensor is parsed, then refused, before any image work. "FP32" escaped is the
    # same JSON (a search of the raw body for "FP32" let it through to be parsed as Python floats: 10 x the body).
    body = _pixels_json(400, b"\\u0046P32", b"300.5")  # 2.9 MB
    answer, peak = _peak(lambda: client.post(V2, content=body))
    assert peak < 2.5 * len(body), f"{peak / len(body):.1f} x the body"  # 1 x of it: the test client's copy
    assert answer.status_code == 400 and "0..255" in answer.json()["error"], answer.text
    pixels = np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3)).astype(np.float32)
    text = _pixels_json(40, b"\\u0046P32").replace(b"100.5,", b"%d,").replace(b"100.5", b"%d") % \
        tuple(pixels.reshape(-1).astype(int))
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 40, 40, 3],
                                   "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    binary = client.post(V2, content=head + pixels.tobytes(), headers={"Inference-Header-Content-Length":
                                                                       str(len(head))})
    assert client.post(V2, content=text).json()["outputs"] == binary.json()["outputs"]


@pytest.mark.parametrize("route,body", [
    (TF, b'{"instances": [' + b",".join([b'{"b64": "AA=="}'] * 200_000) + b"]}"),
    (TF, b'{"inputs": {"image_bytes": [' + b",".join([b'"AA=="'] * 200_000) + b"]}}"),
    (V2, b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ['
         + b",".join([b'"AA=="'] * 200_000) + b"]}]}"),
])
def test_a_body_of_many_tiny_values_is_refused_before_they_are_built(client, route, body):
    answer, peak = _peak(lambda: client.post(route, content=body))
    assert peak < 1.5 * len(body), f"{peak / len(body):.1f} x the body"  # the test client's copy; built: 5-20 x
    assert answer.status_code == 413 and "more than the 10000 a request needs" in answer.json()["error"], answer.text


def test_binary_bytes_elements_past_the_declared_shape_are_not_read(client):
    elements = struct.pack("<I", 2) + b"AB"
    binary = elements * 200_000
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(binary)}}]}).encode()
    content, headers = head + binary, {"Inference-Header-Content-Length": str(len(head))}
    answer, peak = _peak(lambda: client.post(V2, content=content, headers=headers))
    assert peak < 1.5 * len(content), f"{peak / len(content):.1f} x the body"  # one bytes object each: 8 x
    assert answer.status_code == 400 and "more than 2 elements for shape [1]" in answer.json()["error"], answer.text


@pytest.mark.parametrize("odd,problem", [
    ("", "an element is missing"), ("[]", "an element is missing"), ("1e", "an element is not a number"),
    ("1 1", "an element is not a number"), ("1e39", "finite RGB values in 0..255"),  # float32 overflow: infinite
    (None, "an element is missing"),  # a trailing comma
    ("+1", "as JSON writes one"), (".5", "as JSON writes one"), ("1.", "as JSON writes one"),  # numpy reads them
    ("01", "as JSON writes one"), ("-05", "as JSON writes one"), ("1.e2", "as JSON writes one"),
])
def test_a_long_array_of_numbers_read_straight_into_float32_is_checked_as_json_would_be(client, odd, problem):
    values = ["1"] * 1203  # [1, 1, 401, 3]: 2.4 KB of JSON, read as `Numbers`
    values[-1 if odd is None else 700] = "" if odd is None else odd
    body = (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 401, 3], "data": [[%s]]}]}'
            % ",".join(values).encode())
    answer = client.post(V2, content=body)
    assert answer.status_code == 400 and problem in answer.json()["error"], answer.text


def test_a_string_that_looks_like_a_long_array_of_numbers_stays_a_string(client):
    note = "[" + ",".join(["1"] * 600) + "]"  # 1.2 KB: long enough to be cut out, were it not inside a string
    body = {"id": note, "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}]}
    answer = client.post(V2, content=json.dumps(body).encode())
    assert answer.status_code == 200 and answer.json()["id"] == note, answer.text

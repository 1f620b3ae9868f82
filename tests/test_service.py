"""The service: every endpoint, bad input, batching, parity with the SavedModel, readiness, API key."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from PIL import Image

from core.photos import load_rgb, to_rgb
from service.app import create_app
from service.images import ImageError, decode_image
from service.predictor import ArtifactError, load_ensemble, load_run
from service.repository import MODEL_NAME_RULE
from service.settings import Settings
from testkit.artifacts import CLASSES, free_port, image_bytes, make_ensemble, start_server


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    return make_ensemble(tmp_path_factory.mktemp("service"))


def _client(settings: Settings, ensemble=None) -> TestClient:
    return TestClient(create_app(settings, ensemble))


def _wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("service never became ready")


@pytest.fixture(scope="module")
def client(ensemble_dir):
    settings = Settings(ensemble=str(ensemble_dir), max_images=4, max_image_bytes=200_000, max_pixels=2_000_000,
                        max_wait_ms=2)
    with _client(settings) as c:
        _wait_ready(c)
        yield c


def _files(*blobs: bytes, name: str = "files"):
    return [(name, (f"image{i}.bin", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


# --- predict -------------------------------------------------------------------------------------

def test_predict_answers_top_classes_per_image(client):
    response = client.post("/v1/predict", files=_files(image_bytes(), image_bytes("PNG", seed=1)),
                           data={"top_k": "3", "include_probabilities": "true", "include_members": "true"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "flowers" and body["classes"] == 4 and len(body["results"]) == 2
    for result in body["results"]:
        assert result["ok"] and len(result["top"]) == 3
        probs = [t["probability"] for t in result["top"]]
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(result["probabilities"]) - 1) < 1e-4
        assert {t["name"] for t in result["top"]} <= set(CLASSES)
        assert [m["member"] for m in result["members"]] == ["m32", "m48"]


def test_without_options_an_answer_has_five_top_classes_and_no_probabilities_or_members(client):
    response = client.post("/v1/predict", files=_files(image_bytes()))
    assert response.status_code == 200
    assert {k: v for k, v in response.json().items() if k != "results"} == {"model": "flowers", "version": 1,
                                                                             "classes": 4}
    result = response.json()["results"][0]
    assert result["ok"] and len(result["top"]) == 4  # the default top_k (5), capped at the 4 classes
    assert "probabilities" not in result and "members" not in result
    flags = {"include_probabilities": "false", "include_members": "off"}
    result = client.post("/v1/predict", files=_files(image_bytes()), data=flags).json()["results"][0]
    assert "probabilities" not in result and "members" not in result


def test_one_bad_image_fails_only_its_own_entry(client):
    response = client.post("/v1/predict", files=_files(image_bytes(), b"not an image", image_bytes("GIF")))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"]["kind"] == "not_an_image"
    assert [r["filename"] for r in results] == ["image0.bin", "image1.bin", "image2.bin"]  # failed entries too


def test_an_image_whose_header_reads_but_whose_data_is_cut_fails_only_its_own_entry(client):
    # The header passes the pixel count; the damage is met while decoding, after the request was admitted.
    blob = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)), "JPEG")
    response = client.post("/v1/predict", files=_files(image_bytes(), blob[: len(blob) * 2 // 3], image_bytes()))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"]["kind"] == "corrupt" and "truncated or corrupt" in results[1]["error"]["message"]


@pytest.mark.parametrize("fmt,mode,extra", [
    ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
    ("PNG", "I;16", {}), ("GIF", "P", {}), ("BMP", "RGB", {}), ("WEBP", "RGB", {}), ("PNG", "LA", {}),
])
def test_every_supported_kind_of_image_becomes_rgb(fmt, mode, extra):
    blob = image_bytes(fmt, mode=mode, **extra)
    array = decode_image(blob, 10_000_000)
    assert array.dtype == np.uint8 and array.shape == (48, 64, 3)


def test_an_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    array = decode_image(buffer.getvalue(), 10_000)
    assert array[0, 0, 0] > 200 and array[0, 0, 2] < 50


def test_exif_orientation_is_honoured():
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo held upright: rotate 90 degrees on display
    blob = image_bytes("JPEG", size=(64, 48), exif=exif)
    assert decode_image(blob, 10_000_000).shape == (64, 48, 3)


@pytest.mark.parametrize("blob,kind", [
    (b"", "empty"), (b"hello world", "not_an_image"), (image_bytes()[:300], "corrupt"),
    (image_bytes("TIFF"), "unsupported_format"), (image_bytes("PNG", size=(3000, 3000)), "too_many_pixels"),
])
def test_bad_images_are_named(blob, kind):
    with pytest.raises(ImageError) as err:
        decode_image(blob, 2_000_000)
    assert err.value.kind == kind


def test_bad_images_are_named_a_jpeg_cut_short_after_its_header_too():
    # Its header reads (PIL), so TensorFlow's decoder meets the damage: a plain "corrupt", without its node names.
    blob = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)), "JPEG")
    with pytest.raises(ImageError) as err:
        decode_image(blob[: len(blob) * 2 // 3], 10_000_000)
    assert err.value.kind == "corrupt"
    assert err.value.message == ("the JPEG is truncated or corrupt "
                                 "(jpeg::Uncompress failed. Invalid JPEG data or crop window.)")


@pytest.mark.parametrize("request_kwargs,status,kind,says", [
    ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "no_files",
     "no images: send one or more files in the multipart field 'files'"),
    ({"content": b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed_multipart", None),
    ({"json": {"files": "x"}}, 415, "unsupported_media_type",
     "send images as multipart/form-data with field 'files'"),
    ({"content": b"raw bytes without a content type"}, 415, "unsupported_media_type", None),
    ({"files": _files(image_bytes(), name="file")}, 400, "unknown_field",
     "unknown form field(s) ['file']; images go in field 'files', options are "
     "['include_members', 'include_probabilities', 'top_k']"),
    ({"files": _files(image_bytes()) + _files(b"2", name="top_k")}, 400, "unknown_field",
     "only field 'files' may hold files"),
    ({"data": {"top_k": "2"}, "files": []}, 415, "unsupported_media_type", None),
    ({"files": _files(*[image_bytes()] * 5)}, 400, "too_many_images", "5 images in one request; the limit is 4"),
    ({"files": _files(image_bytes()), "data": {"top_k": "0"}}, 422, "invalid_option", None),
    ({"files": _files(image_bytes()), "data": {"top_k": "99"}}, 422, "invalid_option", None),
    ({"files": _files(image_bytes()), "data": {"top_k": "two"}}, 422, "invalid_option", None),
    ({"files": _files(image_bytes()), "data": {"include_members": "maybe"}}, 422, "invalid_option", None),
    ({"content": b"--x\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\ntext\r\n--x--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "not_a_file",
     "field 'files' must hold file uploads, not text values"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(client, request_kwargs, status, kind, says):
    response = client.post("/v1/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["kind"] == kind
    if says is not None:  # the message tells the client what to send instead
        assert response.json()["error"]["message"] == says
    assert client.post("/v1/predict", files=_files(image_bytes())).status_code == 200


def test_far_too_many_files_are_refused_as_too_many_images(client):
    response = client.post("/v1/predict", files=_files(*[b"x"] * 9))
    assert response.status_code == 400 and response.json()["error"]["kind"] == "too_many_images"


def test_the_parser_stops_at_one_file_past_the_image_limit_and_a_few_fields_past_the_options(client):
    # Memory guards: a body of many parts is not parsed to its end. 5 files (limit 4) parse and are counted;
    # the 6th stops the parser. 8 text fields parse (the 4 form fields + 4); the 9th stops it.
    response = client.post("/v1/predict", files=_files(*[b"x"] * 6))
    assert response.status_code == 400 and response.json()["error"] == {
        "kind": "too_many_images", "message": "more than 4 images in one request"}
    response = client.post("/v1/predict", files=_files(b"x"), data={f"field{i}": "1" for i in range(9)})
    assert response.status_code == 400 and response.json()["error"]["kind"] == "malformed_multipart"
    assert "Too many fields" in response.json()["error"]["message"]
    response = client.post("/v1/predict", files=_files(b"x"), data={f"field{i}": "1" for i in range(8)})
    assert response.status_code == 400 and response.json()["error"]["kind"] == "unknown_field"


def test_an_image_over_the_size_limit_fails_its_entry(client):
    big = image_bytes("BMP", size=(300, 300))  # 270 kB > 200 kB limit
    results = client.post("/v1/predict", files=_files(big, image_bytes())).json()["results"]
    assert results[0]["error"]["kind"] == "too_large" and results[1]["ok"]


def test_a_huge_request_is_refused_by_its_length(client):
    response = client.post("/v1/predict", content=b"x" * 1_000_000,
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.json()["error"]["kind"] == "request_too_large"


# --- TensorFlow-Serving routes -------------------------------------------------------------------

def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def test_tf_serving_predict_in_row_and_columnar_form(client):
    blobs = [image_bytes(seed=3), image_bytes("PNG", seed=4)]
    rows = client.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(b)} for b in blobs]})
    assert rows.status_code == 200
    predictions = rows.json()["predictions"]
    assert len(predictions) == 2 and all(len(p) == 4 and abs(sum(p) - 1) < 1e-4 for p in predictions)
    named = client.post("/v1/models/flowers:predict",
                        json={"instances": [{"image_bytes": {"b64": _b64(b)}} for b in blobs]})
    columns = client.post("/v1/models/flowers:predict", json={"inputs": {"image_bytes": [{"b64": _b64(b)}
                                                                                        for b in blobs]}})
    np.testing.assert_allclose(named.json()["predictions"], predictions, atol=1e-6)
    np.testing.assert_allclose(columns.json()["outputs"], predictions, atol=1e-6)


@pytest.mark.parametrize("body,status,text", [
    (b"{not json", 400, "not valid JSON"), (b'{"instances": [{"b64": "@@@"}]}', 400, "not valid base64"),
    (b'{"instances": []}', 400, "non-empty list"), (b'{"x": 1}', 400, "'instances'"),
    (b'[1, 2]', 400, "JSON object"), (b'{"instances": [{"b64": "aGVsbG8="}]}', 400, "instance 0: the data is not"),
    (b'{"instances": [1]}', 400, "instance 0: expected"),
])
def test_tf_serving_errors_use_its_error_shape(client, body, status, text):
    response = client.post("/v1/models/flowers:predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and text in response.json()["error"]


def test_tf_serving_status_metadata_and_unknown_models(client):
    status = client.get("/v1/models/flowers").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = client.get("/v1/models/flowers/metadata").json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert signature["outputs"]["probabilities"]["tensor_shape"]["dim"][1]["size"] == "4"
    assert client.get("/v1/models/other").status_code == 404
    assert "error" in client.post("/v1/models/other:predict", json={"instances": []}).json()


def test_unpadded_and_line_wrapped_base64_is_accepted_by_both_json_protocols(client):
    padded = _b64(image_bytes("PNG", seed=6))
    assert padded.endswith("=")  # the test needs an image whose base64 has padding to leave out
    wrapped = "\n".join(padded[i:i + 76] for i in range(0, len(padded), 76)) + "\n"  # as base64(1) writes it
    expected = client.post("/v1/models/flowers:predict", json={"instances": [{"b64": padded}]}).json()["predictions"]
    for text in (padded.rstrip("="), wrapped, wrapped.replace("=", "").replace("\n", "\r\n")):
        tf_answer = client.post("/v1/models/flowers:predict", json={"instances": [{"b64": text}]})
        assert tf_answer.status_code == 200, tf_answer.text
        np.testing.assert_allclose(tf_answer.json()["predictions"], expected, atol=1e-6)
        v2_answer = client.post("/v2/models/flowers/infer", json={"inputs": [
            {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [text]}]})
        assert v2_answer.status_code == 200, v2_answer.text
        np.testing.assert_allclose(v2_answer.json()["outputs"][0]["data"], expected[0], atol=1e-6)
    for bad in ("QUFBQ", "QUF BQ==x", "@@@@"):  # no padding can complete 5 characters; a character outside base64
        tf_refusal = client.post("/v1/models/flowers:predict", json={"instances": [{"b64": bad}]})
        assert tf_refusal.status_code == 400 and "not valid base64" in tf_refusal.json()["error"], bad
        v2_refusal = client.post("/v2/models/flowers/infer", json={"inputs": [
            {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [bad]}]})
        assert v2_refusal.status_code == 400 and "not valid base64" in v2_refusal.json()["error"], bad



@pytest.mark.parametrize("sent,reason", [
    ("data:image/png;base64,", "a data URI (send only the text after 'base64,')"),
    ("url-safe", "'-' or '_' of URL-safe base64 (send standard base64, with '+' and '/')"),
])
def test_a_data_uri_or_url_safe_base64_is_refused_by_both_json_protocols_saying_which_it_is(client, sent, reason):
    blob = image_bytes("PNG", seed=6)
    text = sent + _b64(blob) if sent.startswith("data:") else base64.urlsafe_b64encode(blob).decode()
    assert "-" in text or "_" in text or sent.startswith("data:")  # the image's base64 needs one of '+' '/'
    tf_refusal = client.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(blob)}, {"b64": text}]})
    assert tf_refusal.status_code == 400
    assert tf_refusal.json()["error"] == f"instance 1: 'b64' is not valid base64: {reason}"
    v2_refusal = client.post("/v2/models/flowers/infer", json={"inputs": [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": [_b64(blob), text]}]})
    assert v2_refusal.status_code == 400
    assert v2_refusal.json()["error"] == f"input 'image_bytes': element 1 is not valid base64: {reason}"


# --- operations -------------------------------------------------------------------------------

def test_health_metrics_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    text = client.get("/metrics").text
    assert 'flower_requests_total{method="POST",route="/v1/predict"' in text
    assert "flower_batch_size_images_bucket" in text and 'flower_errors_total{kind="not_an_image"}' in text
    page = client.get("/")
    assert page.status_code == 200 and "v1/predict" in page.text and 'type="file"' in page.text


def test_head_is_answered_wherever_get_is_with_the_same_headers_and_no_body(client):
    for path in ("/", "/healthz", "/readyz", "/v1/models/flowers", "/v1/models/flowers/metadata", "/v1/models/no",
                 "/v2/health/ready", "/v2/models/flowers", "/docs", "/openapi.json"):
        get, head = client.get(path), client.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert head.headers["content-length"] == get.headers["content-length"], path
    assert client.head("/metrics").status_code == 200
    assert 'flower_requests_total{method="HEAD",route="/healthz",status="200"}' in client.get("/metrics").text
    refused = client.head("/v1/predict")  # POST only: refused as a GET is, saying what is allowed
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"


def test_openapi_documents_every_route_with_examples(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/predict", "/v1/models/{name}:predict", "/v1/models/{name}", "/v1/models/{name}/metadata",
                 "/healthz", "/readyz", "/metrics", "/"):
        assert path in paths
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == {"files", "top_k", "include_probabilities", "include_members"}
    assert "example" in paths["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]["application/json"]
    assert schema["components"]["schemas"]["PredictResponse"].get("examples")


class SlowEnsemble:
    """A stand-in ensemble whose warm-up waits for a signal."""

    classes = CLASSES

    def __init__(self):
        self.release = threading.Event()
        self.members = [type("M", (), {"name": "slow"})()]
        self.warmed_up = set()

    @property
    def ready(self):
        return self.warmed_up == {"slow"}

    def warm_up(self):
        self.release.wait(10)
        self.warmed_up = {"slow"}

    def predict(self, images):
        probs = np.full((len(images), 4), 0.25, np.float32)
        return probs, probs[None]


def test_not_ready_until_every_member_has_warmed_up():
    slow = SlowEnsemble()
    with _client(Settings(run="unused"), slow) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["ready"] is False
        assert c.post("/v1/predict", files=_files(image_bytes())).json()["error"]["kind"] == "not_ready"
        assert c.get("/v1/models/flowers").json()["model_version_status"][0]["state"] == "LOADING"
        slow.release.set()
        _wait_ready(c)
        assert c.get("/readyz").json() == {"ready": True, "members": ["slow"], "warmed_up": ["slow"],
                                           "models": {"flowers": {"1": "AVAILABLE"}}, "default_model": "flowers"}


class FailingEnsemble(SlowEnsemble):
    """A stand-in ensemble whose warm-up raises."""

    def warm_up(self):
        raise RuntimeError("the SavedModel cannot run on this device")


def test_a_failed_warm_up_is_logged_and_readyz_says_why(caplog):
    with caplog.at_level(logging.ERROR, logger="service"), _client(Settings(run="unused"), FailingEnsemble()) as c:
        warm_task = c.app.state.service.warm_task
        for _ in range(200):
            if warm_task.done():
                break
            time.sleep(0.05)
        response = c.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "members": ["slow"], "warmed_up": [],
                                   "error": "the warm-up prediction failed: RuntimeError: the SavedModel cannot run "
                                            "on this device", "models": {"flowers": {"1": "END"}},
                                   "default_model": "flowers"}
        assert c.get("/healthz").status_code == 200
    logged = [r for r in caplog.records if r.name.startswith("service") and r.exc_info]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert logged[0].exc_info[0] is RuntimeError and "warm-up" in logged[0].getMessage()


def test_the_api_key_protects_prediction_routes(ensemble_dir):
    with _client(Settings(ensemble=str(ensemble_dir), api_key="s3cret")) as c:
        _wait_ready(c)
        assert c.post("/v1/predict", files=_files(image_bytes())).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert c.post("/v1/predict", files=_files(image_bytes()), headers=wrong).json()["error"]["kind"] == \
            "unauthorized"
        right = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/predict", files=_files(image_bytes()), headers=right).status_code == 200
        assert c.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(image_bytes())}]}
                      ).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_an_api_key_read_with_a_newline_matches_and_one_no_header_can_carry_is_refused_at_start(ensemble_dir):
    with _client(Settings(ensemble=str(ensemble_dir), api_key="s3cret\n")) as c:  # a secret file's last newline
        _wait_ready(c)
        right = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/predict", files=_files(image_bytes()), headers=right).status_code == 200
    for key in ("", "  \n", "clé", "two words", "tab\there"):
        with pytest.raises(ValueError, match="the API key"):
            Settings(ensemble=str(ensemble_dir), api_key=key)


BEHIND_THE_KEY = ("/", "/docs", "/openapi.json", "/metrics", "/v1/models/flowers", "/v1/models/flowers/metadata",
                  "/v2/models/flowers", "/v2/health/ready", "/no/such/route")


def test_protect_all_puts_every_route_but_health_and_readiness_behind_the_api_key():
    ensemble = SlowEnsemble()
    ensemble.release.set()
    with _client(Settings(run="unused", api_key="s3cret", protect="all"), ensemble) as c:
        _wait_ready(c)
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json() == {"ready": True}  # no model, member, state or reason without the key
        for path in BEHIND_THE_KEY:
            response = c.get(path)
            assert response.status_code == 401 and response.json()["error"]["kind"] == "unauthorized", path
            assert response.headers["www-authenticate"] == "Bearer"
        key = {"Authorization": "Bearer s3cret"}
        assert c.get("/readyz", headers=key).json()["models"] == {"flowers": {"1": "AVAILABLE"}}
        for path in ("/", "/docs", "/openapi.json", "/metrics", "/v1/models/flowers", "/v2/health/ready"):
            assert c.get(path, headers=key).status_code == 200, path


def test_protect_all_without_a_key_and_an_unknown_protect_value_are_refused_at_start(tmp_path, served, capsys,
                                                                                     monkeypatch):
    from flower.commands.serve import main

    assert main(["--run", str(tmp_path), "--protect", "all"]) == 2
    assert main(["--run", str(tmp_path), "--protect", "everything"]) == 2
    monkeypatch.setenv("FLOWER_PROTECT", "all")
    assert main(["--run", str(tmp_path)]) == 2
    no_key = "error: --protect: Value error, 'all' needs an API key (--api-key or FLOWER_API_KEY); without one no " \
             "route is protected"
    assert capsys.readouterr().err.splitlines() == [no_key, "error: --protect: Input should be 'predict' or 'all'",
                                                    no_key]
    assert served == []
    assert main(["--run", str(tmp_path), "--api-key", "k"]) == 0 and served[0].protect == "all"


@pytest.mark.parametrize("name", ["", "a/b", "a:predict", "two words"])
def test_a_model_name_the_routes_cannot_carry_is_refused_at_start_naming_it_and_the_rule(name, tmp_path, served,
                                                                                          capsys, monkeypatch):
    from flower.commands.serve import main

    line = f"error: --model-name: Value error, model name {name!r} cannot be served: {MODEL_NAME_RULE}"
    assert main(["--run", str(tmp_path), "--model-name", name]) == 2
    monkeypatch.setenv("FLOWER_MODEL_NAME", name)
    assert main(["--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [line, line] and served == []


# --- loading ------------------------------------------------------------------------------------

def test_loading_refuses_artifacts_that_break_the_contract(ensemble_dir, tmp_path):
    document = json.loads((ensemble_dir / "ensemble.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ensemble.json").write_text(json.dumps({**document, "version": 2}))
    with pytest.raises(ArtifactError, match="version 2"):
        load_ensemble(bad)
    members = [{**m, "path": str((ensemble_dir / m["path"]).resolve())} for m in document["members"]]
    (bad / "ensemble.json").write_text(json.dumps({**document, "members": members, "classes": ["a", "b", "c", "d"]}))
    with pytest.raises(ArtifactError, match="other classes"):
        load_ensemble(bad)
    with pytest.raises(ArtifactError, match="run directory not found"):
        load_run(tmp_path / "nothing")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    (empty_run / "member.json").write_text('{"image_size": 32}')
    (empty_run / "classes.json").write_text('["a"]')
    with pytest.raises(ArtifactError, match="not a SavedModel"):
        load_run(empty_run)


# --- parity with the SavedModel ------------------------------------------------------------------

def test_service_probabilities_equal_the_saved_models_on_the_same_files(client, ensemble_dir):
    blobs = [image_bytes("JPEG", size=(32, 32), seed=5), image_bytes("JPEG", size=(90, 70), seed=6, quality=80),
             image_bytes("PNG", size=(48, 48), seed=7)]
    served = client.post("/v1/predict", files=_files(*blobs), data={"include_probabilities": "true"}).json()
    document = json.loads((ensemble_dir / "ensemble.json").read_text())
    expected = 0
    for member, weight in zip(document["members"], document["blend"]["weights"], strict=True):
        model = tf.saved_model.load(str((ensemble_dir / member["path"] / "saved_model").resolve()))
        expected = expected + weight * model.signatures["serving_default"](
            image_bytes=tf.constant(blobs))["probabilities"].numpy()
    got = np.array([r["probabilities"] for r in served["results"]])
    assert np.abs(got - expected).max() < 1e-4


# --- a real uvicorn process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(ensemble_dir):
    port = free_port()
    process = start_server(["--ensemble", str(ensemble_dir), "--max-wait-ms", "20", "--max-batch-size", "16"], port)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_concurrent_requests_are_batched_but_each_gets_its_own_answer(server):
    blobs = [image_bytes("PNG", seed=100 + i) for i in range(12)]
    alone = [httpx.post(f"{server}/v1/predict", files=_files(b), data={"include_probabilities": "true"}).json()
             for b in blobs]

    def ask(blob):
        return httpx.post(f"{server}/v1/predict", files=_files(blob), data={"include_probabilities": "true"},
                          timeout=30).json()

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, blobs))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a["results"][0]["probabilities"], b["results"][0]["probabilities"], atol=1e-5)
    metrics = httpx.get(f"{server}/metrics").text
    singles = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith('flower_batch_size_images_bucket{le="1.0"}')))
    batches = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("flower_batch_size_images_count")))
    assert batches < 24  # 12 alone + fewer than 12 for the concurrent ones: some were gathered
    assert singles < batches


def test_the_server_stays_responsive_to_health_checks_under_load(server):
    blob = image_bytes("JPEG", size=(200, 200))
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            httpx.post(f"{server}/v1/predict", files=_files(blob), timeout=30)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(5):
            start = time.perf_counter()
            assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - start)
        assert max(latencies) < 1.0
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_the_command_refuses_bad_settings(tmp_path):
    from flower.commands.serve import main

    assert main(["--run", str(tmp_path / "missing")]) == 2
    assert main([]) == 2


def test_a_request_cannot_name_a_file_on_the_server(client):
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "flowers%2F..%2F..%2Fsecret"):
        response = client.get(f"/v1/models/{name}/metadata")
        assert response.status_code == 404
    upload = client.post("/v1/predict", files=[("files", ("../../etc/passwd", image_bytes(), "image/jpeg"))])
    assert upload.status_code == 200 and upload.json()["results"][0]["filename"] == "../../etc/passwd"


# --- the exact pixels the service decodes ----------------------------------------------------------

@pytest.mark.parametrize("size,quality", [((64, 48), 95), ((90, 70), 70), ((33, 17), 50)])
def test_a_plain_jpeg_decodes_to_the_training_pipelines_and_pils_exact_pixels(size, quality):
    from imaging.records import decode_jpeg

    for mode in ("RGB", "L"):
        blob = image_bytes("JPEG", size=size, seed=size[0], mode=mode, quality=quality)
        decoded = decode_image(blob, 10_000_000)
        np.testing.assert_array_equal(decoded, decode_jpeg(blob, size[::-1]).numpy() if size[0] == size[1] else
                                      tf.io.decode_jpeg(blob, channels=3, dct_method="INTEGER_ACCURATE").numpy())
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_exif_orientation_puts_a_marked_corner_where_the_viewer_sees_it():
    base = np.zeros((48, 64, 3), np.uint8)
    base[:12, :12] = (255, 0, 0)  # red top-left corner as stored
    # orientation -> where the stored top-left corner appears on display (rows, columns of the shown image)
    expected = {1: (slice(0, 8), slice(0, 8)), 3: (slice(-8, None), slice(-8, None)),
                6: (slice(0, 8), slice(-8, None)), 8: (slice(-8, None), slice(0, 8))}
    for orientation, (rows, cols) in expected.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        decoded = decode_image(_encode(Image.fromarray(base), "JPEG", quality=95, exif=exif), 10_000_000)
        assert decoded.shape == ((48, 64, 3) if orientation in (1, 3) else (64, 48, 3))
        corner = decoded[rows, cols].astype(int)
        assert (corner[..., 0] > 200).all() and (corner[..., 1:] < 60).all(), orientation
        assert decoded.astype(int)[..., 0].sum() < 255 * 12 * 12 * 1.2  # only one red corner


def test_alpha_cmyk_and_16_bit_images_get_known_pixel_values():
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    np.testing.assert_array_equal(decode_image(_encode(half_red, "PNG"), 1000)[0, 0], [255, 127, 127])  # on white
    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    np.testing.assert_array_equal(decode_image(_encode(grey_alpha, "PNG"), 1000)[0, 0], [255, 255, 255])
    cmyk_red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    assert np.abs(decode_image(_encode(cmyk_red, "JPEG", quality=95), 1000)[4, 4].astype(int) - [255, 0, 0]).max() < 6
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    np.testing.assert_array_equal(decode_image(_encode(palette, "PNG"), 1000)[0, 0], [10, 200, 30])
    grey = Image.new("L", (8, 8), 77)
    np.testing.assert_array_equal(decode_image(_encode(grey, "PNG"), 1000)[0, 0], [77, 77, 77])


def test_each_image_gets_its_own_member_votes(client, ensemble_dir):
    blobs = [image_bytes("PNG", size=(40, 40), seed=s) for s in (21, 22, 23)]
    served = client.post("/v1/predict", files=_files(*blobs), data={"include_members": "true",
                                                                   "include_probabilities": "true"}).json()
    document = json.loads((ensemble_dir / "ensemble.json").read_text())
    for m, entry in enumerate(document["members"]):
        model = tf.saved_model.load(str((ensemble_dir / entry["path"] / "saved_model").resolve()))
        probs = model.signatures["serving_default"](image_bytes=tf.constant(blobs))["probabilities"].numpy()
        votes = [r["members"][m] for r in served["results"]]
        assert [v["member"] for v in votes] == [entry["name"]] * 3
        assert [v["index"] for v in votes] == probs.argmax(1).tolist()
        np.testing.assert_allclose([v["probability"] for v in votes], probs.max(1), atol=1e-5)
    assert len({r["members"][0]["probability"] for r in served["results"]}) == 3  # the images differ


def test_top_classes_are_the_largest_blended_probabilities_in_order(client):
    body = client.post("/v1/predict", files=_files(image_bytes("PNG", seed=31), image_bytes("PNG", seed=32)),
                       data={"include_probabilities": "true", "top_k": "4"}).json()
    for result in body["results"]:
        probs = np.array(result["probabilities"])
        assert [t["index"] for t in result["top"]] == np.argsort(-probs, kind="stable").tolist()
        assert [t["name"] for t in result["top"]] == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([t["probability"] for t in result["top"]], np.sort(probs)[::-1], atol=1e-7)
    assert body["results"][0]["probabilities"] != body["results"][1]["probabilities"]


@pytest.mark.parametrize("values", [np.full((8, 8), 3000), np.arange(0, 65536, 1024).reshape(8, 8)],
                         ids=["constant-3000", "gradient"])
def test_a_16_bit_png_gets_the_same_pixels_in_the_import_tool_and_the_service(values):
    blob = _encode(Image.fromarray(values.astype(np.uint16)), "PNG")
    assert Image.open(io.BytesIO(blob)).mode == "I;16"  # really a 16-bit file
    expected = np.repeat(np.rint(values * 255 / 65535)[..., None], 3, axis=2)  # full 16-bit range -> 0..255
    imported = np.asarray(load_rgb(blob)).astype(int)
    served = decode_image(blob, 1000).astype(int)
    np.testing.assert_array_equal(imported, served)
    assert np.abs(served - expected).max() <= 1
    as_32_bit = np.asarray(to_rgb(Image.fromarray(values.astype(np.int32)))).astype(int)  # mode "I": 16-bit values
    assert np.abs(as_32_bit - expected).max() <= 1


# --- ensemble.json entries checked against the blend and the members ---------------------------------

def _write_ensemble(ensemble_dir, tmp_path, change) -> object:
    """A copy of the test ensemble.json (absolute member paths) with `change(document)` applied."""
    document = json.loads((ensemble_dir / "ensemble.json").read_text())
    document["members"] = [{**m, "path": str((ensemble_dir / m["path"]).resolve())} for m in document["members"]]
    change(document)
    file = tmp_path / "ensemble.json"
    file.write_text(json.dumps(document))
    return file


def _set(**values):
    return lambda document: document.update(values)


@pytest.mark.parametrize("change,index", [
    (lambda d: d["members"].__setitem__(1, "m48"), 1),
    (lambda d: d["members"][0].pop("path"), 0),
    (lambda d: d["members"][0].update(path=7), 0),
    (lambda d: d["members"][1].update(name=None), 1),
    (lambda d: d["members"][1].pop("name"), 1),
    (lambda d: d["members"][0].update(weight="0.3"), 0),
])
def test_a_malformed_members_entry_is_an_artifact_error_naming_file_and_index(ensemble_dir, tmp_path, change, index):
    file = _write_ensemble(ensemble_dir, tmp_path, change)
    with pytest.raises(ArtifactError, match=rf"ensemble\.json: members\[{index}\]"):
        load_ensemble(file)


@pytest.mark.parametrize("change,text", [
    (_set(classes=[1, 2, 3, 4]), "'classes' must be"), (_set(classes="abcd"), "'classes' must be"),
    (_set(classes=None), "'classes' must be"),
])
def test_classes_that_are_not_strings_are_an_artifact_error(ensemble_dir, tmp_path, change, text):
    with pytest.raises(ArtifactError, match=text):
        load_ensemble(_write_ensemble(ensemble_dir, tmp_path, change))


def test_an_ensemble_json_that_is_not_an_object_is_an_artifact_error(tmp_path):
    (tmp_path / "ensemble.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        load_ensemble(tmp_path)


def test_swapped_member_paths_are_refused_naming_both_members(ensemble_dir, tmp_path):
    def swap(document):
        first, second = document["members"]
        first["path"], second["path"] = second["path"], first["path"]

    with pytest.raises(ArtifactError, match=r"members\[0\] is named 'm32'.*holds member 'm48'"):
        load_ensemble(_write_ensemble(ensemble_dir, tmp_path, swap))


def test_the_member_name_falls_back_to_the_folder_name(ensemble_dir, tmp_path):
    import shutil

    run = tmp_path / "runs" / "folder32"
    shutil.copytree((ensemble_dir / "../runs/m32").resolve(), run)
    member = json.loads((run / "member.json").read_text())
    del member["name"]
    (run / "member.json").write_text(json.dumps(member))

    def point(name):
        return lambda document: document["members"][0].update(path=str(run), name=name)

    (tmp_path / "a").mkdir()
    assert load_ensemble(_write_ensemble(ensemble_dir, tmp_path / "a", point("folder32"))).members[0].name == \
        "folder32"
    with pytest.raises(ArtifactError, match="named 'm32'.*holds member 'folder32'"):
        load_ensemble(_write_ensemble(ensemble_dir, tmp_path / "a", point("m32")))


def test_a_member_weight_must_agree_with_the_blend_weights(ensemble_dir, tmp_path):
    def weight(value):
        return lambda document: document["members"][1].update(weight=value)

    with pytest.raises(ArtifactError, match=r"members\[1\] \('m48'\) has weight 0.6.*blend.weights\[1\] is 0.7"):
        load_ensemble(_write_ensemble(ensemble_dir, tmp_path, weight(0.6)))
    assert load_ensemble(_write_ensemble(ensemble_dir, tmp_path, weight(0.7 + 1e-9))).blend.weights == (0.3, 0.7)


def _stack(classes: int):
    blend = {"method": "stack", "features": "log", "C": 1.0, "coef": [[1.0] * classes, [0.5] * classes],
             "intercept": [0.0] * classes}

    def change(document):
        document["blend"] = blend
        for member in document["members"]:
            member["weight"] = None

    return change


def test_a_stack_blend_loads_with_null_weights_and_needs_one_intercept_per_class(ensemble_dir, tmp_path):
    predictor = load_ensemble(_write_ensemble(ensemble_dir, tmp_path, _stack(4)))
    assert predictor.blend.method == "stack"
    blended, _ = predictor.predict([np.full((40, 40, 3), 100, np.uint8)])
    assert blended.shape == (1, 4)
    with pytest.raises(ArtifactError, match=r"ensemble\.json: blend.intercept has 3 entries for 4 classes"):
        load_ensemble(_write_ensemble(ensemble_dir, tmp_path, _stack(3)))


@pytest.mark.parametrize("damage", ["garbage_pb", "truncated_variables", "garbage_index", "no_variables"])
def test_a_damaged_saved_model_is_an_artifact_error_naming_its_folder(ensemble_dir, tmp_path, damage):
    import shutil

    run = tmp_path / "m32"
    shutil.copytree((ensemble_dir / "../runs/m32").resolve(), run)
    variables = run / "saved_model" / "variables"
    if damage == "garbage_pb":
        (run / "saved_model" / "saved_model.pb").write_bytes(b"\xff\x00garbage" * 8)
    elif damage == "truncated_variables":
        data = next(variables.glob("variables.data*"))
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "garbage_index":
        (variables / "variables.index").write_bytes(b"xx")
    else:
        shutil.rmtree(variables)
    with pytest.raises(ArtifactError, match=rf"{run / 'saved_model'} cannot be loaded as a SavedModel"):
        load_run(run)


# --- a failed warm-up, as the prediction routes report it ----------------------------------------------

def test_after_a_failed_warm_up_the_prediction_routes_say_why():
    with _client(Settings(run="unused"), FailingEnsemble()) as c:
        warm_task = c.app.state.service.warm_task
        for _ in range(200):
            if warm_task.done():
                break
            time.sleep(0.05)
        reason = "RuntimeError: the SavedModel cannot run on this device"
        response = c.post("/v1/predict", files=_files(image_bytes()))
        assert response.status_code == 503
        assert response.json()["error"]["kind"] == "warm_up_failed" and reason in response.json()["error"]["message"]
        tf_response = c.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(image_bytes())}]})
        assert tf_response.status_code == 503 and reason in tf_response.json()["error"]
        version = c.get("/v1/models/flowers").json()["model_version_status"][0]
        assert version["state"] == "END" and version["status"]["error_code"] == "UNKNOWN"
        assert reason in version["status"]["error_message"]
        assert 'flower_errors_total{kind="warm_up_failed"} 2' in c.get("/metrics").text


# --- the serve command's settings ----------------------------------------------------------------------

@pytest.fixture
def served(monkeypatch):
    """Run service.serving.main with binding the port, loading the models and serving recorded instead of done;
    FLOWER_* restored afterwards."""
    import socket

    import service.serving

    for name in Settings.model_fields:  # set, then removed: what main() hands to workers is undone afterwards
        monkeypatch.setenv(f"FLOWER_{name.upper()}", "")
        monkeypatch.delenv(f"FLOWER_{name.upper()}")
    calls = []
    monkeypatch.setattr(service.serving, "listen", lambda host, port: socket.socket())
    monkeypatch.setattr(service.serving, "load_checked", lambda settings: None)
    monkeypatch.setattr(service.serving, "serve", lambda settings, ensemble, sock: calls.append(settings))
    return calls


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1"])
def test_a_port_outside_1_to_65535_is_refused(port, tmp_path, served, capsys):
    from flower.commands.serve import main

    with pytest.raises(ValueError, match="port"):
        Settings(run="x", port=int(port))
    assert main(["--run", str(tmp_path), "--port", port]) == 2
    assert capsys.readouterr().err.startswith("error: --port: Input should be ")
    assert served == []
    assert Settings(run="x", port=65535).port == 65535 and Settings(run="x", port=1).port == 1


def test_invalid_settings_print_one_line_per_problem_naming_the_flag(tmp_path, served, capsys):
    from flower.commands.serve import main

    assert main(["--run", str(tmp_path), "--max-batch-size", "0", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --workers: Input should be greater than or equal to 1",
                                "error: --max-batch-size: Input should be greater than or equal to 1"]
    assert "http" not in err and served == []


def test_a_flag_naming_what_to_serve_sets_aside_the_other_from_the_environment(tmp_path, served, monkeypatch, capsys):
    import os

    from flower.commands.serve import main, parse_settings

    run, ensemble = tmp_path / "run", tmp_path / "ens"
    run.mkdir()
    ensemble.mkdir()
    monkeypatch.setenv("FLOWER_ENSEMBLE", str(ensemble))
    settings = parse_settings(["--run", str(run)])
    assert (settings.run, settings.ensemble) == (str(run), None)
    assert main(["--run", str(run)]) == 0 and len(served) == 1
    assert os.environ["FLOWER_RUN"] == str(run) and "FLOWER_ENSEMBLE" not in os.environ  # what workers read
    assert Settings().run == str(run) and Settings().ensemble is None
    monkeypatch.setenv("FLOWER_RUN", str(run))
    settings = parse_settings(["--ensemble", str(ensemble)])
    assert (settings.run, settings.ensemble) == (None, str(ensemble))
    assert main(["--ensemble", str(ensemble), "--run", str(run)]) == 2  # both on the command line
    monkeypatch.setenv("FLOWER_ENSEMBLE", str(ensemble))
    assert main([]) == 2  # both from the environment
    assert "exactly one" in capsys.readouterr().err and len(served) == 1


@pytest.mark.parametrize("value,expected", [
    (None, False), ("1", True), ("true", True), ("Yes", True), (" ON ", True),
    ("0", False), ("FALSE", False), ("no", False), ("Off", False), ("", False),
])
def test_boolean_options_take_the_documented_spellings(value, expected):
    from service.routes.predict import _flag

    assert _flag(value, "include_members") is expected


def test_a_boolean_option_spelled_otherwise_is_refused_naming_it():
    from service.errors import ClientError
    from service.routes.predict import _flag

    with pytest.raises(ClientError) as refused:
        _flag("maybe", "include_members")
    assert refused.value.status == 422 and refused.value.message == "include_members must be true or false, got 'maybe'"


def test_top_k_takes_one_to_the_class_count_and_names_a_bad_value():
    from service.errors import ClientError
    from service.routes.predict import _top_k

    assert (_top_k(None, 5, 4), _top_k(None, 3, 4), _top_k("1", 5, 4), _top_k(" 4", 5, 4)) == (4, 3, 1, 4)
    for value, message in (("0", "top_k must be between 1 and 4, got 0"), ("5", "top_k must be between 1 and 4, got 5"),
                           ("two", "top_k must be an integer, got 'two'")):
        with pytest.raises(ClientError) as refused:
            _top_k(value, 5, 4)
        assert refused.value.status == 422 and refused.value.message == message


def test_an_image_of_exactly_the_byte_limit_is_accepted_and_one_byte_more_is_not(client):
    limit = 200_000  # the module client's max_image_bytes
    blob = image_bytes("PNG", size=(64, 48))
    padded = blob + b"\0" * (limit - len(blob))  # PNG ignores bytes after its end chunk
    assert client.post("/v1/predict", files=_files(padded)).json()["results"][0]["ok"]
    result = client.post("/v1/predict", files=_files(padded + b"\0")).json()["results"][0]
    assert not result["ok"] and result["error"]["kind"] == "too_large"


def test_options_may_come_as_query_parameters_and_a_bad_one_is_named(client):
    query = "top_k=2&include_probabilities=yes&include_members=1"
    response = client.post(f"/v1/predict?{query}", files=_files(image_bytes()))
    result = response.json()["results"][0]
    assert len(result["top"]) == 2 and len(result["probabilities"]) == 4 and len(result["members"]) == 2
    for name in ("include_probabilities", "include_members"):
        response = client.post(f"/v1/predict?{name}=maybe", files=_files(image_bytes()))
        assert response.status_code == 422
        assert response.json()["error"]["message"] == f"{name} must be true or false, got 'maybe'"


def test_a_jpeg_with_an_exif_rotation_is_decoded_upright_as_the_import_tool_does():
    from core.photos import to_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    blob = image_bytes("JPEG", size=(64, 48), exif=exif.tobytes())
    decoded = decode_image(blob, 10_000_000)
    assert decoded.shape == (64, 48, 3)  # upright: the 64 x 48 photo stands 64 high
    np.testing.assert_array_equal(decoded, np.asarray(to_rgb(Image.open(io.BytesIO(blob)))))

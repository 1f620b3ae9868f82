"""What the service refuses, and how: broken artifacts, non-finite outputs, and hostile or unlucky clients.

Broken models are refused before the address is printed; non-finite outputs never reach a client; the
TF-Serving route checks `signature_name`; unterminated multipart bodies are malformed; every route caps
its body while it streams (413) and gives up on a slow body (408); decoded pixels have a budget per
request and across requests, and huge images are reduced while decoding.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.images import decode_image
from service.predictor import ArtifactError, load_ensemble, load_run
from service.settings import Settings
from testkit.artifacts import CLASSES, PACKAGE_ROOT, free_port, image_bytes, make_ensemble, make_run, start_server


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def ensemble_dir(root):
    return make_ensemble(root)


@pytest.fixture(scope="module")
def nan_run(root):
    """A run whose output layer's weights are NaN: every probability it answers is NaN."""
    return make_run(root / "runs", "nan32", 32, seed=3, sharpness=float("nan"))


def _wait_ready(client: TestClient) -> None:
    for _ in range(400):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service never became ready: {client.get('/readyz').json()}")


SMALL = dict(max_images=2, max_image_bytes=100_000, max_pixels=2_000_000)


@pytest.fixture(scope="module")
def client(ensemble_dir):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir), **SMALL))) as c:
        _wait_ready(c)
        yield c


def _files(*blobs: bytes):
    return [("files", (f"image{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def _corrupt_copy(run, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(run, copy)
    (copy / "saved_model" / "saved_model.pb").write_bytes(b"\xff\x00garbage" * 8)
    return copy


# --- 1. the serve command checks the models before it prints the address --------------------------------

@pytest.fixture
def serve_calls(monkeypatch):
    """service.serving.main with the final hand-over to uvicorn recorded instead of run."""
    import service.serving

    for name in Settings.model_fields:  # set, then removed: what main() hands to workers is undone afterwards
        monkeypatch.setenv(f"FLOWER_{name.upper()}", "")
        monkeypatch.delenv(f"FLOWER_{name.upper()}")
    calls = []
    monkeypatch.setattr(service.serving, "serve", lambda settings, ensemble, sock: calls.append((settings, ensemble)))
    return calls


def test_a_corrupt_saved_model_is_an_error_line_before_any_address(ensemble_dir, tmp_path, serve_calls, capsys):
    from flower.commands.serve import main

    broken = _corrupt_copy((ensemble_dir / "../runs/m32").resolve(), tmp_path)
    code = main(["--run", str(broken), "--port", str(free_port())])
    out, err = capsys.readouterr()
    assert code != 0 and serve_calls == []
    assert "serving" not in out + err and "http://" not in out + err
    assert err.startswith("error: ") and str(broken / "saved_model") in err and "Traceback" not in err


def test_a_member_with_nan_outputs_is_an_error_line_naming_it(ensemble_dir, nan_run, tmp_path, serve_calls, capsys):
    from flower.commands.serve import main

    code = main(["--run", str(nan_run), "--port", str(free_port())])
    out, err = capsys.readouterr()
    assert code != 0 and serve_calls == [] and "serving" not in out
    assert err.startswith("error: ") and "'nan32'" in err and "not all finite" in err


def test_a_busy_port_is_an_error_line_and_no_address(ensemble_dir, serve_calls, capsys):
    from flower.commands.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--ensemble", str(ensemble_dir), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code != 0 and serve_calls == [] and "serving" not in out
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_good_models_are_handed_to_the_server_loaded_and_the_address_printed(ensemble_dir, serve_calls, capsys):
    from flower.commands.serve import main

    port = free_port()
    assert main(["--ensemble", str(ensemble_dir), "--port", str(port)]) == 0
    out = capsys.readouterr().out
    assert f"on http://127.0.0.1:{port}/" in out
    (settings, repository), = serve_calls
    ensemble = repository.latest(settings.model_name).predictor
    assert ensemble.ready and [m.name for m in ensemble.members] == ["m32", "m48"]


def test_python_m_service_with_a_corrupt_saved_model_exits_without_a_traceback(ensemble_dir, tmp_path):
    broken = _corrupt_copy((ensemble_dir / "../runs/m32").resolve(), tmp_path)
    result = subprocess.run([sys.executable, "-m", "flower", "serve", "--run", str(broken), "--port", str(free_port())],
                            cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode not in (0, 3), result.stderr[-2000:]
    assert "serving" not in result.stdout and "Traceback" not in result.stderr
    assert f"error: {broken / 'saved_model'} cannot be loaded as a SavedModel" in result.stderr


def test_uvicorn_gets_the_slow_client_options(ensemble_dir):
    from service.serving import uvicorn_config

    config = uvicorn_config(Settings(run="x", keep_alive_timeout=3, limit_concurrency=7), app=object())
    assert config.timeout_keep_alive == 3 and config.limit_concurrency == 7


# --- 2. non-finite outputs -------------------------------------------------------------------------------

def test_a_member_whose_warm_up_is_not_finite_is_refused_at_load(ensemble_dir, nan_run, tmp_path):
    with pytest.raises(ArtifactError, match=r"member 'nan32' .*not all finite"):
        load_run(nan_run)
    document = json.loads((ensemble_dir / "ensemble.json").read_text())
    document["members"] = [{**m, "path": str((ensemble_dir / m["path"]).resolve())} for m in document["members"]]
    document["members"][1] = {"name": "nan32", "path": str(nan_run), "weight": 0.7}
    (tmp_path / "ensemble.json").write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"member 'nan32' .*not all finite"):
        load_ensemble(tmp_path)


def test_a_blend_that_turns_finite_votes_non_finite_is_refused_at_load(ensemble_dir, monkeypatch):
    import service.predictor

    monkeypatch.setattr(service.predictor, "apply_blend", lambda spec, probs: np.full(probs.shape[1:], np.nan))
    with pytest.raises(ArtifactError, match="'weighted' blend turns the members' finite warm-up probabilities"):
        load_ensemble(ensemble_dir)


def test_the_warm_up_refuses_a_member_that_turned_non_finite(ensemble_dir):
    predictor = load_ensemble(ensemble_dir)
    member = predictor.members[0]
    real = member.predict_pixels
    member.predict_pixels = lambda images: {"probabilities": real(images=images)["probabilities"] * np.nan}
    with TestClient(create_app(Settings(ensemble="unused"), predictor)) as c:
        for _ in range(200):
            if c.app.state.service.warm_task.done():
                break
            time.sleep(0.05)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "'m32'" in ready.json()["error"] and "finite" in ready.json()["error"]


class NanEnsemble:
    """A stand-in ensemble that warms up fine but answers NaN for images whose top-left pixel is 0."""

    classes = CLASSES

    def __init__(self):
        self.members = [type("M", (), {"name": "flaky"})()]
        self.warmed_up = set()

    @property
    def ready(self):
        return self.warmed_up == {"flaky"}

    def warm_up(self):
        self.warmed_up = {"flaky"}

    def predict(self, images):
        probs = np.full((len(images), 4), 0.25, np.float32)
        for i, image in enumerate(images):
            if image[0, 0, 0] == 0:
                probs[i] = np.nan
        return probs, probs[None]


def _solid(value: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value,) * 3).save(buffer, format=fmt)
    return buffer.getvalue()


def test_non_finite_outputs_at_request_time_are_a_clear_error_not_null_nor_500():
    with TestClient(create_app(Settings(run="unused"), NanEnsemble())) as c:
        _wait_ready(c)
        response = c.post("/v1/predict", files=_files(_solid(0), _solid(200)),
                          data={"include_probabilities": "true", "include_members": "true"})
        assert response.status_code == 200 and "null" not in response.text
        bad, good = response.json()["results"]
        assert bad["ok"] is False and bad["error"]["kind"] == "non_finite_output"
        assert good["ok"] is True and good["top"][0]["probability"] == 0.25
        tf_response = c.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(_solid(0))}]})
        assert tf_response.status_code == 503 and "instance 0" in tf_response.json()["error"]
        assert "not finite" in tf_response.json()["error"]
        assert 'flower_errors_total{kind="non_finite_output"} 2' in c.get("/metrics").text


# --- 3. signature_name and unterminated multipart bodies -----------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"signature_name": ""}, {"signature_name": "serving_default"}])
def test_tf_serving_accepts_the_default_signature(client, extra):
    body = {"instances": [{"b64": _b64(image_bytes())}], **extra}
    assert client.post("/v1/models/flowers:predict", json=body).status_code == 200


@pytest.mark.parametrize("name", ["serving_pixels", "nope", 7, None])
def test_tf_serving_refuses_another_signature_naming_it(client, name):
    response = client.post("/v1/models/flowers:predict",
                           json={"instances": [{"b64": _b64(image_bytes())}], "signature_name": name})
    assert response.status_code == 400 and repr(name) in response.json()["error"]
    assert "serving_default" in response.json()["error"]


@pytest.mark.parametrize("body", [
    b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + image_bytes("PNG"),
    b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + image_bytes("PNG") + b"\r\n--x",
    b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n',
    b"--x\r\n",
], ids=["data", "delimiter-without-close", "headers", "first-delimiter"])
def test_an_unterminated_multipart_body_is_malformed(client, body):
    response = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 400 and response.json()["error"]["kind"] == "malformed_multipart"
    assert "closing boundary" in response.json()["error"]["message"]


def test_an_unterminated_body_names_the_closing_boundary_it_lacks_from_a_quoted_boundary_with_other_params(client):
    # The boundary as the client wrote it: its quotes gone, its space kept, the params after it (even one whose
    # value says 'boundary=') left out.
    body = b'--Xa b.cX\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + image_bytes("PNG")
    response = client.post("/v1/predict", content=body, headers={
        "content-type": 'multipart/form-data; boundary="Xa b.cX"; note="boundary=no"'})
    assert response.status_code == 400 and response.json()["error"] == {
        "kind": "malformed_multipart",
        "message": "the multipart body ends before its closing boundary '--Xa b.cX--' (a cut-off upload?)"}


def test_an_upload_the_server_cannot_spool_to_a_full_disk_is_a_503_not_the_clients_malformed_body(client,
                                                                                                 monkeypatch, caplog):
    import errno
    import tempfile

    import starlette.formparsers

    class FullDisk(tempfile.SpooledTemporaryFile):
        def write(self, data):
            if self._rolled or self.tell() + len(data) > self._max_size:  # past 1 MiB it goes to the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", FullDisk)
    monkeypatch.setattr(starlette.formparsers.MultiPartParser, "spool_max_size", 4096)  # 1 MiB in the server
    small = client.post("/v1/predict", files=[("files", ("a.jpg", image_bytes(), "image/jpeg"))])  # 2.5 kB
    assert small.status_code == 200, small.text  # kept in memory: the disk is not needed
    big = client.post("/v1/predict", files=[("files", ("a.png", image_bytes("PNG"), "image/png"))])  # 9 kB
    assert big.status_code == 503 and big.headers["retry-after"] == "30"
    assert big.json()["error"] == {"kind": "upload_spool_failed", "message": "the server could not store the upload "
                                   "(No space left on device); try again later"}
    assert "an upload could not be spooled to the temporary folder: [Errno 28] No space left on device" in \
        caplog.messages


def test_any_other_failure_of_the_multipart_parser_is_the_clients_malformed_body(client, monkeypatch):
    from service.routes import predict

    async def broken(self):
        raise ValueError("a part header the parser cannot read")

    monkeypatch.setattr(predict._Parser, "parse", broken)
    response = client.post("/v1/predict", files=[("files", ("a.png", image_bytes("PNG"), "image/png"))])
    assert response.status_code == 400 and response.json()["error"] == {
        "kind": "malformed_multipart",
        "message": "the multipart body cannot be read: a part header the parser cannot read"}


def test_a_terminated_multipart_body_with_an_epilogue_is_fine(client):
    body = (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + image_bytes("PNG")
            + b"\r\n--x--\r\nan epilogue")
    response = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 200 and response.json()["results"][0]["ok"]


# --- 4 and 6. the body: its size capped while it streams, and a deadline ---------------------------------

def _scope(method: str, path: str, headers: dict[str, str]) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}


async def _drive(app, method: str, path: str, headers: dict[str, str], chunks: Iterator[bytes],
                 pause: float = 0.0) -> tuple[int, dict, int]:
    """Call the ASGI app directly with the body as `chunks` (read lazily): (status, JSON body, chunks read)."""
    read = 0
    messages = []

    async def receive():
        nonlocal read
        if pause:
            await asyncio.sleep(pause)
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        messages.append(message)

    await app(_scope(method, path, headers), receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body), read


PART = b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'


def _chunks(size: int, count: int, first: bytes = b"") -> Iterator[bytes]:
    """`count` chunks of `size` bytes, the first starting with `first`."""
    yield first + b"x" * size
    for _ in range(count - 1):
        yield b"x" * size


ROUTES = ["/v1/predict", "/v1/models/flowers:predict", "/healthz", "/nowhere"]
MULTIPART = {"content-type": "multipart/form-data; boundary=x"}


@pytest.mark.parametrize("path", ROUTES)
def test_a_declared_length_over_the_limit_is_refused_before_reading(client, path):
    def never():
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    status, body, read = client.portal.call(_drive, client.app, "POST", path,
                                            {**MULTIPART, "content-length": "1000000000"}, never())
    assert status == 413 and read == 0
    assert "1000000000" in json.dumps(body)


@pytest.mark.parametrize("path", ROUTES[:2])
def test_a_chunked_body_is_cut_off_at_the_limit_while_it_streams(client, path):
    chunk = 64 * 1024
    status, body, read = client.portal.call(_drive, client.app, "POST", path, dict(MULTIPART),
                                            _chunks(chunk, 5000, PART))  # 320 MB if read to the end
    assert status == 413, body
    settings = client.app.state.service.settings
    assert read * chunk <= settings.body_limit(path) + chunk
    kind = body["error"]["kind"] if isinstance(body["error"], dict) else None
    assert kind in ("request_too_large", None) and "limit" in json.dumps(body)


@pytest.mark.parametrize("path", ROUTES[:2])
def test_a_body_that_trickles_past_the_deadline_gets_408(ensemble_dir, path):
    with TestClient(create_app(Settings(ensemble=str(ensemble_dir), body_timeout=0.5, **SMALL))) as c:
        _wait_ready(c)
        start = time.perf_counter()
        status, body, read = c.portal.call(_drive, c.app, "POST", path, dict(MULTIPART), _chunks(1, 100, PART), 0.1)
        assert status == 408 and time.perf_counter() - start < 3 and read < 20
        assert "0.5" in json.dumps(body)


# --- 5. decoded pixels: a budget per request and across requests; huge images reduced while decoding -------

def _big(fmt: str, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 160, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_header_count_is_what_decoding_produces_for_reduced_and_full_size_images():
    # decoded_pixels (the pixel budgets' count, from the header alone) plans the same DCT scale as decode_image:
    # a 6000 x 700 panorama for a 48 px input decodes at 1/4 (1500 x 175, each side >= 2 x 48), not at 1/8.
    from service.images import decoded_pixels

    for fmt, size, target in (("JPEG", (6000, 700), 48), ("JPEG", (3000, 2000), 48), ("JPEG", (3000, 2000), 160),
                              ("JPEG", (640, 427), 48), ("PNG", (2100, 2100), 48)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (40, 160, 90)).save(buffer, format=fmt)
        blob = buffer.getvalue()
        counted = decoded_pixels(blob, 40_000_000, target, 4_000_000)
        height, width, _ = decode_image(blob, 40_000_000, target, 4_000_000).shape
        assert counted >= height * width, (size, target)  # never less than what is decoded
        if fmt == "PNG":
            assert counted == size[0] * size[1]  # decoded at full size, reduced afterwards
    panorama = io.BytesIO()
    Image.new("RGB", (6000, 700), (40, 160, 90)).save(panorama, format="JPEG")
    assert decoded_pixels(panorama.getvalue(), 40_000_000, 48, 4_000_000) == 1500 * 175
    assert decode_image(panorama.getvalue(), 40_000_000, 48, 4_000_000).shape == (175, 1500, 3)
    assert decoded_pixels(blob, 40_000_000) == 2100 * 2100  # no target: no reduction


def test_images_that_decode_to_more_pixels_than_the_request_budget_get_413(ensemble_dir):
    settings = Settings(ensemble=str(ensemble_dir), max_request_pixels=100_000, **SMALL)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        blobs = [_big("PNG", 250), _big("JPEG", 250)]  # 62 500 pixels each, in a few kB
        assert c.post("/v1/predict", files=_files(blobs[0])).status_code == 200
        response = c.post("/v1/predict", files=_files(*blobs))
        assert response.status_code == 413 and response.json()["error"]["kind"] == "too_many_pixels_in_request"
        assert "125000" in response.json()["error"]["message"]
        tf_response = c.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(b)} for b in blobs]})
        assert tf_response.status_code == 413 and "125000" in tf_response.json()["error"]


def test_the_in_flight_pixel_budget_answers_503_with_retry_after(ensemble_dir):
    settings = Settings(ensemble=str(ensemble_dir), max_request_pixels=100_000, max_inflight_pixels=100_000, **SMALL)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        budget = c.app.state.service.pixels
        budget.used = 90_000  # other requests hold most of the budget
        blob = image_bytes("PNG", size=(120, 120))  # 14 400 pixels
        response = c.post("/v1/predict", files=_files(blob))
        assert response.status_code == 503 and response.json()["error"]["kind"] == "busy"
        assert response.headers["retry-after"]
        tf_response = c.post("/v1/models/flowers:predict", json={"instances": [{"b64": _b64(blob)}]})
        assert tf_response.status_code == 503 and tf_response.headers["retry-after"]
        budget.used = 0
        assert c.post("/v1/predict", files=_files(blob)).status_code == 200
        assert budget.used == 0  # released after each request


def test_a_huge_jpeg_is_budgeted_at_its_reduced_size_and_answered_like_its_reduced_decode(ensemble_dir):
    from testkit.artifacts import photo

    buffer = io.BytesIO()
    photo(3000, 2000, seed=4).save(buffer, format="JPEG", quality=90)
    blob = buffer.getvalue()  # 6 M pixels: decoded at 1/8 (375 x 250 = 93 750 pixels), then halved (>= 2 x 48 a side)
    assert len(blob) > 48 * 1024  # decoded off the event loop
    settings = Settings(ensemble=str(ensemble_dir), max_request_pixels=200_000, max_inflight_pixels=200_000,
                        max_images=2, max_image_bytes=5_000_000)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        response = c.post("/v1/predict", files=_files(blob), data={"include_probabilities": "true"})
    assert response.status_code == 200, response.text  # counted at its full 6 M pixels it would be refused
    reduced = decode_image(blob, settings.max_pixels, 48, settings.downscale_pixels)
    assert reduced.shape == (125, 188, 3)
    expected = load_ensemble(ensemble_dir).predict([reduced])[0][0]
    np.testing.assert_allclose(response.json()["results"][0]["probabilities"], expected, atol=1e-5)


def test_the_request_budget_may_not_exceed_the_in_flight_budget():
    with pytest.raises(ValueError, match="max_inflight_pixels"):
        Settings(run="x", max_request_pixels=10, max_inflight_pixels=5)


def test_a_huge_jpeg_is_reduced_while_decoding_to_no_less_than_the_members_need():
    blob = _big("JPEG", 6320)
    assert len(blob) < 1_000_000
    array = decode_image(blob, 40_000_000, target=300, downscale_pixels=4_000_000)
    assert array.shape == (790, 790, 3)  # DCT scaling by 1/8: still >= 2 x 300 (images.KEEP), for the resize
    assert np.abs(array.astype(int) - (40, 160, 90)).max() < 6


def test_a_huge_png_is_reduced_right_after_decoding():
    array = decode_image(_big("PNG", 6320), 40_000_000, target=300, downscale_pixels=4_000_000)
    assert array.shape == (632, 632, 3) and (array == (40, 160, 90)).all()  # by 6320 // 600 = 10: >= 2 x 300


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_image_that_needs_no_reduction_decodes_exactly_as_before(fmt):
    blob = image_bytes(fmt, size=(90, 70), seed=9)
    plain = decode_image(blob, 10_000_000)
    if fmt == "JPEG":
        np.testing.assert_array_equal(plain, tf.io.decode_jpeg(blob, channels=3, dct_method="INTEGER_ACCURATE").numpy())
    under_threshold = decode_image(blob, 10_000_000, target=16, downscale_pixels=10_000)
    not_four_times_the_target = decode_image(blob, 10_000_000, target=18, downscale_pixels=1_000)  # 70 // 36 == 1
    np.testing.assert_array_equal(under_threshold, plain)
    np.testing.assert_array_equal(not_four_times_the_target, plain)
    assert decode_image(blob, 10_000_000, target=16, downscale_pixels=1_000).shape == (35, 45, 3)


MEASURE = """
import sys
from service.images import decode_image

def peak_mb():  # this process's own peak resident memory (ru_maxrss would include the parent's, from fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) // 1024

blob = open(sys.argv[1], "rb").read()
before = peak_mb()
array = decode_image(blob, 40_000_000, target=int(sys.argv[2]), downscale_pixels=4_000_000)
print(array.shape, peak_mb() - before)
"""


@pytest.mark.parametrize("fmt,shape,most_mb", [
    ("JPEG", "(1580, 1580, 3", 45),  # DCT scaling by 1/4 (>= 2 x 512): the full size (120 MB as RGB) never decoded
    ("PNG", "(1054, 1054, 3", 200),  # reduce(6), rounding up: only PIL's full-size buffer (160 MB), no RGB copies
])
def test_decoding_a_huge_small_file_image_takes_bounded_memory(tmp_path, fmt, shape, most_mb):
    path = tmp_path / "huge.img"
    path.write_bytes(_big(fmt, 6320))  # 40 M pixels in a file of a few hundred kB
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), "512"], cwd=PACKAGE_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    got_shape, grown_mb = result.stdout.rsplit(")", 1)
    assert got_shape.strip() == shape and int(grown_mb) < most_mb, result.stdout


# --- a real server: the body limit and the deadline on the wire --------------------------------------------

@pytest.fixture(scope="module")
def server(ensemble_dir):
    port = free_port()
    process = start_server(["--ensemble", str(ensemble_dir), "--max-images", "2", "--max-image-bytes", "100000",
                            "--body-timeout", "1"], port)
    yield port, process.pid
    process.terminate()
    process.wait(10)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def _send_until_answered(sock: socket.socket, pieces: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `pieces` until the server answers (or stops reading): (the answer's head, bytes sent)."""
    sent = 0
    sock.settimeout(5)
    try:
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(piece)
            sent += len(piece)
    except OSError:  # the server answered and closed the connection while we were still sending
        pass
    try:
        return _answer(sock), sent
    except OSError as err:
        return f"no answer: {err}".encode(), sent


@pytest.mark.parametrize("path", ["/v1/models/flowers:predict", "/v1/predict"])
def test_a_300_mb_chunked_upload_is_stopped_at_the_limit_without_growing_the_server(server, path):
    port, pid = server
    before = _rss_mb(pid)
    chunk = 256 * 1024
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        pieces = (b"%x\r\n" % len(c) + c + b"\r\n" for c in _chunks(chunk, 1200, PART))  # 300 MB
        answer, sent = _send_until_answered(sock, pieces)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in answer.lower()
    assert sent < 64 * 1024 * 1024  # it stopped reading long before the end
    assert _rss_mb(pid) - before < 60


def test_a_declared_length_of_a_gigabyte_is_answered_at_once(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/models/flowers:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 413")


def test_a_body_trickled_byte_by_byte_is_answered_408(server):
    port, _ = server
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 1000\r\n\r\n")

        def trickle():
            for byte in PART:
                time.sleep(0.2)
                yield bytes([byte])

        answer, sent = _send_until_answered(sock, trickle())
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.perf_counter() - start < 5 and sent < 30

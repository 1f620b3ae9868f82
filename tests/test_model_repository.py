"""The model repository: several models and versions side by side, labels, and hot reload under load."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.errors import Kind
from service.app import create_app
from service.errors import STATUS
from service.predictor import load_run
from service.repository import MODEL_NAME_RULE, VERSION_RULE, ModelRepository, NotServed, RepositoryError, read_labels
from service.settings import Settings
from testkit.artifacts import free_port, image_bytes, make_run, start_server
from tests.support import peak_memory

BLOB = image_bytes("JPEG", size=(64, 48), seed=5)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """flowers/1 and flowers/2 (two seeds of a 32 px member), other/7, and labels stable=1, canary=2."""
    root = tmp_path_factory.mktemp("repo")
    make_run(root / "flowers", "1", 32, seed=1)
    make_run(root / "flowers", "2", 32, seed=2)
    make_run(root / "other", "7", 48, seed=3)
    (root / "flowers" / "labels.json").write_text(json.dumps({"stable": 1, "canary": 2}))
    (root / "notes.txt").write_text("not a model")
    return root


def _expected(run: Path) -> list[float]:
    """A version's own answer for BLOB, computed without the service."""
    from service.images import decode_image

    predictor = load_run(run)
    return predictor.predict([decode_image(BLOB, 10_000_000, 32)])[0][0].tolist()


def _tf_predict(client, path: str) -> httpx.Response:
    return client.post(path, json={"instances": [{"b64": base64.b64encode(BLOB).decode()}]})


def test_models_versions_and_labels_are_addressed_as_in_tf_serving(repository):
    expected = {v: _expected(repository / "flowers" / v) for v in ("1", "2")}
    assert np.abs(np.array(expected["1"]) - expected["2"]).max() > 1e-3  # the versions answer differently
    with TestClient(create_app(Settings(model_repository=str(repository), poll_seconds=0))) as c:
        status = c.get("/v1/models/flowers").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "AVAILABLE")]
        for path, version in (("/v1/models/flowers:predict", "2"), ("/v1/models/flowers/versions/1:predict", "1"),
                              ("/v1/models/flowers/labels/stable:predict", "1"),
                              ("/v1/models/flowers/labels/canary:predict", "2")):
            np.testing.assert_allclose(_tf_predict(c, path).json()["predictions"][0], expected[version], atol=1e-6)
        assert _tf_predict(c, "/v1/models/other:predict").status_code == 200
        metadata = c.get("/v1/models/flowers/versions/1/metadata").json()
        assert metadata["model_spec"]["version"] == "1" and metadata["flower"]["labels"] == ["stable"]
        assert c.post("/v1/predict?model=other", files=[("files", ("a.jpg", BLOB))]).json()["version"] == 7
        missing = {"/v1/models/flowers/versions/3:predict": "has no version 3",
                   "/v1/models/flowers/labels/beta:predict": "no version labelled 'beta'",
                   "/v1/models/nothing:predict": "'nothing' is not served"}
        for path, text in missing.items():
            response = _tf_predict(c, path)
            assert response.status_code == 404 and text in response.json()["error"], path
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["models"] == {"flowers": {"1": "AVAILABLE", "2": "AVAILABLE"},
                                                      "other": {"7": "AVAILABLE"}}


def test_the_command_serves_a_repository_of_one_for_ensemble_and_run(repository):
    with TestClient(create_app(Settings(run=str(repository / "flowers" / "1")))) as c:
        assert [s["version"] for s in c.get("/v1/models/flowers").json()["model_version_status"]] == ["1"]
        assert _tf_predict(c, "/v1/models/flowers/versions/1:predict").status_code == 200


@pytest.mark.parametrize("text,problem", [
    ("{", "cannot be read as JSON"), ("[1]", "must be an object"), ('{"stable": "1"}', "must name a version"),
    ('{"2": 1}', "not a number"), ('{"a b": 1}', "letters, digits"),
])
def test_a_malformed_labels_file_is_named_with_its_problem(tmp_path, text, problem):
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(RepositoryError, match=problem):
        read_labels(tmp_path)


def test_a_labels_file_of_millions_of_values_is_refused_before_the_server_parses_it(tmp_path):
    (tmp_path / "labels.json").write_text('{"stable": [' + "1," * 2_500_000 + "1]}")  # 5 MB: 20 MB of list parsed
    with peak_memory() as peak, pytest.raises(RepositoryError) as refused:
        read_labels(tmp_path)
    assert peak.bytes < 2 * (tmp_path / "labels.json").stat().st_size, f"{peak.bytes / 2**20:.0f} MiB"
    assert "holds up to 2500004 JSON values, more than the 2000000" in str(refused.value), str(refused.value)[:300]


class Stub:
    """A stand-in predictor: its answer is its version number, and it can be told to fail loading."""

    classes = ["a", "b"]
    members = []
    ready = True
    blend = SimpleNamespace(method="mean", weights=None)

    def __init__(self, number: float) -> None:
        self.number = number

    def predict(self, images):
        return np.full((len(images), 2), self.number, np.float32), np.zeros((1, len(images), 2), np.float32)


class StubBatcher:
    """Counts starts and stops."""

    def __init__(self, predictor) -> None:
        self.predictor, self.stopped = predictor, False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True


def _stub_loader(path: Path) -> Stub:
    if (path / "broken").exists():
        raise ValueError(f"{path}: broken on purpose")
    return Stub(float(path.name))


def test_a_swap_and_an_unload_wait_for_the_requests_holding_the_old_version(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    async def scenario() -> None:
        assert await repo.poll() == [("m", 1, "loaded")]
        held = repo.resolve("m")
        held.enter()  # a request in flight on version 1
        (tmp_path / "m" / "1" / "changed").write_text("new files")  # version 1 re-exported: reloaded
        assert await repo.poll() == [("m", 1, "loaded")]
        assert repo.resolve("m") is not held and not held.batcher.stopped  # new requests get the new copy
        held.leave()
        await asyncio.sleep(0.01)
        assert held.batcher is None  # retired once its request finished
        current = repo.resolve("m")
        current.enter()
        shutil.rmtree(tmp_path / "m" / "1")
        (tmp_path / "m" / "2").mkdir()
        assert sorted(await repo.poll()) == [("m", 1, "unloaded"), ("m", 2, "loaded")]
        assert repo.resolve("m").number == 2 and current.predictor is not None  # still held
        current.leave()
        await asyncio.sleep(0.01)
        assert current.predictor is None

    asyncio.run(scenario())


def test_a_version_that_fails_to_load_leaves_the_one_before_it_serving(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "broken").write_text("")
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    async def scenario() -> None:
        assert sorted(await repo.poll()) == [("m", 1, "loaded"), ("m", 2, "failed")]
        assert repo.resolve("m").number == 1
        with pytest.raises(NotServed, match="broken on purpose") as failed:
            repo.resolve("m", 2)
        assert failed.value.kind is Kind.UNAVAILABLE and STATUS[failed.value.kind] == 503
        assert await repo.poll() == []  # unchanged files are not tried again
        (tmp_path / "m" / "2" / "broken").unlink()  # fixed: its files changed, so it is tried again
        assert await repo.poll() == [("m", 2, "loaded")]
        assert repo.resolve("m").number == 2

    asyncio.run(scenario())


def test_folders_the_repository_cannot_serve_are_logged_once_each_with_why(tmp_path, caplog):
    for folder in ("m/1", "m/00", "m/.3", "a b/1", ".hidden/1", "empty"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("a file is neither a model nor a version")
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "is not served" in r.getMessage()]

    async def scenario() -> None:
        repo.preload()
        assert sorted(said()) == sorted([f"model repository: {tmp_path}/{folder} is not served: {reason}" for folder,
                                         reason in ((".hidden", MODEL_NAME_RULE), ("a b", MODEL_NAME_RULE),
                                                    ("m/.3", VERSION_RULE), ("m/00", VERSION_RULE),
                                                    ("empty", f"it holds no version folder: {VERSION_RULE}"))])
        await repo.poll()
        await repo.poll()
        assert len(said()) == 5  # once per folder, not at every poll
        assert repo.skipped_of("m") == [{"folder": ".3", "reason": VERSION_RULE},
                                        {"folder": "00", "reason": VERSION_RULE}]
        (tmp_path / "m" / ".3").rename(tmp_path / "m" / "3")  # a version copied in, then renamed into place
        assert await repo.poll() == [("m", 3, "loaded")] and len(said()) == 5
        assert repo.skipped_of("m") == [{"folder": "00", "reason": VERSION_RULE}]

    with caplog.at_level(logging.WARNING, logger="service"):
        asyncio.run(scenario())


def test_answers_about_a_failed_version_or_labels_file_show_no_server_path(tmp_path, caplog):
    for folder in ("m/1", "m/2", "m/00"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "m" / "2" / "broken").write_text("")
    (tmp_path / "m" / "labels.json").write_text("{")
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)
    with caplog.at_level(logging.ERROR, logger="service"):
        repo.preload()
    settings = Settings(model_repository=str(tmp_path), poll_seconds=0)
    with TestClient(create_app(settings, repository=repo)) as c:
        status = c.get("/v1/models/m").json()
        assert status["model_version_status"][0]["status"]["error_message"] == "m/2: broken on purpose"
        assert status["skipped"] == [{"folder": "00", "reason": VERSION_RULE}]
        assert "m/labels.json cannot be read as JSON" in c.get("/readyz").json()["error"]
        answers = [c.get(path) for path in ("/readyz", "/v1/models/m", "/v1/models/m/versions/2",
                                            "/v1/models/m/metadata", "/v2/models/m/versions/2")]
        answers += [_tf_predict(c, "/v1/models/m/versions/2:predict"),
                    c.post("/v1/predict?model=m&version=2", files=[("files", ("a.jpg", BLOB))])]
        for answer in answers:
            assert str(tmp_path) not in answer.text and tmp_path.name not in answer.text, answer.text
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 503, 503, 503]
    assert repo.models["m"][2].detail == f"{tmp_path / 'm' / '2'}: broken on purpose"  # the command's line has it
    assert any(f"{tmp_path / 'm' / 'labels.json'} cannot be read" in r.getMessage() for r in caplog.records)


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _copy_in(src: Path, dst: Path) -> None:
    """Copy a run into the repository as a new version the safe way: under a temporary name, then renamed."""
    tmp = dst.with_name("." + dst.name + ".incoming")
    shutil.copytree(src, tmp)
    tmp.rename(dst)


def _stream(port: int, stop: threading.Event, answers: list, failures: list) -> None:
    """Send TF-Serving predictions until told to stop; note each answer's first probability or the failure."""
    body = {"instances": [{"b64": base64.b64encode(BLOB).decode()}]}
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            response = client.post(f"http://127.0.0.1:{port}/v1/models/flowers:predict", json=body)
            if response.status_code == 200:
                answers.append(round(response.json()["predictions"][0][0], 6))
            else:
                failures.append((response.status_code, response.text))


def _wait(condition, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("the server did not get there in time")


@pytest.mark.slow
def test_hot_reload_under_load_swaps_fails_and_unloads_without_a_failed_request(tmp_path):
    root = tmp_path / "repo"
    make_run(root / "flowers", "1", 32, seed=1)
    spare = make_run(tmp_path / "spare", "2", 32, seed=2)
    first, second = _expected(root / "flowers" / "1")[0], _expected(spare)[0]
    port = free_port()
    server = start_server(["--model-repository", str(root), "--poll-seconds", "0.3"], port)
    stop, answers, failures = threading.Event(), [], []
    streams = [threading.Thread(target=_stream, args=(port, stop, answers, failures)) for _ in range(3)]
    try:
        for thread in streams:
            thread.start()
        _wait(lambda: len(answers) > 20)
        _copy_in(spare, root / "flowers" / "2")  # a new version: loaded, warmed up, swapped in
        _wait(lambda: answers and answers[-1] == round(second, 6))
        broken = root / "flowers" / "3"
        _copy_in(spare, broken)
        (broken / "saved_model" / "saved_model.pb").write_bytes(b"not a graph")  # after the rename: loads fail
        status = lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models/flowers").json()["model_version_status"]  # noqa: E731
        _wait(lambda: any(s["version"] == "3" and s["state"] == "END" for s in status()))
        failed = next(s for s in status() if s["version"] == "3")
        assert "saved_model" in failed["status"]["error_message"]
        shutil.rmtree(broken)
        shutil.rmtree(root / "flowers" / "2")  # version 2 removed: version 1 serves again
        _wait(lambda: answers[-1] == round(first, 6) and [s["version"] for s in status()] == ["1"])
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in streams:
            thread.join(30)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        server.terminate()
        server.wait(30)
    assert not failures, failures[:3]
    assert {round(first, 6), round(second, 6)} <= set(answers) and len(answers) > 50
    loads = {(s.labels["version"], s.labels["outcome"]): s.value
             for s in _families(metrics)["flower_model_loads"].samples if s.name.endswith("_total")}
    assert loads[("1", "loaded")] == 1 and loads[("2", "loaded")] >= 1 and loads[("3", "failed")] >= 1


def test_changed_files_that_fail_to_load_leave_the_loaded_copy_serving_and_say_why(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    async def scenario() -> None:
        await repo.poll()
        serving = repo.resolve("m")
        (tmp_path / "m" / "1" / "broken").write_text("")
        assert await repo.poll() == [("m", 1, "failed")]
        assert repo.resolve("m") is serving and "broken on purpose" in serving.reload_error
        assert await repo.poll() == []  # the same broken files are not tried again

    asyncio.run(scenario())


def test_a_broken_new_model_does_not_take_the_served_ones_out_of_readiness(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    async def scenario() -> None:
        await repo.poll()
        assert repo.ready
        (tmp_path / "newbie" / "1").mkdir(parents=True)
        (tmp_path / "newbie" / "1" / "broken").write_text("")
        await repo.poll()
        assert repo.ready and any("'newbie' version 1" in p for p in repo.problems())
        shutil.rmtree(tmp_path / "m" / "1")  # a model that served loses its last version: not ready
        (tmp_path / "m" / "2").mkdir()
        (tmp_path / "m" / "2" / "broken").write_text("")
        await repo.poll()
        assert not repo.ready

    asyncio.run(scenario())


def test_a_label_naming_a_version_that_is_not_there_says_so(tmp_path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "labels.json").write_text('{"canary": 9}')
    (tmp_path / "m" / "007").mkdir()  # not a version folder: numbers have no leading zeros
    repo = ModelRepository(tmp_path, _stub_loader, StubBatcher)

    async def scenario() -> None:
        await repo.poll()
        assert sorted(repo.models["m"]) == [1]
        with pytest.raises(NotServed, match="label 'canary' names version 9 .*labels.json.*not served"):
            repo.resolve("m", label="canary")
        for odd in ("1\n", "007", "٣", "-1"):
            with pytest.raises(NotServed, match="not a version number"):
                repo.resolve("m", odd)

    asyncio.run(scenario())


def test_the_queue_depth_gauge_adds_up_every_versions_batcher():
    from service.telemetry import Metrics

    metrics, first, second = Metrics(), object(), object()
    metrics.queue_depth(5, first)
    metrics.queue_depth(3, second)
    metrics.queue_depth(0, second)  # a new or idle batcher does not hide the other's queue
    depth = _families(metrics.render())["flower_queue_depth_images"].samples[0].value
    assert depth == 5

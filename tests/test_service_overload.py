"""Overload and observability: the bounded queue (503 with Retry-After), request deadlines (504) and the
Prometheus metrics, in one process with a stand-in model and across `--workers 2` with real SavedModels; workers
that end with their supervisor, even one killed with SIGKILL."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError

from core.files import folder_lock
from flower.commands.serve import parse_settings
from service.app import create_app
from service.serving import listen, metrics_dir
from service.settings import Settings
from service.telemetry import Metrics
from testkit.artifacts import CLASSES, free_port, image_bytes, make_run, start_server
from tests.conftest import REPO
from tests.metrics_text import metric_samples, metric_value


class GatedEnsemble:
    """A stand-in ensemble: `predict` waits until `gate` is set, records each batch's size and reports its time
    through `on_member`; an image's answer is class (red value % 4) with probability 0.7."""

    classes = CLASSES

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = threading.Event()
        self.calls: list[int] = []
        self.members = [type("M", (), {"name": "gated", "image_size": 0})()]
        self.warmed_up = {"gated"}
        self.ready = True
        self.on_member = None

    def warm_up(self) -> None:
        pass

    def predict(self, images):
        self.calls.append(len(images))
        self.running.set()
        start = time.perf_counter()
        assert self.gate.wait(10), "the test never released the model"
        probs = np.full((len(images), 4), 0.1, np.float32)
        for i, image in enumerate(images):
            probs[i, int(image[0, 0, 0]) % 4] = 0.7
        if self.on_member:
            self.on_member("gated", time.perf_counter() - start)
        return probs, probs[None]


def _blob(cls: int, shade: int = 0) -> bytes:
    """A tiny PNG that the stand-in model classifies as `cls`."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (4 * shade + cls, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(client: TestClient, *classes: int) -> httpx.Response:
    files = [("files", (f"{i}.png", _blob(c, i), "image/png")) for i, c in enumerate(classes)]
    return client.post("/v1/predict", files=files)


def _tf_post(client: TestClient, cls: int) -> httpx.Response:
    instances = [{"b64": base64.b64encode(_blob(cls)).decode()}]
    return client.post("/v1/models/flowers:predict", json={"instances": instances})


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _answered_as(response: httpx.Response, *classes: int) -> bool:
    return response.status_code == 200 and [r["top"][0]["index"] for r in response.json()["results"]] == list(classes)


def test_past_max_queue_requests_get_503_at_once_and_the_admitted_ones_their_answers():
    model = GatedEnsemble()
    settings = Settings(run="unused", max_queue=3, max_batch_size=8, request_timeout_ms=0)
    with TestClient(create_app(settings, model)) as c, ThreadPoolExecutor(4) as pool:
        batcher = c.app.state.service.batcher
        first = pool.submit(_post, c, 1)  # the model takes it and holds it until the gate opens
        assert model.running.wait(5)
        queued = [pool.submit(_post, c, 2), pool.submit(_post, c, 3, 0)]
        _until(lambda: batcher.depth == 3)  # max_queue images wait
        refused = []
        for ask in (lambda: _post(c, 1), lambda: _tf_post(c, 2), lambda: _post(c, 0, 1, 2)):
            start = time.perf_counter()
            refused.append((ask(), time.perf_counter() - start))
        held = metric_samples(c.get("/metrics").text)
        assert not model.gate.is_set() and batcher.depth == 3  # answered while the model was busy; nothing queued
        model.gate.set()
        answers = [first.result(10), *(f.result(10) for f in queued)]
        assert _answered_as(answers[0], 1) and _answered_as(answers[1], 2) and _answered_as(answers[2], 3, 0)
        assert _answered_as(_post(c, 2, 3), 2, 3)  # and it keeps serving
        metrics = metric_samples(c.get("/metrics").text)
    for response, seconds in refused:
        assert response.status_code == 503 and seconds < 0.5, seconds  # the model was held all along
        assert int(response.headers["retry-after"]) >= 1
    assert refused[0][0].json()["error"]["kind"] == "overloaded" and "--max-queue" in refused[1][0].json()["error"]
    assert sum(model.calls) == 6 and model.calls[0] == 1  # 1 + 3 admitted + 2: the refused never reached it
    assert metric_value(held, "flower_queue_depth_images") == 3 and metric_value(held, "flower_inflight_requests") == 4
    assert metric_value(metrics, "flower_queue_depth_images", required=True) == 0
    assert metric_value(metrics, "flower_rejected_requests_total", reason="overloaded") == 3
    assert metric_value(metrics, "flower_errors_total", kind="overloaded") == 3
    assert metric_value(metrics, "flower_batch_size_images_count") == len(model.calls)
    assert metric_value(metrics, "flower_batch_size_images_sum") == 6 == metric_value(metrics, "flower_images_total")
    assert metric_value(metrics, "flower_queue_wait_seconds_count") == 6
    assert metric_value(metrics, "flower_member_inference_seconds_count", member="gated") == len(model.calls)
    assert metric_value(metrics, "flower_requests_total", method="POST", route="/v1/predict", status="503") == 2
    assert metric_value(metrics, "flower_requests_total", method="POST", route="/v1/models/{name}:predict",
                  status="503") == 1


def test_a_request_past_its_deadline_gets_504_and_its_images_never_reach_the_model():
    model = GatedEnsemble()
    settings = Settings(run="unused", max_queue=4, request_timeout_ms=500)
    with TestClient(create_app(settings, model)) as c, ThreadPoolExecutor(4) as pool:
        batcher = c.app.state.service.batcher
        running = pool.submit(_post, c, 1)
        assert model.running.wait(5)
        late = [pool.submit(_post, c, 2, 3), pool.submit(_tf_post, c, 0)]
        _until(lambda: batcher.depth == 3)
        start = time.perf_counter()
        late = [f.result(10) for f in late]
        waited = time.perf_counter() - start
        assert batcher.depth == 0 and not model.gate.is_set()  # the slots are free while the model is still busy
        running = running.result(10)  # its image is in the running batch: not interrupted, but answered 504
        model.gate.set()
        assert _answered_as(_post(c, 2, 3, 0), 2, 3, 0)
        metrics = metric_samples(c.get("/metrics").text)
    assert [r.status_code for r in (*late, running)] == [504, 504, 504] and waited < 2
    assert late[0].json()["error"]["kind"] == "timeout" and "--request-timeout-ms 500 ms" in late[1].json()["error"]
    assert model.calls == [1, 3]  # the running image, then the last request: the late requests' 3 never ran
    assert metric_value(metrics, "flower_rejected_requests_total", reason="timeout") == 3
    assert metric_value(metrics, "flower_rejected_requests_total", reason="overloaded") == 0
    assert metric_value(metrics, "flower_queue_depth_images", required=True) == 0
    assert metric_value(metrics, "flower_batch_size_images_sum") == 4 == metric_value(metrics, "flower_images_total")


def test_with_batching_off_max_queue_bounds_the_images_being_served():
    model = GatedEnsemble()
    settings = Settings(run="unused", batching=False, max_queue=2, request_timeout_ms=800)
    with TestClient(create_app(settings, model)) as c, ThreadPoolExecutor(4) as pool:
        batcher = c.app.state.service.batcher
        served = [pool.submit(_post, c, 1), pool.submit(_post, c, 2)]
        _until(lambda: batcher.depth == 2)
        start = time.perf_counter()
        refused = _post(c, 3)
        assert time.perf_counter() - start < 0.5 and refused.status_code == 503
        assert refused.headers["retry-after"] and refused.json()["error"]["kind"] == "overloaded"
        assert [f.result(10).status_code for f in served] == [504, 504]  # the model never answered in time
        assert batcher.depth == 0
        model.gate.set()
        assert _answered_as(_post(c, 3), 3)
        metrics = metric_samples(c.get("/metrics").text)
    assert metric_value(metrics, "flower_rejected_requests_total", reason="overloaded") == 1
    assert metric_value(metrics, "flower_rejected_requests_total", reason="timeout") == 2
    assert metric_value(metrics, "flower_queue_depth_images", required=True) == 0


def test_model_loads_and_member_times_are_exposed():
    metrics = Metrics()
    metrics.model_load("flowers", "1", "loaded")
    metrics.model_load("flowers", "2", "failed")
    metrics.model_load("flowers", "3", "loaded")
    metrics.model_unload("flowers", "1")
    metrics.member("m32", 0.02)
    metrics.member("m32", 0.04)
    samples = metric_samples(metrics.render())
    assert metric_value(samples, "flower_model_loads_total", model="flowers", version="2", outcome="failed") == 1
    assert metric_value(samples, "flower_model_loads_total", model="flowers", version="3", outcome="loaded") == 1
    assert metric_value(samples, "flower_model_version_loaded", required=True, model="flowers", version="1") == 0
    assert metric_value(samples, "flower_model_version_loaded", model="flowers", version="3") == 1
    assert ("flower_model_version_loaded", frozenset({("model", "flowers"), ("version", "2")})) not in samples
    assert metric_value(samples, "flower_member_inference_seconds_count", member="m32") == 2
    assert metric_value(samples, "flower_member_inference_seconds_sum", member="m32") == pytest.approx(0.06)
    assert metric_value(samples, "flower_member_inference_seconds_bucket", member="m32", le="0.025") == 1


def test_the_new_settings_come_from_flags_or_the_environment(monkeypatch):
    monkeypatch.setenv("FLOWER_MAX_QUEUE", "7")
    settings = parse_settings(["--run", "x", "--request-timeout-ms", "1500"])
    assert settings.max_queue == 7 and settings.request_timeout_ms == 1500
    assert Settings(run="x").request_timeout_ms == 30_000 and Settings(run="x", max_queue=1).max_queue == 1
    for argv in (["--max-queue", "0"], ["--request-timeout-ms", "-1"]):
        with pytest.raises(ValidationError):
            parse_settings(["--run", "x", *argv])


def test_the_metrics_directory_is_fresh_set_for_the_workers_and_removed(monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/somewhere/else")
    with metrics_dir() as path:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path and os.listdir(path) == []
    assert not os.path.exists(path) and os.environ["PROMETHEUS_MULTIPROC_DIR"] == "/somewhere/else"


# --- two uvicorn workers ------------------------------------------------------------------------------

def _served_by_pid(directory, route: str) -> dict[str, float]:
    """Requests to `route` each worker counted, from its own file in the multiprocess directory."""
    counts = {}
    for file in directory.glob("counter_*.db"):
        pid = file.stem.split("_")[-1]
        counts[pid] = sum(s.value for metric in MultiProcessCollector.merge([str(file)]) for s in metric.samples
                          if s.name == "flower_requests_total" and s.labels.get("route") == route)
    return {pid: n for pid, n in counts.items() if n}


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
            if stat and int(stat.rpartition(")")[2].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            pass
    return found


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting for its parent's wait does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_workers_report_one_sum_whichever_answers_the_scrape_and_end_with_their_supervisor(tmp_path_factory,
                                                                                             monkeypatch):
    run = make_run(tmp_path_factory.mktemp("overload"), "m32", 32)  # one member: the test is about the workers
    tmp = tmp_path_factory.mktemp("tmp")
    port = free_port()
    process = start_server(["--run", str(run), "--workers", "2"], port, env={"TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}"
    try:
        [directory] = tmp.glob("flower-metrics-*")
        files = [("files", ("a.jpg", image_bytes(), "image/jpeg"))]
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while len(_served_by_pid(directory, "/v1/predict")) < 2 and sent < 160:
                list(pool.map(lambda _: httpx.post(f"{url}/v1/predict", files=files, timeout=30), range(8)))
                sent += 8
        assert len(_served_by_pid(directory, "/v1/predict")) == 2, "one worker served every request"
        totals = []
        for _ in range(40):
            samples = metric_samples(httpx.get(f"{url}/metrics", headers={"connection": "close"}).text)
            totals.append(sum(v for (name, labels), v in samples.items()
                              if name == "flower_requests_total" and ("route", "/v1/predict") in labels))
            if len(totals) >= 6 and len(_served_by_pid(directory, "/metrics")) == 2:
                break
        assert set(totals) == {sent} and len(_served_by_pid(directory, "/metrics")) == 2, totals
        children = _children(process.pid)
    finally:
        process.kill()  # SIGKILL: the supervisor cannot stop its workers itself
        process.wait(20)
    assert set(_served_by_pid(directory, "/v1/predict")) <= {str(pid) for pid in children}  # the two workers
    assert any("resource_tracker" in line for line in children.values()), children
    deadline = time.monotonic() + 10
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_running, children)), {p: children[p] for p in children if _running(p)}
    listen("127.0.0.1", port).close()  # the port is free again
    assert directory.exists()  # left behind by the killed supervisor, and removed by the next start:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with metrics_dir() as fresh:
        assert not directory.exists() and Path(fresh).parent == tmp


def test_a_start_removes_the_metrics_folders_of_dead_supervisors_and_keeps_live_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = ("flower-metrics-dead", "flower-metrics-live", "other", ".flower-metrics-being-made")
    dead, live, other, new = (tmp_path / name for name in names)
    for folder in (dead, live, other, new):  # `new`: a server starting beside this one, before it takes its lock
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"")
    with folder_lock(live), metrics_dir() as path:  # `live` is held locked, as its supervisor holds it
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, new.name,
                                                                     Path(path).name])
        assert Path(path).name.startswith("flower-metrics-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, new.name])


# A worker tied to its supervisor by follow_supervisor says so with its pid, then sleeps; the supervisor (the
# test's child) starts it and sleeps. Without a C library to ask the kernel, the watchdog alone ties them.
TIED_WORKER = ("import ctypes, os, sys, time\nfrom service.serving import follow_supervisor\n{no_libc}"
               "follow_supervisor(int(sys.argv[1]))\nprint('tied', os.getpid(), flush=True)\ntime.sleep(60)\n")
SUPERVISOR = ("import os, subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())])\ntime.sleep(60)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's tie is Linux's")
@pytest.mark.parametrize("tie", ["kernel", "watchdog"])
def test_a_worker_ends_with_its_supervisor_even_one_killed_with_sigkill(tie):
    no_libc = "def no_libc(*args, **kwargs):\n    raise OSError('no libc')\nctypes.CDLL = no_libc\n"
    worker = TIED_WORKER.format(no_libc=no_libc if tie == "watchdog" else "")
    with subprocess.Popen([sys.executable, "-c", SUPERVISOR, worker], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as supervisor:
        line = supervisor.stdout.readline()
        assert line.startswith("tied "), supervisor.stderr.read() if not line else line
        supervisor.kill()
    worker_pid = int(line.split()[1])
    try:
        start = time.monotonic()
        while _running(worker_pid) and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert not _running(worker_pid) and time.monotonic() - start < (1.0 if tie == "kernel" else 3.0)
    finally:
        if _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_a_worker_whose_supervisor_is_already_gone_stops_before_loading_anything(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = gone.stdout.strip()
    code = "import sys, service.server; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FLOWER_SUPERVISOR_PID": pid, "FLOWER_RUN": str(tmp_path)})
    assert result.returncode == -signal.SIGTERM and result.stdout == "", result.stdout + result.stderr[-2000:]
    assert result.stderr.strip().endswith(f"its supervisor, process {pid}, is gone: stopping")

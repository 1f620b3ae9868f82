"""Start the classification service.

    flower serve --ensemble demo/ensemble [--host 127.0.0.1] [--port 8000] [--workers 1]
    flower serve --run demo/runs/demo-cnn-64
    flower serve --model-repository models/ [--poll-seconds 10]   # models/<name>/<version>/, hot reload

Every flag can also come from the environment: FLOWER_ENSEMBLE, FLOWER_RUN, FLOWER_MODEL_REPOSITORY,
FLOWER_POLL_SECONDS, FLOWER_TTA, FLOWER_RUNTIME, FLOWER_HOST, FLOWER_PORT,
FLOWER_WORKERS, FLOWER_BATCHING, FLOWER_MAX_BATCH_SIZE, FLOWER_MAX_WAIT_MS, FLOWER_MAX_QUEUE,
FLOWER_REQUEST_TIMEOUT_MS, FLOWER_MAX_IMAGE_BYTES,
FLOWER_MAX_PIXELS, FLOWER_MAX_IMAGES, FLOWER_MAX_REQUEST_PIXELS, FLOWER_MAX_INFLIGHT_PIXELS,
FLOWER_DOWNSCALE_PIXELS, FLOWER_BODY_TIMEOUT, FLOWER_KEEP_ALIVE_TIMEOUT, FLOWER_LIMIT_CONCURRENCY,
FLOWER_API_KEY, FLOWER_PROTECT, FLOWER_MODEL_NAME. Flags win over the environment; --ensemble, --run or
--model-repository on the command line also sets aside the other two from the environment.
The models are loaded and checked (a warm-up prediction each) before the address is printed; a model
that cannot be served is one line 'error: ...' and a non-zero exit status. Stop it with Ctrl-C.
With --workers N > 1 the workers' Prometheus metrics go to a fresh temporary PROMETHEUS_MULTIPROC_DIR
(removed at exit), and /metrics adds up every worker's, whichever worker answers it. The workers never outlive
this process: killed even with SIGKILL, its workers stop (SIGTERM: they finish the requests in flight, at
most 30 s) and free the port, and the next start removes the metrics folder it left behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import FlowerError, Kind
from core.files import folder_lock, remove_if_stale
from service.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as service.telemetry reads it (not imported: --help stays light)
METRICS_PREFIX = "flower-metrics-"
SUPERVISOR_ENV = "FLOWER_SUPERVISOR_PID"  # the `flower serve` process whose uvicorn workers these are
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_SECONDS = 30.0  # a worker whose supervisor is gone finishes its requests in flight, then is ended


def hand_to_workers(settings: Settings) -> None:
    """Workers are separate processes: hand them the settings through the environment (unset ones removed)."""
    for name, value in settings.model_dump().items():
        if value is None:
            os.environ.pop(f"FLOWER_{name.upper()}", None)
        else:
            os.environ[f"FLOWER_{name.upper()}"] = str(value)


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening address now (a busy port fails before the models load); uvicorn starts listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def load_checked(settings: Settings) -> Any:
    """The models, loaded and warmed up (a damaged or non-finite member raises, naming it).

    With one worker they are loaded here and handed to the server. Workers are separate processes that
    load their own, so then they are only checked, in a child process, and None is returned.
    """
    if settings.workers == 1:
        from service.app import load_models

        repository = load_models(settings)
        problem = repository_problem(repository, settings)
        if problem:
            raise ModelError(problem)
        return repository
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        problem = pool.submit(_check_in_child, settings.model_dump(), os.getpid()).result()
    if problem:
        raise ModelError(problem)
    return None


class ModelError(FlowerError):
    """The models cannot be served; the message says which and why."""

    kind = Kind.UNAVAILABLE


def _check_in_child(values: dict, supervisor: int) -> str | None:
    """Load and warm up the models in this (child) process; the problem as a line, or None."""
    follow_supervisor(supervisor)
    from service.app import load_models

    try:
        settings = Settings(**values)
        return repository_problem(load_models(settings), settings)
    except Exception as err:  # noqa: BLE001 - every failure becomes the parent's error line
        return _describe(err)


def repository_problem(repository: Any, settings: Settings) -> str | None:
    """Why a loaded repository cannot serve at all (no version folder, or none loads), else None; versions that
    failed beside ones that load are warned about on stderr, and their status routes say why."""
    if not repository.models:
        return (f"model repository {settings.model_repository} holds no model version folders "
                f"(<model name>/<version number>/, each an ensemble or run directory)")
    failed = [f"{v.model} version {v.number}: {v.detail or v.error}" for vs in repository.models.values()
              for v in vs.values() if v.error]
    if all(repository.latest(name) is None for name in repository.models):
        return "no version of any model could be loaded: " + "; ".join(failed)
    for line in failed:
        print(f"warning: {line} (not served)", file=sys.stderr)
    return None


def _describe(err: Exception) -> str:
    """An error line's text: an ArtifactError's own message (it names the file), else the type and message."""
    from service.predictor import ArtifactError

    return str(err) if isinstance(err, ArtifactError | ModelError) else f"{type(err).__name__}: {err}"


def uvicorn_config(settings: Settings, app: Any) -> Any:
    """uvicorn's configuration: the app (object, or import string for workers) and the slow-client limits."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, workers=settings.workers,
                          log_level="warning", timeout_keep_alive=settings.keep_alive_timeout,
                          limit_concurrency=settings.limit_concurrency)


def serve(settings: Settings, repository: Any, sock: socket.socket) -> None:
    """Run uvicorn on the bound socket until Ctrl-C: the loaded models, or workers that each load them."""
    import uvicorn

    if repository is not None:
        from service.app import create_app

        config = uvicorn_config(settings, create_app(settings, repository=repository))
        uvicorn.Server(config).run(sockets=[sock])
    else:
        from uvicorn.supervisors import Multiprocess

        os.environ[SUPERVISOR_ENV] = str(os.getpid())  # read by each worker as it starts (service/server.py)
        try:
            with metrics_dir():
                Multiprocess(uvicorn_config(settings, "service.server:app"), sockets=[sock]).run()
        finally:  # a later server started from this process (a test, an embedding) follows no dead supervisor
            os.environ.pop(SUPERVISOR_ENV, None)


@contextmanager
def metrics_dir() -> Iterator[str]:
    """A fresh temporary PROMETHEUS_MULTIPROC_DIR while workers serve (prometheus_client's multiprocess mode:
    each worker writes its metrics there, /metrics adds them up); removed, and the variable restored, at exit.

    It must be set before the workers start: prometheus_client chooses its mode when a process imports it. The
    folder is locked while this process lives; folders that no live process holds locked (left by a server
    killed with SIGKILL) are removed first.
    """
    for stale in Path(tempfile.gettempdir()).glob(METRICS_PREFIX + "*"):
        if stale.is_dir() and not stale.is_symlink():
            remove_if_stale(stale)
    previous = os.environ.get(MULTIPROC_ENV)
    made = Path(tempfile.mkdtemp(prefix="." + METRICS_PREFIX))  # hidden from the sweep above until it is locked
    path = made.with_name(made.name[1:])
    try:
        with folder_lock(made):
            os.rename(made, path)
            os.environ[MULTIPROC_ENV] = str(path)
            yield str(path)
    finally:
        shutil.rmtree(made if made.exists() else path, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous


def follow_supervisor(supervisor: int | None = None) -> None:
    """Make this worker process end when its supervisor (`flower serve`) ends, however it ends (even SIGKILL).

    The supervisor is `supervisor`, else the process FLOWER_SUPERVISOR_PID names (nothing to follow without it:
    an app started by plain uvicorn). On Linux the kernel sends SIGTERM when the parent ends (prctl
    PR_SET_PDEATHSIG); everywhere a watchdog thread checks the parent every second, sends SIGTERM (uvicorn then
    finishes the requests in flight) and ends the process STOP_GRACE_SECONDS later if it still runs.
    """
    if supervisor is None:
        text = os.environ.get(SUPERVISOR_ENV, "")
        if not text.isdigit():
            return
        supervisor = int(text)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no libc to ask: the watchdog alone
            pass
    if os.getppid() != supervisor:  # it ended before the kernel was asked
        _stop(supervisor, 0.0)
    threading.Thread(target=_watch, args=(supervisor,), daemon=True, name="flower-supervisor-watch").start()


def _watch(supervisor: int) -> None:
    """Wait until the parent is no longer `supervisor`, then stop this process."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    _stop(supervisor, STOP_GRACE_SECONDS)


def _stop(supervisor: int, grace: float) -> None:
    """Say why, send this process SIGTERM, and end it outright after `grace` seconds if it still runs."""
    try:
        print(f"worker {os.getpid()}: its supervisor, process {supervisor}, is gone: stopping", file=sys.stderr,
              flush=True)
    except (OSError, ValueError):  # stderr went with the supervisor (a pipe nobody reads any more): stop anyway
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)

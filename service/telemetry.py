"""Telemetry: the service's Prometheus metrics (with `prometheus_client`) and the ASGI middleware that counts
every request into them.

Each `Metrics` has its own `CollectorRegistry`, so that many apps can live in one process (tests). Under
`--workers N` the command sets PROMETHEUS_MULTIPROC_DIR to a fresh directory before the workers start
(service/serving.py): prometheus_client then keeps every worker's values in files there, and `render()` adds up
all workers' files, so /metrics answers the same totals whichever worker serves the scrape.
"""

from __future__ import annotations

import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOADED = "loaded"  # the outcome of a model load that serves the version

disable_created_metrics()  # no *_created series: they double the exposition and Prometheus does not need them


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when this process runs in it (else None)."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The service's counters, gauges and histograms (thread-safe: prometheus_client locks each value)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_dir()
        self._depths: dict[int, int] = {}  # images waiting at each batcher (one per model version)
        self._depth_lock = threading.Lock()
        self._requests = self._counter("flower_requests_total", "HTTP requests by method, route and status.",
                                       "method", "route", "status")
        self._latency = Histogram("flower_request_duration_seconds", "HTTP request latency by route.", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._errors = self._counter("flower_errors_total", "Client and server errors by kind.", "kind")
        self._rejected = self._counter("flower_rejected_requests_total", "Requests refused by the batcher: "
                                       "'overloaded' (queue full, 503) or 'timeout' (deadline passed, 504).", "reason")
        self._batch_size = Histogram("flower_batch_size_images", "Images per model batch.", buckets=BATCH_BUCKETS,
                                     registry=self.registry)
        self._batch_seconds = Histogram("flower_batch_duration_seconds", "Seconds per model batch.",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self._queue_wait = Histogram("flower_queue_wait_seconds", "Seconds from an image's submission until the "
                                     "model batch holding it starts.", buckets=WAIT_BUCKETS, registry=self.registry)
        self._member = Histogram("flower_member_inference_seconds", "Seconds per model batch of one member.",
                                 ["member"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._queue_depth = self._gauge("flower_queue_depth_images", "Images waiting for the model (with batching "
                                        "off: images being served).", "livesum")
        self._inflight = self._gauge("flower_inflight_requests", "HTTP requests being served (a scrape counts "
                                     "itself).", "livesum")
        self._images = self._counter("flower_images_total", "Images run through the model.")
        self._loads = self._counter("flower_model_loads_total", "Model loads by model, version and outcome.",
                                    "model", "version", "outcome")
        self._loaded = self._gauge("flower_model_version_loaded", "1 while the model version is loaded and "
                                   "served, else 0.", "livemax", "model", "version")

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        """A counter in this registry."""
        return Counter(name, documentation, list(labels), registry=self.registry)

    def _gauge(self, name: str, documentation: str, mode: str, *labels: str) -> Gauge:
        """A gauge in this registry; `mode` says how workers' values combine under multiprocess mode."""
        return Gauge(name, documentation, list(labels), registry=self.registry, multiprocess_mode=mode)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self._requests.labels(method, route, str(status)).inc()
        self._latency.labels(route).observe(seconds)

    def inflight(self, delta: int) -> None:
        """A request started (+1) or finished (-1)."""
        self._inflight.inc(delta)

    def error(self, kind: str) -> None:
        """Count one error by kind."""
        self._errors.labels(kind).inc()

    def rejected(self, reason: str) -> None:
        """Count one request the batcher refused: 'overloaded' or 'timeout'."""
        self._rejected.labels(reason).inc()

    def batch(self, size: int, seconds: float) -> None:
        """Record one model batch."""
        self._batch_size.observe(size)
        self._batch_seconds.observe(seconds)
        self._images.inc(size)

    def queue_wait(self, seconds: float) -> None:
        """Record how long one image waited for its model batch to start."""
        self._queue_wait.observe(seconds)

    def queue_depth(self, images: int, source: object = None) -> None:
        """Set the images waiting at one batcher (`source`; each model version has its own); the gauge is their sum."""
        with self._depth_lock:
            if images:
                self._depths[id(source)] = images
            else:
                self._depths.pop(id(source), None)
            self._queue_depth.set(sum(self._depths.values()))

    def member(self, name: str, seconds: float) -> None:
        """Record one member's inference time for one batch."""
        self._member.labels(name).observe(seconds)

    def model_load(self, model: str, version: str, outcome: str) -> None:
        """Count one load of a model version; outcome 'loaded' marks the version loaded (any other, e.g. 'failed',
        is only counted)."""
        self._loads.labels(model, str(version), outcome).inc()
        if outcome == LOADED:
            self._loaded.labels(model, str(version)).set(1)

    def model_unload(self, model: str, version: str) -> None:
        """Mark a model version no longer loaded."""
        self._loaded.labels(model, str(version)).set(0)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4): of this process, or of every worker in multiprocess mode."""
        if self.multiprocess is None:
            return generate_latest(self.registry).decode()
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess)
        return generate_latest(registry).decode()

    def close(self) -> None:
        """This process stops serving: in multiprocess mode its live gauges (queue depth, in flight, loaded
        versions) no longer count."""
        if self.multiprocess is not None and os.path.isdir(self.multiprocess):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiprocess)


class RequestMetrics:
    """Pure ASGI middleware counting requests by method, route template and status, with latency and the number
    in flight.

    (A pure ASGI middleware costs a fraction of what @app.middleware("http") adds per request.) It counts
    into `app.state.service.metrics` of the application that received the request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; note its status and duration once it is answered."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        metrics: Metrics = scope["app"].state.service.metrics

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        metrics.inflight(1)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics.inflight(-1)
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.request(scope["method"], route, status[0], time.perf_counter() - start)

"""Telemetry: a small Prometheus text-format registry (request counts and latencies, batch sizes, errors by
kind) and the ASGI middleware that counts every request into it."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative-bucket histogram with sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """Prometheus exposition lines."""
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total}", f"{name}_count{suffix} {self.count}"]
        return out


class Metrics:
    """Thread-safe counters and histograms of the service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.errors: dict[str, int] = defaultdict(int)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.images = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        with self._lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str) -> None:
        """Count one error by kind."""
        with self._lock:
            self.errors[kind] += 1

    def batch(self, size: int, seconds: float) -> None:
        """Record one model batch."""
        with self._lock:
            self.batch_sizes.observe(size)
            self.batch_seconds.observe(seconds)
            self.images += size

    def render(self) -> str:
        """The Prometheus text exposition."""
        with self._lock:
            lines = ["# HELP flower_requests_total HTTP requests by method, route and status.",
                     "# TYPE flower_requests_total counter"]
            lines += [f'flower_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                      for (m, r, s), n in sorted(self.requests.items())]
            lines += ["# HELP flower_request_seconds Request latency by route.",
                      "# TYPE flower_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("flower_request_seconds", f'route="{route}"')
            lines += ["# HELP flower_errors_total Client and server errors by kind.",
                      "# TYPE flower_errors_total counter"]
            lines += [f'flower_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
            lines += ["# HELP flower_batch_size Images per model batch.", "# TYPE flower_batch_size histogram"]
            lines += self.batch_sizes.lines("flower_batch_size")
            lines += ["# HELP flower_batch_seconds Seconds per model batch.", "# TYPE flower_batch_seconds histogram"]
            lines += self.batch_seconds.lines("flower_batch_seconds")
            lines += ["# HELP flower_images_total Images classified.", "# TYPE flower_images_total counter",
                      f"flower_images_total {self.images}"]
            return "\n".join(lines) + "\n"


class RequestMetrics:
    """Pure ASGI middleware counting requests by method, route template and status, with latency.

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

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            scope["app"].state.service.metrics.request(scope["method"], route, status[0], time.perf_counter() - start)

#!/usr/bin/env python3
"""Benchmark the service against calling the model in-process (same model, same image).

    python scripts/bench_service.py [--backbone efficientnet-b0] [--size 224] [--requests 40] [--seconds 12]
                                    [--members 3 [--extra efficientnet-lite0:192,efficientnetv2-b0:256]]

(a) latency p50 at concurrency 1 over HTTP vs. in-process on the same JPEG (goal: overhead <= 15%), the
    requests and the in-process calls taken in turns so that both see the same interference; the round with
    the median overhead is shown;
(b) images/s at concurrency 16 over HTTP vs. the model's own batch-32 throughput in-process
    (goal >= 0.85x), and vs. the same server with batching off (goal >= 1.5x); the best of the rounds.
One member (the default) serves a run directory, and in-process is its SavedModel: serving_default on the
JPEG for (a), serving_pixels at batch 32 for (b). With --members N (> 1) the server serves an ensemble of
--backbone at --size and the first N-1 of --extra, blended with equal weights, and in-process is the same
ensemble loaded as the service loads it (`load_ensemble`): the JPEG decoded as the service decodes it and
EnsemblePredictor.predict on it for (a), on 32 decoded images for (b).
A real uvicorn process, a real HTTP client (httpx) on loopback, random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from bench_members import make_benchmark_ensemble, parse_members  # noqa: E402 (scripts/, beside this one)

from testkit.artifacts import flower_jpeg, free_port, make_benchmark_run, start_server  # noqa: E402

EXTRA_MEMBERS = "efficientnet-lite0:192,efficientnetv2-b0:256"


def paired_p50(url: str, blob: bytes, count: int, direct: Callable[[], object]) -> tuple[float, float]:
    """Median seconds of sequential predictions over HTTP and of the same prediction in-process, taken in turns
    (one request, one in-process call, ...) so that both see the same interference."""
    http, local = [], []
    with httpx.Client(timeout=60) as client:
        for i in range(count + 3):
            start = time.perf_counter()
            response = client.post(url + "/v1/predict", files=[("files", ("f.jpg", blob, "image/jpeg"))])
            middle = time.perf_counter()
            response.raise_for_status()
            direct()
            if i >= 3:
                http.append(middle - start)
                local.append(time.perf_counter() - middle)
    return statistics.median(http), statistics.median(local)


def http_throughput(url: str, blob: bytes, clients: int, seconds: float) -> tuple[float, int]:
    """Images/s with `clients` threads posting one image each, back to back, for `seconds`."""
    done, errors = [0], [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker():
        with httpx.Client(timeout=120) as client:
            while time.perf_counter() < stop:
                response = client.post(url + "/v1/predict", files=[("files", ("f.jpg", blob, "image/jpeg"))])
                with lock:
                    if response.status_code == 200:
                        done[0] += 1
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - start), errors[0]


def in_process_run(run: Path, blob: bytes, size: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """The run's SavedModel in-process: serving_default on the JPEG, and serving_pixels on a batch of 32."""
    import tensorflow as tf

    model = tf.saved_model.load(str(run / "saved_model"))
    single, pixels = model.signatures["serving_default"], model.signatures["serving_pixels"]
    jpeg = tf.constant([blob])
    batch = tf.constant(np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype(np.float32))
    return (lambda: single(image_bytes=jpeg)["probabilities"].numpy(),
            lambda: pixels(images=batch)["probabilities"].numpy())


def in_process_ensemble(ens: Path, blob: bytes) -> tuple[Callable[[], object], Callable[[], object]]:
    """The ensemble loaded as the service loads it: the JPEG decoded as the service decodes it and predicted,
    and a batch of 32 decoded images predicted."""
    from service.images import decode_image
    from service.predictor import load_ensemble

    predictor = load_ensemble(ens)
    batch = [decode_image(blob, 40_000_000) for _ in range(32)]
    return lambda: predictor.predict([decode_image(blob, 40_000_000)]), lambda: predictor.predict(batch)


def batch_rate(batch32: Callable[[], object], calls: int = 3) -> float:
    """Images/s of `calls` batch-32 calls after one warm-up call."""
    batch32()
    start = time.perf_counter()
    for _ in range(calls):
        batch32()
    return calls * 32 / (time.perf_counter() - start)


def serve_and_measure(args: argparse.Namespace, model: list[str], blob: bytes, single: Callable[[], object],
                      batch32: Callable[[], object]) -> tuple[list[float], dict[str, list]]:
    """Alternating rounds: the in-process batch-32 rate, the server with batching (p50 paired with in-process
    calls, concurrency 16) and without (concurrency 16)."""
    rates = [batch_rate(batch32)]
    results: dict[str, list] = {"batching": [], "no batching": []}
    for _ in range(args.rounds):
        for label, flags in (("batching", ["--max-wait-ms", str(args.max_wait_ms), "--max-batch-size", "32"]),
                             ("no batching", ["--no-batching"])):
            port = free_port()
            server = start_server([*model, *flags], port, timeout=600)
            try:
                url = f"http://127.0.0.1:{port}"
                p50 = paired_p50(url, blob, args.requests, single) if label == "batching" else (None, None)
                results[label].append((*p50, *http_throughput(url, blob, 16, args.seconds)))
            finally:
                server.terminate()
                server.wait(30)
        rates.append(batch_rate(batch32))
    return rates, results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet-b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--members", type=int, default=1, help="1: a run directory; N > 1: an ensemble of N")
    parser.add_argument("--extra", default=EXTRA_MEMBERS, help="backbone:size,... of the members after the first")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests for the p50 (each "
                        "followed by one in-process call)")
    parser.add_argument("--seconds", type=float, default=12, help="duration of each concurrency-16 run")
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (p50: the median round, "
                        "images/s: the best)")
    args = parser.parse_args(argv)
    specs = [(args.backbone, args.size), *parse_members(args.extra)[:args.members - 1]]
    with tempfile.TemporaryDirectory() as tmp:
        blob = flower_jpeg(args.size)
        if args.members == 1:
            run = make_benchmark_run(Path(tmp), args.backbone, args.size)
            model, against = ["--run", str(run)], "in-process serving_default"
            single, batch32 = in_process_run(run, blob, args.size)
        else:
            ens = make_benchmark_ensemble(Path(tmp), specs)
            model, against = ["--ensemble", str(ens)], "in-process decode + predict"
            single, batch32 = in_process_ensemble(ens, blob)
        # The machine is shared and switches between two speed modes; interference only slows things down,
        # so each throughput is the best of alternating rounds, and the p50s are taken in turns.
        rates, results = serve_and_measure(args, model, blob, single, batch32)
    report(specs, against, rates, results)
    return 0


def report(specs: list[tuple[str, int]], against: str, rates: list[float], results: dict[str, list]) -> None:
    """Print the table: the p50 overhead of the round with the median overhead, the best throughput of the rounds
    and the ratios."""
    pairs = sorted((http / local, http, local) for http, local, _, _ in results["batching"])
    overhead, http_p50_s, direct_p50 = pairs[(len(pairs) - 1) // 2]
    direct_batch32 = max(rates)
    batched, unbatched = (max(row[2] for row in results[label]) for label in ("batching", "no batching"))
    errors, errors_off = (sum(row[3] for row in results[label]) for label in ("batching", "no batching"))
    print(f"\n{' + '.join(f'{b} at {s} px' for b, s in specs)}, {os.cpu_count()} CPUs")
    print("| measure | value | against | ratio | goal |\n|---|---|---|---|---|")
    print(f"| p50 latency, concurrency 1, HTTP | {1000 * http_p50_s:.1f} ms | {against} "
          f"{1000 * direct_p50:.1f} ms | overhead {100 * (overhead - 1):+.1f}% | <= +15% |")
    print(f"| images/s, concurrency 16, HTTP, batching | {batched:.1f} | in-process batch 32 {direct_batch32:.1f} | "
          f"{batched / direct_batch32:.2f}x | >= 0.85x |")
    print(f"| images/s, concurrency 16, HTTP, batching | {batched:.1f} | same server, batching off {unbatched:.1f} | "
          f"{batched / unbatched:.2f}x | >= 1.5x |")
    print(f"p50 overhead per round: {', '.join(f'{100 * (p[0] - 1):+.1f}%' for p in pairs)} (sorted); "
          f"errors: {errors} with batching, {errors_off} without")


if __name__ == "__main__":
    sys.exit(main())

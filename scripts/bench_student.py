#!/usr/bin/env python3
"""Serve a distilled student and its teacher ensemble in turns: images/s with several clients, p50 with one.

    python scripts/bench_student.py ENSEMBLE STUDENT_RUN --data data/flowers5 [--clients 8] [--seconds 20]
                                    [--requests 60] [--rounds 2] [--size 128]

Each round starts `flower serve --ensemble ENSEMBLE` and then `flower serve --run STUDENT_RUN` on a loopback port
(the same runtime, batching and settings: the defaults), and measures each: the p50 of `--requests` sequential
requests from one client, then images/s with `--clients` clients posting one photo each, back to back, for
`--seconds`. The photo is the first test record of the data folder at `--size` (a real JPEG). Images/s is the best
of the rounds, the p50 the median round's; the ratios are student / ensemble (the machine is shared: only ratios
measured in one run count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import httpx  # noqa: E402
from bench_service import http_throughput  # noqa: E402 (scripts/, beside this one)
from quality import split_images  # noqa: E402

from testkit.artifacts import free_port, start_server  # noqa: E402


def p50(url: str, blob: bytes, count: int) -> float:
    """Median seconds of `count` sequential requests (after 3 warm-ups) from one client."""
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(count + 3):
            start = time.perf_counter()
            client.post(url + "/v1/predict", files=[("files", ("f.jpg", blob, "image/jpeg"))]).raise_for_status()
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(flags: list[str], blob: bytes, args: argparse.Namespace) -> tuple[float, float, int]:
    """(p50 seconds, images/s, errors) of one freshly started server."""
    port = free_port()
    server = start_server(flags, port, timeout=600)
    try:
        url = f"http://127.0.0.1:{port}"
        latency = p50(url, blob, args.requests)
        rate, errors = http_throughput(url, blob, args.clients, args.seconds)
        return latency, rate, errors
    finally:
        server.terminate()
        server.wait(30)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble")
    parser.add_argument("student")
    parser.add_argument("--data", required=True, help="a data folder: its first test record is the photo sent")
    parser.add_argument("--size", type=int, default=128, help="the record size of the photo sent")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    blob = split_images(Path(args.data), args.size)[0][1]
    models = {"ensemble": ["--ensemble", str(Path(args.ensemble).resolve())],  # the server runs in the repository
              "student": ["--run", str(Path(args.student).resolve())]}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, flags in models.items():
            results[name].append(measure(flags, blob, args))
    best = {name: max(r[1] for r in rows) for name, rows in results.items()}
    median = {name: statistics.median(r[0] for r in rows) for name, rows in results.items()}
    print(f"\n{os.cpu_count()} CPUs, {args.rounds} rounds, {args.clients} clients x {args.seconds:g} s, "
          f"p50 of {args.requests} requests")
    print(f"| model | images/s, {args.clients} clients | p50, 1 client | errors |\n|---|---|---|---|")
    for name in models:
        errors = sum(r[2] for r in results[name])
        print(f"| {name} | {best[name]:.1f} | {1000 * median[name]:.1f} ms | {errors} |")
    print(f"student / ensemble: {best['student'] / best['ensemble']:.2f}x images/s, "
          f"{median['student'] / median['ensemble']:.2f}x p50")
    for name in models:
        print(f"{name} per round: " + ", ".join(f"{r[1]:.1f} img/s, {1000 * r[0]:.1f} ms" for r in results[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

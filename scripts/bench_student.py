#!/usr/bin/env python3
"""Serve a distilled student and its teacher ensemble in turns: images/s with several clients, p50 with one.

    python scripts/bench_student.py ENSEMBLE STUDENT_RUN --data data/flowers5 [--runtime tensorflow] [--clients 8]
                                    [--seconds 20] [--requests 150] [--rounds 3] [--size 128] [--split test]

Each round starts `flower serve --ensemble ENSEMBLE` and `flower serve --run STUDENT_RUN`, one at a time on a
loopback port (the order turns round by round), both with `--runtime RUNTIME` and otherwise the defaults, and
measures each: the p50 of `--requests` sequential requests from one client, then images/s with `--clients` clients
posting one photo per request, back to back, for `--seconds`, and the server process's CPU time per image
meanwhile. The photos are the JPEG records of DATA:SPLIT at `--size`, in turn. The load generator is
scripts/loadgen.py (it takes about 0.16 ms of CPU per request from the cores the server uses). The ratios are
student / ensemble, the medians of the rounds' ratios: only ratios measured in one run count, and only on a quiet
machine are two servers' speeds their own.
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

from bench_request_path import cpu_seconds  # noqa: E402 (scripts/, beside this one)
from loadgen import p50, request_bytes, throughput  # noqa: E402
from quality import split_images  # noqa: E402

from testkit.artifacts import free_port, start_server  # noqa: E402


def measure(flags: list[str], requests: list[bytes], args: argparse.Namespace) -> dict[str, float]:
    """p50 seconds, images/s and the server's CPU seconds per image of one freshly started server."""
    port = free_port()
    server = start_server([*flags, "--runtime", args.runtime], port, timeout=900)
    try:
        figures = {"p50": p50(port, requests, args.requests)}
        before, start = cpu_seconds(server.pid), time.perf_counter()
        figures["images_per_second"], _ = throughput(port, requests, args.clients, args.seconds)
        served = figures["images_per_second"] * (time.perf_counter() - start)
        figures["cpu_per_image"] = (cpu_seconds(server.pid) - before) / served
        return figures
    finally:
        server.terminate()
        server.wait(60)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble")
    parser.add_argument("student")
    parser.add_argument("--data", required=True, help="an imported data folder: its split's photos are sent")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=128, help="the record size of the photos sent")
    parser.add_argument("--runtime", default="tensorflow", help="both servers' --runtime")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    requests = [request_bytes(blob) for _, blob in split_images(Path(args.data), args.size, args.split)]
    models = {"ensemble": ["--ensemble", str(Path(args.ensemble).resolve())],  # the server runs in the repository
              "student": ["--run", str(Path(args.student).resolve())]}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name in list(models) if round_ % 2 == 0 else list(models)[::-1]:
            results[name].append(measure(models[name], requests, args))
            row = results[name][-1]
            print(f"round {round_ + 1} {name}: p50 {1000 * row['p50']:.1f} ms, {row['images_per_second']:.1f} "
                  f"images/s, server CPU {1000 * row['cpu_per_image']:.1f} ms/image", flush=True)
    pairs = list(zip(results["student"], results["ensemble"], strict=True))
    speed = statistics.median(s["images_per_second"] / e["images_per_second"] for s, e in pairs)
    latency = statistics.median(s["p50"] / e["p50"] for s, e in pairs)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; runtime {args.runtime}; "
          f"{args.rounds} rounds, {args.clients} clients x {args.seconds:g} s, p50 of {args.requests} requests, "
          f"{len(requests)} photos of {args.data}:{args.split}")
    print(f"| model | images/s, {args.clients} clients | p50, 1 client | server CPU ms/image |\n|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r['images_per_second'] for r in rows):.1f} | "
              f"{1000 * statistics.median(r['p50'] for r in rows):.1f} ms | "
              f"{1000 * statistics.median(r['cpu_per_image'] for r in rows):.1f} |")
    print(f"student / ensemble: **{speed:.2f}x** images/s, **{latency:.2f}x** p50 (medians of the rounds' ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

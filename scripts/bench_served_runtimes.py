#!/usr/bin/env python3
"""Benchmark: one ensemble served with `--runtime auto` against `--runtime tensorflow`, over HTTP, in one run.

    python scripts/bench_served_runtimes.py ENSEMBLE --data DATA [--split test] [--size 128] [--clients 8]
                                            [--seconds 20] [--requests 150] [--rounds 3] [--gflop 0.95]
                                            [--peak-gflops 166]

Each round starts `flower serve --ensemble ENSEMBLE --runtime R` for both runtimes, one after the other (the order
turns round by round, one server at a time), and measures on it:
  p50        one client posting one photo per request, back to back, --requests of them: the median latency
  images/s   --clients clients doing the same for --seconds (the server batches what arrives together), and the
             server process's CPU time per image meanwhile (all its threads): what a saturated machine's throughput
             divides, steadier than images/s when other jobs share the cores; and the load generator's own CPU
             time per image (asyncio over raw keep-alive sockets in one thread, requests made in advance: it shares
             the cores with the server, so it takes as little as it can). Run it on a quiet machine: the ratio of
             two servers' speed is only theirs when each has the cores to itself.
In the first round each server also answers every photo of DATA:SPLIT (the imported records' JPEGs, one per
request, with every class's probability): the largest difference between the two runtimes' probabilities is the
equality figure. The ratios are the medians of the rounds' ratios. The fraction of the machine's limit is images/s
over --peak-gflops / --gflop (the issue's figures for its machine: 2 cores x 32 FP32 FLOP/cycle x 2.6 GHz = 166
GFLOP/s, and 0.95 GFLOP per image for EfficientNet-Lite0/1/2 at 128 px: about 174 images/s). Each member's runtime,
as the server chose it, comes from its metadata route.
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
import numpy as np  # noqa: E402
from bench_request_path import cpu_seconds  # noqa: E402 (scripts/, beside this one)
from loadgen import p50, request_bytes, throughput  # noqa: E402
from quality import split_images  # noqa: E402

from testkit.artifacts import free_port, start_server  # noqa: E402

RUNTIMES = ("tensorflow", "auto")


def post(client: httpx.Client, blob: bytes, probabilities: bool = False) -> dict:
    """One photo to /v1/predict; its one result."""
    data = {"include_probabilities": "true"} if probabilities else None
    answer = client.post("/v1/predict", files=[("files", ("photo.jpg", blob, "image/jpeg"))], data=data)
    result = answer.raise_for_status().json()["results"][0]
    if not result["ok"]:
        raise SystemExit(f"the server refused a photo: {result['error']}")
    return result


def answers(client: httpx.Client, photos: list[tuple[str, bytes]]) -> np.ndarray:
    """Every photo's probabilities, in order."""
    return np.array([post(client, blob, probabilities=True)["probabilities"] for _, blob in photos])


def measure(ensemble: Path, runtime: str, photos: list[tuple[str, bytes]], args: argparse.Namespace,
            first: bool) -> dict:
    """Serve the ensemble on `runtime` and measure it (its answers too in the first round)."""
    port = free_port()
    server = start_server(["--ensemble", str(ensemble), "--runtime", runtime], port, timeout=900)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            figures = {"members": client.get("/v1/models/flowers/metadata").json()["flower"]["members"]}
            if first:
                figures["answers"] = answers(client, photos)
        requests = [request_bytes(blob) for _, blob in photos]
        figures["p50"] = p50(port, requests, args.requests)
        before, start = cpu_seconds(server.pid), time.perf_counter()
        figures["images_per_second"], figures["client_cpu_per_image"] = throughput(port, requests, args.clients,
                                                                                   args.seconds)
        served = figures["images_per_second"] * (time.perf_counter() - start)
        figures["cpu_per_image"] = (cpu_seconds(server.pid) - before) / served
    finally:
        server.terminate()
        server.wait(60)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the imported data folder (its test photos)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=128, help="the record size to read")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gflop", type=float, default=0.95, help="the ensemble's GFLOP per image")
    parser.add_argument("--peak-gflops", type=float, default=166.0, help="the machine's FP32 peak, GFLOP/s")
    args = parser.parse_args(argv)
    photos = split_images(args.data, args.size, args.split)
    rounds: dict[str, list[dict]] = {runtime: [] for runtime in RUNTIMES}
    for round_ in range(args.rounds):
        for runtime in RUNTIMES if round_ % 2 == 0 else RUNTIMES[::-1]:
            rounds[runtime].append(measure(args.ensemble, runtime, photos, args, first=round_ == 0))
            row = rounds[runtime][-1]
            print(f"round {round_ + 1} {runtime}: p50 {1000 * row['p50']:.1f} ms, {row['images_per_second']:.1f} "
                  f"images/s with {args.clients} clients", flush=True)
    report(args, photos, rounds)
    return 0


def report(args: argparse.Namespace, photos: list, rounds: dict[str, list[dict]]) -> None:
    """The table: each runtime's medians, the ratios (medians of the rounds'), the equality and the limit."""
    limit = args.peak_gflops / args.gflop
    tf_rounds, auto_rounds = rounds["tensorflow"], rounds["auto"]
    difference = float(np.abs(auto_rounds[0]["answers"] - tf_rounds[0]["answers"]).max())
    same_top = float(np.mean(auto_rounds[0]["answers"].argmax(1) == tf_rounds[0]["answers"].argmax(1)))
    speed = statistics.median(a["images_per_second"] / t["images_per_second"]
                              for a, t in zip(auto_rounds, tf_rounds, strict=True))
    latency = statistics.median(a["p50"] / t["p50"] for a, t in zip(auto_rounds, tf_rounds, strict=True))
    cpu = statistics.median(t["cpu_per_image"] / a["cpu_per_image"] for a, t in zip(auto_rounds, tf_rounds,
                                                                                     strict=True))
    print(f"\n{args.ensemble}: {len(photos)} photos of {args.data}:{args.split}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; limit {limit:.0f} images/s ({args.peak_gflops:g} GFLOP/s / "
          f"{args.gflop:g} GFLOP per image)")
    chosen = [(m["name"], m["runtime"]["name"]) for m in auto_rounds[0]["members"]]
    print(f"members' runtimes under auto: {chosen}")
    print(f"| runtime | p50, 1 client | images/s, {args.clients} clients | fraction of the limit | server CPU ms/image "
          "| load generator CPU ms/image | rounds: p50 ms; images/s; CPU ms/image |\n|---|---|---|---|---|---|---|")
    for runtime, rows in rounds.items():
        rate = statistics.median(r["images_per_second"] for r in rows)
        latencies = ", ".join(f"{1000 * r['p50']:.1f}" for r in rows)
        rates = ", ".join(f"{r['images_per_second']:.1f}" for r in rows)
        cpus = ", ".join(f"{1000 * r['cpu_per_image']:.1f}" for r in rows)
        print(f"| {runtime} | {1000 * statistics.median(r['p50'] for r in rows):.1f} ms | {rate:.1f} | "
              f"{rate / limit:.2f} | {1000 * statistics.median(r['cpu_per_image'] for r in rows):.1f} | "
              f"{1000 * statistics.median(r['client_cpu_per_image'] for r in rows):.2f} | "
              f"{latencies}; {rates}; {cpus} |")
    print(f"auto / tensorflow: images/s **{speed:.2f}x** (goal >= 2x; the server's CPU per image {cpu:.2f}x less), "
          f"p50 **{latency:.2f}x** (goal <= 0.5x); "
          f"max probability difference over the {len(photos)} photos **{difference:.1e}** (goal <= 1e-4), same top "
          f"class for {100 * same_top:.1f}%")


if __name__ == "__main__":
    sys.exit(main())

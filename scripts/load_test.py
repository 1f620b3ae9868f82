#!/usr/bin/env python3
"""Bounded load test: 16 clients for 60 s on loopback against a real server; errors and memory growth.

    python scripts/load_test.py [--clients 16] [--seconds 60] [--warmup 15] [--backbone small-cnn] [--size 128]

Starts `python -m flower serve` on a loopback port with a freshly exported member, runs the clients
(each posts one JPEG at a time, back to back), samples the server's resident memory every second,
and reports requests, errors, p50/p95 latency and the memory of the first vs the last 10 s of the
measured period. The measured period follows `--warmup` seconds of the same load: the server's memory
rises once while each batch size is seen for the first time (oneDNN caches a primitive per shape,
malloc grows its arenas) and is flat after that; the per-window series shows it (use --warmup 0).
Stops by itself; sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import httpx  # noqa: E402

from testkit.artifacts import flower_jpeg, free_port, make_benchmark_run, start_server  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60, help="measured duration")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of load before the measured period")
    parser.add_argument("--backbone", default="small-cnn")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_benchmark_run(Path(tmp), args.backbone, args.size)
        blob = flower_jpeg(args.size)
        port = free_port()
        server = start_server(["--run", str(run)], port)
        url = f"http://127.0.0.1:{port}/v1/predict"
        latencies, errors, memory = [], [0], []
        lock = threading.Lock()
        start = time.perf_counter() + args.warmup
        stop = start + args.seconds

        def client():
            with httpx.Client(timeout=60) as http:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    try:
                        ok = http.post(url, files=[("files", ("f.jpg", blob, "image/jpeg"))]).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        if not ok:
                            errors[0] += 1
                        elif t0 >= start:
                            latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        while time.perf_counter() < stop:
            if time.perf_counter() >= start:
                memory.append((time.perf_counter() - start, rss_bytes(server.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        server.terminate()
        server.wait(30)
    first = statistics.mean(m for t, m in memory if t < 10) / 2**20
    last = statistics.mean(m for t, m in memory if t >= args.seconds - 10) / 2**20
    total = len(latencies) + errors[0]  # errors are counted over warm-up and measured period
    print(f"{args.clients} clients x {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up load, "
          f"{args.backbone} at {args.size} px, {os.cpu_count()} CPUs")
    print(f"requests {total}, errors {errors[0]}, {len(latencies) / args.seconds:.1f} req/s, "
          f"p50 {1000 * statistics.median(latencies):.0f} ms, "
          f"p95 {1000 * sorted(latencies)[int(0.95 * len(latencies))]:.0f} ms")
    print(f"server RSS: first 10 s {first:.0f} MiB, last 10 s {last:.0f} MiB, growth {last - first:+.1f} MiB "
          f"({100 * (last / first - 1):+.1f}%)")
    windows = [statistics.mean(m for t, m in memory if w <= t < w + 10) / 2**20
               for w in range(0, int(args.seconds) - 9, 10)]
    print("server RSS per 10 s window (MiB): " + ", ".join(f"{w:.0f}" for w in windows))
    return 0 if errors[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

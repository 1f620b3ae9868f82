#!/usr/bin/env python3
"""Bounded abuse test: good clients and hostile ones at once against a real server on loopback.

    python scripts/abuse_load_test.py [--seconds 60] [--good 8] [--warmup 10] [--body-timeout 5]
                                      [--tricklers 4] [--pause 0.2] [--rss-ceiling-mb 950]

Starts `python -m flower serve --body-timeout 5` (other limits at their defaults) on a loopback port with a
freshly exported small CNN at 128 px. The good clients post a small JPEG to /v1/predict back to back;
after `--warmup` seconds of that alone, for `--seconds` one thread per abusive kind (and `--tricklers`
trickling ones) repeats its attempt, `--pause` seconds apart, and records the status it got (expected):
  declared_1gb         Content-Length 1 GB, a 1 KB body                   413
  chunked_flood        chunked multipart, sent until the server answers   413 (408 if the 160 MiB limit
                                                                          is not reached in the body timeout)
  bomb_pngs            16 x 6000x6000 'L' PNGs of 48 KB in one request    413 (pixels per request)
  large_pixels         a 6000x6000 JPEG and a 5000x5000 PNG (budget ok)   200
  trickle              4 bytes/s on a raw socket                          408 (body timeout)
  malformed_multipart  a body with no closing boundary                    400
  bad_signature        the TF-Serving route with signature_name 'nope'    400
('closed': the server closed the connection before answering; 'reset': it reset it.) The server's RSS
is sampled every 0.5 s. Exit status 1 if any good request failed or the peak RSS exceeded
`--rss-ceiling-mb` (default 950 MiB: the highest peak measured on a 2-vCPU machine, 842 MiB, plus
~110 MiB; docs/BENCHMARKS.md says why), else 0. After the abuse the RSS stays ~60-100 MiB above its start: glibc
keeps the freed buffers of the large decodes (not a leak; it does not grow, MALLOC_MMAP_THRESHOLD_ ends it).
Stops by itself; sends traffic only to 127.0.0.1; the server is killed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from service.settings import Settings  # noqa: E402
from testkit.artifacts import flower_jpeg, free_port, make_benchmark_run, start_server  # noqa: E402

HOST = "127.0.0.1"
BOUNDARY = "multipart/form-data; boundary=x"
PART = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
EXPECTED = {"declared_1gb": {"413"}, "chunked_flood": {"413", "408"}, "bomb_pngs": {"413"}, "large_pixels": {"200"},
            "trickle": {"408"}, "malformed_multipart": {"400"}, "bad_signature": {"400"}}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux); 0 once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


def encoded(fmt: str, side: int, mode: str = "RGB") -> bytes:
    """A side x side image of one colour, encoded (a few KB for millions of pixels)."""
    buffer = io.BytesIO()
    Image.new(mode, (side, side), 90 if mode == "L" else (40, 160, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def read_status(sock: socket.socket) -> str:
    """The status code of the server's answer, or 'closed' / 'reset' / 'timeout' when none came."""
    data = b""
    try:
        while b"\r\n" not in data and (piece := sock.recv(4096)):
            data += piece
    except TimeoutError:
        return "timeout"
    except OSError:
        return "reset"
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"


def raw_request(port: int, head: str, pieces: Iterable[bytes]) -> str:
    """Send a request head, then `pieces` until the server answers or stops reading; the status it answered."""
    with socket.create_connection((HOST, port), timeout=15) as sock:
        try:
            sock.sendall(head.encode() + b"\r\n")
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:  # an answer (or a close) came: stop sending
                    break
                sock.sendall(piece)
        except OSError:  # the server answered and closed while we were still sending
            pass
        return read_status(sock)


def chunks(size: int, total: int) -> Iterator[bytes]:
    """A multipart part opening, then filler, in chunked transfer encoding: `total` bytes at most."""
    for i in range(total // size):
        body = (PART if i == 0 else b"") + b"x" * size
        yield b"%x\r\n" % len(body) + body + b"\r\n"


def trickled(seconds: float, per_second: int = 4) -> Iterator[bytes]:
    """A multipart body, 2 bytes at a time at `per_second` bytes/s, for `seconds` at most."""
    body = (PART + b"x" * 10_000)[: int(seconds * per_second)]
    for i in range(0, len(body), 2):
        time.sleep(2 / per_second)
        yield body[i: i + 2]


def attempts(port: int, body_timeout: float, images: dict[str, bytes]) -> dict[str, Callable[[], str]]:
    """One callable per abusive kind: it makes one attempt and returns the status (or what happened)."""
    url = f"http://{HOST}:{port}"
    limit = Settings(run="x").body_limit("/v1/predict")
    http = httpx.Client(timeout=30)

    def post(path: str, **kwargs: object) -> str:
        return str(http.post(url + path, **kwargs).status_code)

    def head(extra: str) -> str:
        return f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {BOUNDARY}\r\n{extra}\r\n"

    jpeg_b64 = base64.b64encode(images["good"]).decode()
    return {
        "declared_1gb": lambda: raw_request(port, head("Content-Length: 1000000000"), [PART + b"x" * 1000]),
        "chunked_flood": lambda: raw_request(port, head("Transfer-Encoding: chunked"), chunks(256 * 1024, 2 * limit)),
        "bomb_pngs": lambda: post("/v1/predict", files=[("files", (f"{i}.png", images["bomb"], "image/png"))
                                                        for i in range(16)]),
        "large_pixels": lambda: post("/v1/predict", files=[("files", ("big.jpg", images["big_jpeg"], "image/jpeg")),
                                                           ("files", ("big.png", images["big_png"], "image/png"))]),
        "trickle": lambda: raw_request(port, head("Content-Length: 100000"), trickled(3 * body_timeout)),
        "malformed_multipart": lambda: post("/v1/predict", content=PART + images["good"],
                                            headers={"content-type": BOUNDARY}),
        "bad_signature": lambda: post("/v1/models/flowers:predict",
                                      json={"instances": [{"b64": jpeg_b64}], "signature_name": "nope"}),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` in ms (nearest rank)."""
    return 1000 * sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="duration of the abuse")
    parser.add_argument("--good", type=int, default=8, help="good clients")
    parser.add_argument("--warmup", type=float, default=10, help="seconds of good load alone before the abuse")
    parser.add_argument("--body-timeout", type=float, default=5, help="the server's --body-timeout")
    parser.add_argument("--tricklers", type=int, default=4, help="trickling connections at once")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between two attempts of one abuser")
    parser.add_argument("--settle", type=float, default=5, help="seconds of good load alone after the abuse")
    parser.add_argument("--rss-ceiling-mb", type=float, default=950, help="most server RSS allowed (MiB)")
    parser.add_argument("--backbone", default="small-cnn")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill ends us like Ctrl-C: the server with us
    images = {"good": flower_jpeg(args.size), "bomb": encoded("PNG", 6000, "L"),
              "big_jpeg": encoded("JPEG", 6000), "big_png": encoded("PNG", 5000)}
    stop, abuse_stop, lock = threading.Event(), threading.Event(), threading.Lock()
    good, busy = Counter(), Counter()  # statuses of the good requests; seconds spent per abusive kind
    abuse: defaultdict[str, Counter[str]] = defaultdict(Counter)
    latencies: list[float] = []
    memory: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = make_benchmark_run(Path(tmp), args.backbone, args.size)
        port = free_port()
        server = start_server(["--run", str(run), "--body-timeout", str(args.body_timeout)], port)
        try:
            url = f"http://{HOST}:{port}/v1/predict"
            abuse_start = time.perf_counter() + args.warmup

            def good_client() -> None:
                with httpx.Client(timeout=60) as http:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            status = str(http.post(url, files=[("files", ("f.jpg", images["good"], "image/jpeg"))])
                                         .status_code)
                        except httpx.HTTPError as err:
                            status = type(err).__name__
                        with lock:
                            good[status] += 1
                            if status == "200" and t0 >= abuse_start:
                                latencies.append(time.perf_counter() - t0)

            def abuser(kind: str, attempt: Callable[[], str]) -> None:
                while not abuse_stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        status = attempt()
                    except (httpx.HTTPError, OSError) as err:
                        status = type(err).__name__
                    with lock:
                        abuse[kind][status] += 1
                        busy[kind] += time.perf_counter() - t0
                    abuse_stop.wait(args.pause)

            def sampler() -> None:
                while not stop.wait(0.5):
                    memory.append((time.perf_counter() - abuse_start, rss_bytes(server.pid)))

            threads = [threading.Thread(target=f, daemon=True) for f in [sampler, *[good_client] * args.good]]
            for t in threads:
                t.start()
            time.sleep(args.warmup)
            start_mb = rss_bytes(server.pid) / 2**20
            jobs = attempts(port, args.body_timeout, images)
            abusers = [threading.Thread(target=abuser, args=(k, jobs[k]), daemon=True)
                       for k in [*jobs, *["trickle"] * (args.tricklers - 1)]]
            for t in abusers:
                t.start()
            time.sleep(args.seconds)
            abuse_stop.set()
            for t in abusers:  # each attempt ends by itself (timeouts; a trickle within 3 x --body-timeout)
                t.join(4 * args.body_timeout + 40)
            hung = sum(t.is_alive() for t in abusers)
            time.sleep(args.settle)  # good load alone again: does the memory come back down?
            stop.set()
            for t in threads:
                t.join(70)
            end_mb = rss_bytes(server.pid) / 2**20
            alive = server.poll() is None
        finally:
            stop.set()
            abuse_stop.set()
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:  # the server does not outlive us
                server.kill()
    peak_t, peak = max(((t, m) for t, m in memory if t >= 0), key=lambda x: x[1], default=(0.0, 0))
    peak_mb = peak / 2**20
    failed = {s: n for s, n in good.items() if s != "200"}
    print(f"{args.good} good clients, {args.warmup:.0f} s alone then {args.seconds:.0f} s with abusers "
          f"({len(jobs) + args.tricklers - 1} threads, pause {args.pause} s), body timeout {args.body_timeout:g} s, "
          f"{args.backbone} at {args.size} px, {os.cpu_count()} CPUs")
    print(f"good: sent {sum(good.values())}, answered 200 {good['200']}, failed {sum(failed.values())} {failed or ''}")
    print(f"good latency during the abuse: {len(latencies)} requests, p50 {percentile(latencies, 0.5):.0f} ms, "
          f"p95 {percentile(latencies, 0.95):.0f} ms, max {percentile(latencies, 1.0):.0f} ms")
    for kind, expected in EXPECTED.items():
        got, n = dict(sorted(abuse[kind].items())), sum(abuse[kind].values())
        flag = "" if set(got) <= expected else "  <-- UNEXPECTED"
        print(f"  {kind:20s} {n:5d} attempts, {busy[kind] / max(n, 1):5.2f} s each  {got}  "
              f"(expected {'/'.join(sorted(expected))}){flag}")
    print(f"server RSS: start {start_mb:.0f} MiB (after warm-up), peak {peak_mb:.0f} MiB at {peak_t:.1f} s, "
          f"end {end_mb:.0f} MiB ({args.settle:g} s after the abuse); ceiling {args.rss_ceiling_mb:.0f} MiB")
    series = [max((m for t, m in memory if w <= t < w + 5), default=0) / 2**20
              for w in range(int(-args.warmup), int(args.seconds + args.settle), 5)]
    print("server RSS, peak per 5 s from the warm-up on (MiB): " + ", ".join(f"{m:.0f}" for m in series))
    if hung or not alive:
        print(f"abusers still running at the end: {hung}; server alive at the end: {alive}")
    return 0 if not failed and peak_mb <= args.rss_ceiling_mb and alive else 1


if __name__ == "__main__":
    sys.exit(main())

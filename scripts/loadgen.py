"""A load generator for the benchmarks that serve over HTTP: photos posted to /v1/predict by keep-alive connections.

It shares the machine's cores with the server it measures, so it takes as little of them as it can: one thread of
asyncio over raw sockets, each request's bytes made in advance, each answer checked (status 200, its result ok).
It costs about 0.16 ms of CPU per request on the 2 cores here; httpx in 8 threads took 1.3-1.6 ms
(docs/BENCHMARKS.md, "Served").
"""

from __future__ import annotations

import statistics
import time

BOUNDARY = "benchboundary7f3a"


def request_bytes(blob: bytes) -> bytes:
    """One photo's POST /v1/predict as the bytes on the wire (multipart/form-data), made once per photo."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="photo.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + blob + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class LoadError(Exception):
    """The server could not be reached, answered other than 200 with its result ok, was silent for ANSWER_TIMEOUT
    seconds, or closed the connection."""


ANSWER_TIMEOUT = 120.0  # seconds one answer may take before the run stops with an error


async def _answer(reader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer's head and body (framed by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]
    if len(lengths) != 1 or not lengths[0].isdigit():
        raise LoadError(f"an answer without one Content-Length: {head[:200]!r}")
    return head, await reader.readexactly(int(lengths[0]))


async def _client(port: int, requests: list[bytes], offset: int, step: int, until: float, count: int | None,
                  latencies: list[float]) -> None:
    """One keep-alive connection posting photos back to back until `until` (or `count` requests of its own); each
    answer is checked (status 200, its one result ok) and its latency kept."""
    import asyncio
    import json

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), ANSWER_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as err:
        raise LoadError(f"cannot connect to 127.0.0.1:{port} ({type(err).__name__}: {err})") from None
    i, made = offset, 0
    try:
        while (count is None and time.perf_counter() < until) or (count is not None and made < count):
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            try:
                head, answer = await asyncio.wait_for(_answer(reader), ANSWER_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError) as err:
                raise LoadError(f"the server closed the connection or broke its answer ({type(err).__name__})"
                                ) from None
            except asyncio.TimeoutError:
                raise LoadError(f"no answer within {ANSWER_TIMEOUT:g} s") from None
            try:
                ok = head.startswith(b"HTTP/1.1 200") and json.loads(answer)["results"][0]["ok"] is True
            except (ValueError, KeyError, IndexError, TypeError):
                ok = False
            if not ok:
                raise LoadError(f"the server refused a photo: {head[:40]!r} {answer[:200]!r}")
            latencies.append(time.perf_counter() - start)
            i, made = i + step, made + 1
    finally:
        writer.close()


def load(port: int, requests: list[bytes], clients: int, seconds: float | None = None,
         count: int | None = None) -> tuple[list[float], float, float]:
    """`clients` connections, each posting one photo per request back to back, for `seconds` (or `count` requests
    each): the latencies, the wall seconds and this process's CPU seconds meanwhile (the benchmark process does
    nothing else then)."""
    import asyncio

    latencies: list[float] = []

    async def run() -> None:
        until = time.perf_counter() + (seconds or 0)
        await asyncio.gather(*(_client(port, requests, k, clients, until, count, latencies) for k in range(clients)))

    cpu, start = time.process_time(), time.perf_counter()
    try:
        asyncio.run(run())
        if not latencies:
            raise LoadError("no request was answered (seconds or count of 0?)")
    except LoadError as err:
        raise SystemExit(f"error: {err}") from None
    return latencies, time.perf_counter() - start, time.process_time() - cpu


def p50(port: int, requests: list[bytes], count: int, warm_up: int = 5) -> float:
    """Median seconds of `count` requests, one photo each, back to back on one connection, after `warm_up` on it."""
    if count < 1:
        raise SystemExit(f"error: the p50 needs at least one request, got {count}")
    return statistics.median(load(port, requests, 1, count=count + warm_up)[0][warm_up:])


def throughput(port: int, requests: list[bytes], clients: int, seconds: float) -> tuple[float, float]:
    """Images/s of `clients` connections posting one photo per request for `seconds`, and the load generator's own
    CPU seconds per image."""
    latencies, wall, cpu = load(port, requests, clients, seconds=seconds)
    return len(latencies) / wall, cpu / len(latencies)

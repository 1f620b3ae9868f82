#!/usr/bin/env python3
"""How much a request body (or a user file) makes the server (or a command) grow: peak memory per body shape.

    python scripts/memory_bench.py [--scale 1.0] [--only NAME ...] [--part service|files|all]

Service: starts `python -m flower serve --ensemble <two tiny members>` (every limit at its default: 16 images x
10 MiB, so a 224 MiB body on the JSON routes) on a loopback port, then sends one body of each shape below, one
at a time, and reads the server's peak resident memory (VmHWM, reset before each body through
/proc/PID/clear_refs) against its resident memory just before the body: the growth while answering it.
The server runs with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, so that memory freed after one body is
returned and cannot hide the next body's growth. Files: `flower overlap` on copies of one photo (6,000 x 2,000
at --scale 1), and a deflated `.pth` of 2^28 zeros given as EfficientNet-Lite weights, each in a fresh process
whose own peak (VmHWM) is read against its peak before the work.
`--scale` multiplies every body size (0.25 for a quick look). Prints a Markdown table; docs/BENCHMARKS.md holds
the figures. Linux only (reads /proc); sends traffic only to 127.0.0.1; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: testkit is not installed

import httpx  # noqa: E402

from testkit.artifacts import free_port, image_bytes, make_ensemble, start_server  # noqa: E402

MB = 1_000_000
# glibc returns freed memory at once, so each body's growth is measured from a server that holds no free memory
# left by the body before (else a parse can reuse it, unseen in the resident size).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
V2 = "/v2/models/flowers/infer"
TF = "/v1/models/flowers:predict"


def status_kib(pid: int, field: str) -> int:
    """A VmRSS / VmHWM figure of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def numbers(count: int, value: bytes = b"100.5") -> bytes:
    """`count` JSON numbers (`value`, "100.5": 6 bytes each), comma separated."""
    return (value + b",") * (count - 1) + value


def v2_pixels_json(megabytes: float, datatype: bytes, nested: bool = False, value: bytes = b"100.5") -> bytes:
    """An FP32 [1, S, S, 3] tensor as JSON numbers of about `megabytes` MB; `datatype` as written in the JSON."""
    side = int((megabytes * MB / (8 if nested else 6) / 3) ** 0.5)
    if nested:
        row = b"[" + b",".join([b"[100,100,100]"] * side) + b"]"
        data = b"[[" + b",".join([row] * side) + b"]]"
    else:
        data = b"[" + numbers(3 * side * side, value) + b"]"
    return (b'{"inputs": [{"name": "images", "datatype": "' + datatype + b'", "shape": [1, %d, %d, 3], "data": '
            % (side, side) + data + b"}]}")


def v2_bytes_json(strings: int, element: bytes = b"AAAA") -> bytes:
    """A BYTES tensor declared [1] whose JSON data holds `strings` base64 strings."""
    data = b"[" + b",".join([b'"' + element + b'"'] * strings) + b"]"
    return b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ' + data + b"}]}"


def v2_binary(name: str, datatype: str, shape: list[int], binary: bytes) -> tuple[bytes, dict]:
    """A v2 request with its tensor as binary data after the JSON (Triton's binary data extension)."""
    head = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                   "parameters": {"binary_data_size": len(binary)}}]}).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))}


def tf_instances(count: int) -> bytes:
    """TF Serving's row format with `count` tiny instances {"b64": "AA=="}."""
    return b'{"instances": [' + b",".join([b'{"b64": "AA=="}'] * count) + b"]}"


def tf_one_string(megabytes: float) -> bytes:
    """TF Serving's row format with one instance of about `megabytes` MB of base64."""
    return b'{"instances": [{"b64": "' + b"A" * (int(megabytes * MB) // 4 * 4) + b'"}]}'


def multipart(parts: list[tuple[bytes, bytes]]) -> tuple[bytes, dict]:
    """A multipart/form-data body of (part headers, content) pairs."""
    body = b"".join(b"--x\r\n" + head + b"\r\n\r\n" + content + b"\r\n" for head, content in parts) + b"--x--\r\n"
    return body, {"Content-Type": "multipart/form-data; boundary=x"}


def service_shapes(scale: float) -> dict[str, tuple[str, Callable[[], tuple[bytes, dict]]]]:
    """Each body shape: (route, a function that makes (body, headers))."""
    jpeg = image_bytes("JPEG", (64, 48), seed=1)
    count = int(2_100_000 * scale)
    plain = {"Content-Type": "application/json"}

    def j(make: Callable[[], bytes]) -> Callable[[], tuple[bytes, dict]]:
        return lambda: (make(), plain)

    return {
        "v2 one JPEG as base64 JSON (reference)": (V2, j(lambda: json.dumps({"inputs": [{
            "name": "image_bytes", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(jpeg).decode()]}]}).encode())),
        "v2 FP32 JSON numbers, datatype written \\u0046P32 (case 1)": (V2, j(lambda: v2_pixels_json(
            40 * scale, b"\\u0046P32"))),
        "v2 FP32 JSON numbers \\u0046P32, over 255: parsed, then refused (the parse alone)": (V2, j(
            lambda: v2_pixels_json(40 * scale, b"\\u0046P32", value=b"300.5"))),
        "v2 FP32 JSON numbers": (V2, j(lambda: v2_pixels_json(15 * scale, b"FP32"))),
        "v2 FP32 JSON nested [[[r,g,b],...]]": (V2, j(lambda: v2_pixels_json(15 * scale, b"FP32", True))),
        "v2 FP32 binary": (V2, lambda: v2_binary("images", "FP32", [1, side := int((40 * scale * MB / 12)
                                                                                           ** 0.5), side, 3],
                                                       b"\0" * (4 * 3 * side * side))),
        "v2 BYTES JSON, 2.1 M tiny strings": (V2, j(lambda: v2_bytes_json(count))),
        "v2 BYTES JSON, one long string": (V2, j(lambda: v2_bytes_json(1, b"A" * int(100 * scale * MB // 4 * 4)))),
        "v2 BYTES binary, 2.1 M two-byte elements": (V2, lambda: v2_binary("image_bytes", "BYTES", [1],
                                                                         (struct.pack("<I", 2) + b"AB") * count)),
        "TF instances, 2.1 M tiny (case 2)": (TF, j(lambda: tf_instances(count))),
        "TF one long base64 string (case 2)": (TF, j(lambda: tf_one_string(100 * scale))),
        "TF columnar inputs, 2.1 M tiny strings": (TF, j(lambda: b'{"inputs": {"image_bytes": ['
                                                          + b",".join([b'"AA=="'] * count) + b"]}}")),
        "one file over the image limit": ("/v1/predict", lambda: multipart([(
            b'Content-Disposition: form-data; name="files"; filename="a.jpg"', b"\xff" * int(100 * scale * MB))])),
        "a long part header": ("/v1/predict", lambda: multipart([(
            b'Content-Disposition: form-data; name="files"; filename="a.jpg"\r\nX-Pad: ' + b"p" * int(20 * scale * MB),
            jpeg)])),
    }


def measure_service(scale: float, only: list[str]) -> list[tuple[str, float, float, str, float]]:
    """(shape, body MB, server growth MB, status, seconds) for each body shape."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = make_ensemble(Path(tmp))
        port = free_port()
        server = start_server(["--ensemble", str(ensemble)], port, env=MALLOC)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
                for name, (route, make) in service_shapes(scale).items():
                    if only and not any(o.lower() in name.lower() for o in only):
                        continue
                    body, headers = make()
                    time.sleep(0.5)  # let the previous request's memory settle
                    before = status_kib(server.pid, "VmRSS")
                    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                    start = time.perf_counter()
                    answer = client.post(route, content=body, headers=headers)
                    seconds = time.perf_counter() - start
                    growth = (status_kib(server.pid, "VmHWM") - before) / 1024
                    rows.append((f"`{route}` {name}", len(body) / MB, growth, str(answer.status_code), seconds))
                    print(f"{rows[-1][0]}: {len(body) / MB:.1f} MB body, +{growth:.0f} MiB, {answer.status_code}, "
                          f"{seconds:.1f} s  {answer.text[:120]!r}", file=sys.stderr, flush=True)
                    del body
        finally:
            server.terminate()
            server.wait(30)
    return rows


PEAK = textwrap.dedent("""
    import sys, time
    def hwm():
        return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
""")
OVERLAP = PEAK + textwrap.dedent("""
    from flower.commands.overlap import main
    before, start = hwm(), time.perf_counter()
    status = main([sys.argv[1], sys.argv[2], "--quiet", "--json", sys.argv[3]])
    print(status, hwm() - before, time.perf_counter() - start, file=sys.stderr)
""")
WEIGHTS = PEAK + textwrap.dedent("""
    from training.models.lite import build_lite
    import training.models.lite as lite
    model, sources = build_lite("efficientnet-lite0", 32)
    before, start = hwm(), time.perf_counter()
    try:
        lite.lite_backbone("efficientnet-lite0", 32, sys.argv[1])
        outcome = "loaded"
    except Exception as err:
        outcome = str(err).replace(sys.argv[1], "FILE")[:70]
    print(repr(outcome), hwm() - before, time.perf_counter() - start, file=sys.stderr)
""")


def _child(code: str, *args: str) -> tuple[str, float, float, str]:
    """Run `code` in a fresh process: (outcome, peak growth MiB, seconds, stdout size) from its last stderr line."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    outcome, grown, seconds = result.stderr.strip().splitlines()[-1].rsplit(" ", 2)
    return outcome, float(grown), float(seconds), f"{len(result.stdout) / MB:.1f} MB"


def measure_files(scale: float) -> list[tuple[str, float, float, str, float]]:
    """(case, input MB, peak growth MB, outcome, seconds) for the overlap and the weights file cases."""
    import zipfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = image_bytes("PNG", (32, 32), seed=5)
        copies = {"A": int(6000 * scale), "B": int(2000 * scale)}
        for side, count in copies.items():
            (tmp / side).mkdir()
            for k in range(count):
                (tmp / side / f"{k}.png").write_bytes(photo)
        out = tmp / "overlap.json"
        status, grown, seconds, printed = _child(OVERLAP, str(tmp / "A"), str(tmp / "B"), str(out))
        size = sum(copies.values()) * len(photo) / MB
        rows.append((f"`flower overlap` {copies['A']:,} copies of one photo vs {copies['B']:,} (case 3)", size,
                     grown, f"exit {status}; stdout {printed}, --json {out.stat().st_size / MB:.1f} MB", seconds))
        pth = tmp / "bomb.pth"
        numel = int((1 << 28) * scale)
        rows.append(_pth_row(pth, numel, zipfile))
    return rows


def _pth_row(pth: Path, numel: int, zipfile) -> tuple[str, float, float, str, float]:
    """The deflated-storage .pth case: one FloatStorage of `numel` zeros under a name no layer has."""
    import pickle

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return _rebuild, (Storage(), 0, (numel,), (1,), False, {})

    def _rebuild(*args):
        raise AssertionError

    _rebuild.__module__, _rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    sys.modules.setdefault("torch._utils", type(sys)("torch._utils")).__dict__["_rebuild_tensor_v2"] = _rebuild
    sys.modules.setdefault("torch", type(sys)("torch")).__dict__["FloatStorage"] = float_storage

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", float_storage, "0", "cpu", numel, None) if isinstance(obj, Storage) else None

    import io
    buffer = io.BytesIO()
    Writer(buffer, protocol=2).dump({"x.weight": Tensor()})
    with zipfile.ZipFile(pth, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", buffer.getvalue())
        with archive.open("bomb/data/0", "w", force_zip64=True) as member:
            left = numel * 4
            while left:
                member.write(bytes(min(left, 1 << 24)))
                left -= min(left, 1 << 24)
    del sys.modules["torch"], sys.modules["torch._utils"]
    outcome, grown, seconds, _ = _child(WEIGHTS, str(pth))
    return (f"EfficientNet-Lite `model.weights`: a zip `.pth`, one FloatStorage of {numel:,} zeros deflated (case 4)",
            pth.stat().st_size / MB, grown, outcome, seconds)


def table(rows: list[tuple[str, float, float, str, float]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| body shape | body MB | peak growth MiB | answer | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {size:.1f} | {grown:.0f} | {status} | {seconds:.1f} |"
              for name, size, grown, status, seconds in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every body size (default 1)")
    parser.add_argument("--only", nargs="*", default=[], help="only the service shapes whose name holds one of these")
    parser.add_argument("--part", choices=("service", "files", "all"), default="all")
    args = parser.parse_args(argv)
    rows = measure_service(args.scale, args.only) if args.part in ("service", "all") else []
    rows += measure_files(args.scale) if args.part in ("files", "all") else []
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Artifacts and a server for tests and benchmarks: member runs with real SavedModels, an ensemble over
them, encoded images, and `python -m flower serve` started on a free loopback port.

TensorFlow (for the SavedModels) and httpx (to poll the server) are imported only by the functions that
need them.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFilter

from core.members import write_ensemble

CLASSES = ["red five-petal", "yellow ray flower", "purple four-star", "white eight-petal"]
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the repository root, holding the `service` package


def make_run(root: Path, name: str, size: int, seed: int = 0, sharpness: float = 60.0,
             backbone: str = "small-cnn", classes: list[str] | None = None, fit: str = "crop",
             record_size: int = 0) -> Path:
    """A run directory `root/name` with a randomly initialised classifier exported as the contract says.

    The output layer's weights are scaled by `sharpness`, so that the probabilities move visibly when
    the pixels do (a plain random network answers almost uniformly whatever it is shown, and then a
    parity check between two pixel paths cannot fail). Benchmarks pass `sharpness=1.0` (weights do not
    change speed). `classes` defaults to the four CLASSES; `fit` is how its training photos were made square, and
    `record_size` (0: `size`) the size of the records it was trained on.
    """
    import keras

    from core.members import geometry_record, write_member
    from training.fit.export import export_saved_model
    from training.models.model import build_classifier

    classes = list(classes or CLASSES)
    keras.utils.set_random_seed(seed)
    model = build_classifier(backbone, size, len(classes))
    head = model.get_layer("probabilities")
    head.kernel.assign(head.kernel * sharpness)
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    export_saved_model(model, size, run / "saved_model", fit, record_size)
    (run / "classes.json").write_text(json.dumps(classes))
    write_member(run, {"version": 1, "name": name, "backbone": backbone, "image_size": size,
                       "num_classes": len(classes), "geometry": geometry_record(fit, "test"),
                       "data": {"file_size": record_size or size}})
    return run


def make_benchmark_run(root: Path, backbone: str = "efficientnet-b0", size: int = 224) -> Path:
    """A run directory `root/BACKBONE-SIZE` with random weights (they do not change speed) and the 104 classes."""
    from core.contract import competition_classes

    return make_run(root, f"{backbone}-{size}", size, sharpness=1.0, backbone=backbone,
                    classes=competition_classes())


def make_ensemble(root: Path) -> Path:
    """Two members at 32 and 48 px blended with weights 0.3 / 0.7; returns the ensemble directory `root/ens`."""
    runs = [make_run(root / "runs", "m32", 32, 1), make_run(root / "runs", "m48", 48, 2)]
    ens = root / "ens"
    ens.mkdir()
    write_ensemble(ens, {
        "version": 1, "method": "weighted", "classes": CLASSES,
        "members": [{"name": r.name, "path": f"../runs/{r.name}", "weight": w}
                    for r, w in zip(runs, (0.3, 0.7), strict=True)],
        "blend": {"method": "weighted", "weights": [0.3, 0.7]},
    })
    return ens


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB",
                **save: object) -> bytes:
    """An encoded random image (`save` goes to PIL's Image.save, e.g. quality or exif)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, a few discs with crisp edges (they alias when downscaled without
    a filter) and mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    fields = []
    for _ in range(3):
        fx, fy, px, py = rng.uniform(2, 9), rng.uniform(2, 9), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
        fields.append(128 + 70 * np.sin(fx * 6.28 * x + px) * np.cos(fy * 6.28 * y + py))
    image = np.stack(fields, -1)
    del fields
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, height / max(width, height)), rng.uniform(0.03, 0.2)
        image[(x - cx) ** 2 + (y - cy) ** 2 < radius ** 2] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    sharp = Image.fromarray(image.clip(0, 255).astype(np.uint8), "RGB")
    return sharp.filter(ImageFilter.GaussianBlur(max(width, height) / 2000))  # a lens: edges over a pixel or two


def flower_jpeg(size: int) -> bytes:
    """A JPEG of a demo flower at `size` px (a photo-like image for benchmarks)."""
    from training.data.demo_data import KINDS, draw_flower, jpeg_bytes

    return jpeg_bytes(draw_flower(KINDS[0], np.random.default_rng(0), size), size)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> subprocess.Popen:
    """Start `python -m flower serve ARGS --port PORT` (this copy of the package) and wait until /readyz answers 200.

    The server's output goes to a temporary file (a pipe nobody reads could fill and stall it); its
    last lines are in the error when the server exits or never becomes ready.
    """
    import httpx

    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "flower", "serve", *args, "--port", str(port)], cwd=PACKAGE_ROOT,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {_tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"server did not become ready in time: {_tail(log)}")


def _tail(log: IO[str], chars: int = 3000) -> str:
    """The last `chars` characters written to a log file."""
    log.flush()
    log.seek(0)
    return log.read()[-chars:]

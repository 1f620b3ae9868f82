"""Small artifacts for service tests: run directories with real SavedModels and an ensemble over them."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["red five-petal", "yellow ray flower", "purple four-star", "white eight-petal"]


def make_run(root: Path, name: str, size: int, seed: int, sharpness: float = 60.0) -> Path:
    """A run directory with a randomly initialised small CNN exported as the contract says.

    The output layer's weights are scaled by `sharpness`, so that the probabilities move visibly when
    the pixels do (a plain random network answers almost uniformly whatever it is shown, and then a
    parity check between two pixel paths cannot fail).
    """
    import keras

    from training.export import export_saved_model
    from training.model import build_classifier

    keras.utils.set_random_seed(seed)
    model = build_classifier("small-cnn", size, len(CLASSES))
    head = model.get_layer("probabilities")
    head.kernel.assign(head.kernel * sharpness)
    run = root / name
    run.mkdir(parents=True)
    export_saved_model(model, size, run / "saved_model")
    (run / "classes.json").write_text(json.dumps(CLASSES))
    (run / "member.json").write_text(json.dumps({"version": 1, "name": name, "backbone": "small-cnn",
                                                 "image_size": size, "num_classes": len(CLASSES)}))
    return run


def make_ensemble(root: Path) -> Path:
    """Two members at 32 and 48 px blended with weights 0.3 / 0.7."""
    runs = [make_run(root / "runs", "m32", 32, 1), make_run(root / "runs", "m48", 48, 2)]
    ens = root / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(json.dumps({
        "version": 1, "method": "weighted", "classes": CLASSES,
        "members": [{"name": r.name, "path": f"../runs/{r.name}", "weight": w}
                    for r, w in zip(runs, (0.3, 0.7), strict=True)],
        "blend": {"method": "weighted", "weights": [0.3, 0.7]},
    }))
    return ens


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB",
                **save) -> bytes:
    """An encoded random image."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, env: dict | None = None, timeout: float = 120.0) -> subprocess.Popen:
    """Start `python -m service` and wait until /readyz answers 200."""
    import httpx

    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-m", "service", *args, "--port", str(port)], cwd=repo,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not become ready in time")

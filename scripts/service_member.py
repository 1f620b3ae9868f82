"""Shared by the service benchmark and load scripts: make a member run directory and start a server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_member(root: Path, backbone: str = "efficientnet-b0", size: int = 224) -> Path:
    """A run directory with a randomly initialised model (weights do not change speed), 104 classes."""
    sys.path.insert(0, str(REPO))
    from training.export import export_saved_model
    from training.layout import competition_classes
    from training.model import build_classifier

    classes = competition_classes()
    model = build_classifier(backbone, size, len(classes))
    run = root / f"{backbone}-{size}"
    run.mkdir(parents=True, exist_ok=True)
    export_saved_model(model, size, run / "saved_model")
    (run / "classes.json").write_text(json.dumps(classes))
    (run / "member.json").write_text(json.dumps({"version": 1, "name": run.name, "backbone": backbone,
                                                 "image_size": size, "num_classes": len(classes)}))
    return run


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, *flags: str) -> subprocess.Popen:
    """`python -m service --run RUN` on loopback; returns once /readyz is 200."""
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "service", "--run", str(run), "--port", str(port), *flags],
                               cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

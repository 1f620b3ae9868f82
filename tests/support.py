"""Plain helpers shared by test files.

Training (tests/test_run.py, test_resume.py, test_distributed.py, test_pretrained.py): the tiny run's options,
training in a fresh (or killed) process, and reading a weights file. The import tool (tests/test_import_publish.py,
test_import_sources.py): folders of random photos and the one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO

TINY_RUN = [
    "--set", "data.image_size=32", "--set", "data.batch_size=16", "--set", "train.epochs=2",
    "--set", "train.eval_batch_size=32", "--set", "predict.tta=2", "--set", "data.deterministic=true",
    "--set", "export.runtimes=none",  # a conversion costs seconds; the session's tiny_run and test_runtimes.py convert
]


KILLED_RUN = textwrap.dedent("""
    # Train with the given overrides and SIGKILL this process right after epoch N's checkpoint.
    import os, signal, sys
    from training.config import load_config
    from training.config_values import parse_assignments
    from training.fit.loop import train_member
    kill_after, overrides = int(sys.argv[1]), sys.argv[2:]
    config = load_config(None, parse_assignments([a for a in overrides if a != "--set"]))
    train_member(config, after_epoch=lambda n: os.kill(os.getpid(), signal.SIGKILL) if n == kill_after else None)
""")


def _train(data: Path, out: Path, *extra: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """Run the train command in a fresh process (as a user would), or one killed after an epoch."""
    overrides = ["--set", f"data.dir={data}", "--set", f"output={out}", "--set", "name=tiny", *TINY_RUN, *extra]
    command = [sys.executable, "-m", "flower", "train", *overrides]
    if kill_after is not None:
        command = [sys.executable, "-c", KILLED_RUN, str(kill_after), *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a Keras .weights.h5 file by its path inside the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


# --- the import tool ---------------------------------------------------------------------------------------

def _noise(seed: int, size: int = 12) -> Image.Image:
    """A random photo: distinct seeds give images that are neither the same bytes nor near duplicates."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _classes(src: Path, names: str | list[str], count: int = 4, seed: int = 0) -> None:
    for c, name in enumerate(names):
        (src / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            _noise(seed + 100 * c + k).save(src / name / f"{k}.png")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


OFF = ["--near-duplicate-distance", "off"]


class Peak:
    """The peak of Python and numpy allocations (tracemalloc) over a `with peak_memory()` block, in bytes."""

    bytes: int = 0


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """Trace allocations for the block; the yielded Peak holds their peak once the block ends (also by an error)."""
    peak = Peak()
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

"""The runtime a member's pixel model runs on, chosen and checked at load.

`tensorflow` is the SavedModel's `serving_pixels` signature (the contract, and the reference). `litert` and `onnx` run
the run's converted file (core/runtimes.py: `runtimes/model.tflite`, `runtimes/model.onnx`, each with the record of
the SavedModel it was made from). A converted runtime is used only when its package is installed, its file belongs to
the run's SavedModel as it is now, and its answers to a warm-up batch match TensorFlow's within TOLERANCE; else it is
refused with its reason. `auto` takes the first of AUTO_ORDER that passes (the fastest first, docs/BENCHMARKS.md)
and falls back to TensorFlow, saying why in the log and in the model's metadata; a runtime asked for by name that is
refused fails the load (RuntimeUnusable, naming the member and the reason).

Only the square batch of pixels goes to the runtime: decoding, the square (imaging.geometry) and the TTA passes'
augmentation stay TensorFlow code in service/predictor.py, before it.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import SAVED_MODEL_DIR
from core.errors import said
from core.runtimes import (
    AUTO,
    AUTO_ORDER,
    CHOICES,
    PACKAGES,
    SIGNATURE,
    TENSORFLOW,
    RuntimeUnusable,
    checked_file,
    install_hint,
    saved_model_digest,
)

logger = logging.getLogger(__name__)
TOLERANCE = 1e-4  # the most a converted runtime's probability may differ from TensorFlow's on the warm-up batch
PROBE_SEED = 20250125

Pixels = Callable[[np.ndarray], np.ndarray]  # squares float32 [N, S, S, 3] -> probabilities [N, C]


def cpu_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LiteRTPixels:
    """A converted `.tflite` pixel model on LiteRT's interpreter (XNNPACK), its input resized to each chunk.

    A batch runs in chunks of at most CHUNK images: 8 at once cost the least CPU time per image measured (32: up to
    8% more; a resize between sizes 3-9%, docs/BENCHMARKS.md). The interpreter is not thread-safe: one call at a
    time (a lock)."""

    CHUNK = 8

    def __init__(self, file: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(file), num_threads=threads)
        self._run = self._interpreter.get_signature_runner(SIGNATURE)
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N, C] for squares [N, S, S, 3]."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            parts = [self._run(images=batch[start:start + self.CHUNK])["probabilities"]
                     for start in range(0, len(batch), self.CHUNK)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class OnnxPixels:
    """A converted `.onnx` pixel model on ONNX Runtime's CPU provider (its sessions may be called from any thread)."""

    def __init__(self, file: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only
        self._session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N, C] for squares [N, S, S, 3]."""
        return self._session.run(["probabilities"], {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]


RUNNERS: dict[str, Callable[[Path, int], Pixels]] = {"litert": LiteRTPixels, "onnx": OnnxPixels}
MODULES = {"litert": "ai_edge_litert.interpreter", "onnx": "onnxruntime"}  # imported to see whether it is installed


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime a member runs on, what was asked for, why others were refused, and how far the chosen one's
    warm-up answers were from TensorFlow's (None: TensorFlow itself)."""

    name: str = TENSORFLOW
    requested: str = TENSORFLOW
    refused: dict[str, str] = field(default_factory=dict)
    difference: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """For the metadata routes."""
        return {"name": self.name, "requested": self.requested, "refused": dict(self.refused),
                "max_difference": self.difference}


def open_converted(run_dir: Path, runtime: str, saved_digest: str | None = None) -> Pixels:
    """The run's converted file for `runtime` on its runtime; RuntimeUnusable when the package is missing, the file
    does not belong to the run's SavedModel, or the runtime cannot load it."""
    try:
        importlib.import_module(MODULES[runtime])
    except ImportError:
        raise RuntimeUnusable(runtime, f"{PACKAGES[runtime]} is not installed ({install_hint(runtime)})") from None
    file = checked_file(run_dir, runtime, saved_digest)
    try:
        return RUNNERS[runtime](file, cpu_threads())
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises for a file it cannot load is the reason
        raise RuntimeUnusable(runtime, f"{PACKAGES[runtime]} cannot load {file.parent.name}/{file.name}: "
                                       f"{said(err)}") from None


def probe_batch(size: int) -> np.ndarray:
    """The warm-up batch the answers are compared on: two images of seeded noise and a smooth colour ramp."""
    rng = np.random.default_rng(PROBE_SEED)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    across, down = np.meshgrid(ramp, ramp)
    smooth = np.stack([across, down, 255 - across], axis=-1)
    return np.concatenate([rng.uniform(0, 255, (2, size, size, 3)), smooth[None]]).astype(np.float32)


def answer_difference(runtime: str, pixels: Pixels, probe: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference between a runtime's probabilities and TensorFlow's on the probe; RuntimeUnusable when
    it is over TOLERANCE, not finite, of another shape, or the runtime fails on the batch."""
    try:
        got = np.asarray(pixels(probe))
    except Exception as err:  # noqa: BLE001 - a runtime that cannot run the batch is refused with what it said
        raise RuntimeUnusable(runtime, f"it fails on the warm-up batch: {said(err)}") from None
    if got.shape != expected.shape:
        raise RuntimeUnusable(runtime, f"it answers shape {list(got.shape)} for the warm-up batch, TensorFlow "
                                       f"{list(expected.shape)}: not a conversion of this model")
    difference = float(np.abs(got.astype(np.float64) - expected).max())
    if not difference <= TOLERANCE:
        raise RuntimeUnusable(runtime, f"its answers differ from TensorFlow's by up to {difference:.3g} on the "
                                       f"warm-up batch (more than {TOLERANCE:g})")
    return difference


def choose_runtime(run_dir: Path, requested: str, reference: Pixels, size: int,
                   member: str) -> tuple[Pixels | None, RuntimeChoice]:
    """The converted pixel model a member runs on (None: TensorFlow's `reference`) and the choice's record.

    `auto` tries AUTO_ORDER and falls back to TensorFlow (logged, with each refusal's reason); a runtime named
    explicitly that is refused raises RuntimeUnusable naming the member, its run directory and the reason."""
    if requested not in CHOICES:
        raise RuntimeUnusable(requested, f"unknown runtime (choose from {', '.join(CHOICES)})",
                              f"unknown runtime {requested!r} (choose from {', '.join(CHOICES)})")
    candidates = AUTO_ORDER if requested == AUTO else () if requested == TENSORFLOW else (requested,)
    refused: dict[str, str] = {}
    if candidates:
        probe = probe_batch(size)
        expected = np.asarray(reference(probe), dtype=np.float64)
        digest = saved_model_digest(Path(run_dir) / SAVED_MODEL_DIR)
    for runtime in candidates:
        try:
            pixels = open_converted(run_dir, runtime, digest)
            difference = answer_difference(runtime, pixels, probe, expected)
        except RuntimeUnusable as err:
            if requested != AUTO:
                raise RuntimeUnusable(runtime, err.reason, f"member {member!r} ({run_dir}): runtime {runtime!r} "
                                                           f"cannot be used: {err.reason}") from None
            refused[runtime] = err.reason
            continue
        logger.info("member %r runs on %s (answers within %.2g of TensorFlow's)", member, runtime, difference)
        return pixels, RuntimeChoice(runtime, requested, refused, difference)
    if refused:
        logger.warning("member %r runs on TensorFlow: %s", member,
                       "; ".join(f"{runtime} refused: {reason}" for runtime, reason in refused.items()))
    return None, RuntimeChoice(TENSORFLOW, requested, refused)

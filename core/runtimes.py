"""A run directory's pixel model in a faster runtime's format, and the record of what it was made from.

    runtimes/model.tflite   + runtimes/litert.json    LiteRT (the TFLite format), made by TensorFlow's own converter
    runtimes/model.onnx     + runtimes/onnx.json      ONNX Runtime, made by tf2onnx

Each file is the SavedModel's `serving_pixels` signature (float32 [N, S, S, 3], RGB 0..255 -> probabilities), converted
at export (`export.runtimes`) or later by `flower export RUN --runtime R` (training/fit/runtimes.py). Its record says
what it was made from: the SHA-256 of the run's SavedModel files and of the converted file itself. A converted file is
used only while both still hold: a re-exported SavedModel makes it stale, a damaged or swapped file is refused. The
SavedModel stays the contract (TensorFlow Serving reads it); the service (service/runtimes.py) runs a converted file
only when its answers match the SavedModel's at load. TensorFlow-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from core.contract import SAVED_MODEL_DIR
from core.errors import ConfigError
from core.files import sha256_file, write_text_atomic
from core.members import ArtifactError, read_json_file

RUNTIME_DIR = "runtimes"
CONVERTED = {"litert": "model.tflite", "onnx": "model.onnx"}  # runtime -> its file in RUNTIME_DIR
TENSORFLOW = "tensorflow"  # the SavedModel itself: always there, the reference every other runtime is checked against
AUTO = "auto"
CHOICES = (AUTO, TENSORFLOW, *CONVERTED)  # --runtime
AUTO_ORDER = ("litert", "onnx")  # what `auto` tries, fastest first (docs/BENCHMARKS.md, "A runtime per member")
PACKAGES = {"litert": "ai-edge-litert", "onnx": "onnxruntime"}  # what runs each converted file (extras of the package)
SIGNATURE = "serving_pixels"
RECORD_VERSION = 1
NONE = "none"  # export.runtimes: convert nothing


class RuntimeUnusable(ArtifactError):
    """A runtime a member cannot run on: `runtime`, and `reason` (names files relative to the run directory)."""

    def __init__(self, runtime: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{runtime}: {reason}")
        self.runtime, self.reason = runtime, reason


def install_hint(runtime: str) -> str:
    """How to install what runs a converted file: the package's extra."""
    return f"pip install 'flower-ensemble[{runtime}]'"


def remake_hint(runtime: str) -> str:
    """How to (re)make a run's converted file."""
    return f"make it with: flower export RUN --runtime {runtime}"


def parse_export_runtimes(text: str) -> tuple[str, ...]:
    """export.runtimes: 'none', or converted runtimes separated by commas ('litert', 'litert,onnx'); ConfigError
    naming the value otherwise."""
    names = [name.strip() for name in text.split(",")]
    if names == [NONE]:
        return ()
    unknown = [name for name in names if name not in CONVERTED]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"export.runtimes must be {NONE!r} or runtimes from {sorted(CONVERTED)} separated by commas "
                          f"(each once), got {text!r}")
    return tuple(names)


def saved_model_digest(saved: Path) -> str:
    """The SHA-256 of a SavedModel folder: every file's path inside it and its bytes' own SHA-256, in path order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in saved.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(saved).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def converted_path(run_dir: Path, runtime: str) -> Path:
    """Where a run's converted file for `runtime` lives."""
    return Path(run_dir) / RUNTIME_DIR / CONVERTED[runtime]


def record_path(run_dir: Path, runtime: str) -> Path:
    """Where the record of a run's converted file lives."""
    return Path(run_dir) / RUNTIME_DIR / f"{runtime}.json"


def write_record(run_dir: Path, runtime: str, saved_digest: str, converter: dict[str, Any], seconds: float) -> Path:
    """Record what the converted file (already in place) was made from; written after the file, so that a record
    always describes the bytes beside it or is refused for not matching them."""
    file = converted_path(run_dir, runtime)
    record = {"version": RECORD_VERSION, "runtime": runtime, "file": CONVERTED[runtime], "sha256": sha256_file(file),
              "bytes": file.stat().st_size,
              "made_from": {"folder": SAVED_MODEL_DIR, "signature": SIGNATURE, "sha256": saved_digest},
              "converter": converter, "seconds": round(seconds, 2)}
    return write_text_atomic(record_path(run_dir, runtime), json.dumps(record, indent=1) + "\n")


def checked_file(run_dir: Path, runtime: str, saved_digest: str | None = None) -> Path:
    """A run's converted file for `runtime`, once its record says it was made from the run's SavedModel as it is
    now and the file's bytes are those recorded; RuntimeUnusable with the reason otherwise. `saved_digest`: the
    SavedModel's digest, when the caller has it already."""
    name = f"{RUNTIME_DIR}/{CONVERTED[runtime]}"
    file, record_file = converted_path(run_dir, runtime), record_path(run_dir, runtime)
    if not file.is_file():
        raise RuntimeUnusable(runtime, f"{name} not found ({remake_hint(runtime)})")
    if not record_file.is_file():
        raise RuntimeUnusable(runtime, f"{name} has no record {RUNTIME_DIR}/{record_file.name} of what it was made "
                                       f"from ({remake_hint(runtime)} again)")
    try:
        record = read_json_file(record_file)
    except ArtifactError as err:
        raise RuntimeUnusable(runtime, f"{RUNTIME_DIR}/{record_file.name} cannot be read: "
                                       f"{str(err).replace(str(record_file), record_file.name)}") from None
    made_from = record.get("made_from") if isinstance(record, dict) else None
    if not isinstance(made_from, dict) or not isinstance(record.get("sha256"), str):
        raise RuntimeUnusable(runtime, f"{RUNTIME_DIR}/{record_file.name} is not a record of a converted file "
                                       f"({remake_hint(runtime)} again)")
    saved_digest = saved_digest or saved_model_digest(Path(run_dir) / SAVED_MODEL_DIR)
    if made_from.get("sha256") != saved_digest:
        raise RuntimeUnusable(runtime, f"{name} was made from another SavedModel than the run's {SAVED_MODEL_DIR}/ "
                                       f"(re-exported since: stale; {remake_hint(runtime)} again)")
    if sha256_file(file) != record["sha256"]:
        raise RuntimeUnusable(runtime, f"{name} is not the file its record describes (damaged or replaced; "
                                       f"{remake_hint(runtime)} again)")
    return file

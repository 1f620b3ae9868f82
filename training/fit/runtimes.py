"""Convert a run's SavedModel pixel signature into a faster runtime's format (core/runtimes.py: where, and the record).

LiteRT: TensorFlow's own TFLite converter on `serving_pixels`, float32 kept (no quantisation: dynamic-range int8 was
no faster here and changed 2% of the top-1 answers). ONNX: tf2onnx on the same signature, the batch dimension left
free. Called by the export (`export.runtimes`) and by `flower export RUN --runtime R` for runs exported before.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from core.contract import SAVED_MODEL_DIR
from core.errors import ConfigError, DataError, said
from core.files import write_atomic
from core.runtimes import SIGNATURE, converted_path, install_hint, saved_model_digest, write_record

ONNX_OPSET = 17
CONVERTERS = {"onnx": "tf2onnx"}  # the package a conversion needs beyond TensorFlow (LiteRT's converter is TF's)

Log = Callable[[str], None]


def check_converters(runtimes: tuple[str, ...]) -> None:
    """Refuse, before any work, runtimes whose converter is not installed (ConfigError with the install line)."""
    for runtime in runtimes:
        package = CONVERTERS.get(runtime)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"converting to {runtime} needs {package}, which is not installed: "
                              f"{install_hint(runtime)} (or leave {runtime} out of export.runtimes)")


def _litert(saved: Path) -> tuple[bytes, dict[str, Any]]:
    """The pixel signature as a TFLite flatbuffer, float32."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[SIGNATURE])
    return converter.convert(), {"tool": "tf.lite.TFLiteConverter", "tensorflow": tf.__version__}


def _onnx(saved: Path) -> tuple[bytes, dict[str, Any]]:
    """The pixel signature as an ONNX model (input `images`, output `probabilities`, batch dimension free)."""
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)  # one line per graph rewrite otherwise
    loaded = tf.saved_model.load(str(saved))  # held while converting: the signature's variables live in it
    pixels = loaded.signatures[SIGNATURE]
    spec = pixels.structured_input_signature[1]["images"]
    function = tf.function(lambda images: pixels(images=images))
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[tf.TensorSpec(spec.shape, tf.float32,
                                                                                      name="images")],
                                             opset=ONNX_OPSET)
    del loaded
    return proto.SerializeToString(), {"tool": "tf2onnx", "tf2onnx": tf2onnx.__version__, "opset": ONNX_OPSET,
                                       "tensorflow": tf.__version__}


def convert_run(run_dir: Path, runtime: str, log: Log = print) -> Path:
    """Write `runtimes/<file>` for `runtime` from the run's SavedModel, then its record; returns the file.

    The file is written atomically, and its record (naming the SavedModel's digest and the file's) after it: a
    killed conversion leaves the old pair, or a new file that its old record does not describe (refused at load)."""
    check_converters((runtime,))
    run_dir = Path(run_dir)
    saved = run_dir / SAVED_MODEL_DIR
    if not (saved / "saved_model.pb").is_file():
        raise DataError(f"{run_dir} holds no SavedModel ({SAVED_MODEL_DIR}/saved_model.pb) to convert")
    start = time.perf_counter()
    digest = saved_model_digest(saved)
    try:
        model, converter = {"litert": _litert, "onnx": _onnx}[runtime](saved)
    except (ValueError, TypeError, KeyError, tf.errors.OpError) as err:  # a SavedModel without the signature, ...
        raise DataError(f"{saved} cannot be converted to {runtime}: {type(err).__name__}: {err}") from err
    file = write_atomic(converted_path(run_dir, runtime), lambda tmp: Path(tmp).write_bytes(model))
    seconds = time.perf_counter() - start
    write_record(run_dir, runtime, digest, converter, seconds)
    log(f"wrote {file} ({len(model) / 1e6:.1f} MB, {runtime}, from {SAVED_MODEL_DIR}/ in {seconds:.1f} s)")
    return file


def export_runtimes(run_dir: Path, runtimes: tuple[str, ...], log: Log = print) -> list[Path]:
    """Convert a finished run's SavedModel to every runtime of `export.runtimes`. A conversion that fails is said in
    one line and costs the run nothing (the SavedModel serves; `flower export` tries again)."""
    written = []
    for runtime in runtimes:
        try:
            written.append(convert_run(run_dir, runtime, log))
        except Exception as err:  # noqa: BLE001 - whatever a converter raises, the trained run stays complete
            log(f"warning: the SavedModel was not converted to {runtime} ({said(err)}); it serves on TensorFlow, and "
                f"`flower export {run_dir} --runtime {runtime}` tries again")
    return written

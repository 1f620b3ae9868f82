"""The model on Beam's workers: a copy of what loading needs in the run's work folder, and the model handler that
loads it once per worker process and scores batches with `flower predict`'s own code.

RunInference keeps the loaded model in Beam's shared handle: one load per worker process, shared by its threads.
Each batch goes through `service.scoring.score_batch`, that is the service's inference path (decoding, each
member's square, the members, the blend), so a row is the row `flower predict` writes for that image.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler

from core.contract import CLASSES_FILE, ENSEMBLE_FILE, MEMBER_FILE, SAVED_MODEL_DIR, join
from core.members import ensemble_from_document, read_ensemble
from service.beam.inputs import RAW, Payload, image_data, matched
from service.predictor import EnsemblePredictor
from service.scoring import URL, Options, load_predictor, model_kind, score_batch

Example = tuple[str, Payload, dict | None]  # (path shown, the image or its error, a damaged file's facts)
Scored = tuple[list[str], dict | None]  # (CSV row, the damaged file's facts)


def stage_model(model: str, url: str) -> str:
    """Copy ENSEMBLE_OR_RUN's member.json, classes.json and saved_model/ (each member's, under members/<i>/, with an
    ensemble.json that names them there) into the folder `url`, local or remote; returns the path to load."""
    if model_kind(model) == "run":
        _put_run(Path(model), url)
        return url
    ensemble = read_ensemble(model)
    written = ensemble.document["members"]
    members = []
    for entry in ensemble.members:
        _put_run(entry.run_dir(ensemble.path), join(url, "members", str(entry.index)))
        members.append({**written[entry.index], "path": f"members/{entry.index}"})
    document = {**ensemble.document, "members": members}
    ensemble_from_document(document, ensemble.path)  # still an ensemble document
    with FileSystems.create(join(url, ENSEMBLE_FILE), compression_type=RAW) as f:
        f.write((json.dumps(document, indent=1) + "\n").encode())
    return url


def _put_run(run_dir: Path, url: str) -> None:
    """Copy what loading a run needs into the folder `url`."""
    saved = sorted(p for p in (run_dir / SAVED_MODEL_DIR).rglob("*") if p.is_file())
    for path in [run_dir / MEMBER_FILE, run_dir / CLASSES_FILE, *saved]:
        with open(path, "rb") as source, \
                FileSystems.create(join(url, path.relative_to(run_dir).as_posix()), compression_type=RAW) as target:
            shutil.copyfileobj(source, target, 1 << 20)


def local_model(url: str) -> str:
    """The staged model as a local folder: `url` itself when local, else a copy in a temporary folder of this worker
    (removed when the worker ends)."""
    if not URL.match(url):
        return url
    folder = tempfile.mkdtemp(prefix="flower-model-")
    atexit.register(shutil.rmtree, folder, True)
    for path in matched(join(url, "**")):
        target = os.path.join(folder, path[len(url.rstrip("/")) + 1:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(path, compression_type=RAW) as source, open(target, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
    return folder


class FlowerModelHandler(ModelHandler[Example, Scored, EnsemblePredictor]):
    """RunInference's handler: loads the staged ensemble or run, and turns a batch of images into CSV rows."""

    def __init__(self, model: str, options: Options, top_k: int, min_batch_size: int) -> None:
        """`model`: the staged model's path; batches of `min_batch_size` to `options.batch_size` images."""
        super().__init__(min_batch_size=min_batch_size, max_batch_size=options.batch_size,
                         env_vars={"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")})
        self._model, self._options, self._top_k = model, options, top_k

    def load_model(self) -> EnsemblePredictor:
        """Load, check and warm up the model, as `flower predict` does (once per worker process)."""
        return load_predictor(local_model(self._model))

    def run_inference(self, batch: Sequence[Example], model: EnsemblePredictor,
                      inference_args: dict[str, Any] | None = None) -> list[Scored]:
        """The CSV rows of a batch, the good images predicted in one call; a bad image is its own error row."""
        rows = score_batch(model, [(path, image_data(payload)) for path, payload, _ in batch], self._options,
                           self._top_k)
        return [(row, damage) for row, (_, _, damage) in zip(rows, batch, strict=True)]

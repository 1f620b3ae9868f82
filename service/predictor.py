"""The ensemble the service predicts with: load an ensemble directory (or one run directory) and predict.

Loading ends with a warm-up prediction through every member and the blend; a member whose probabilities
are not all finite (or a blend that makes them so) is refused with an ArtifactError naming it.

Each member's SavedModel is loaded with plain `tf.saved_model.load` and called through its
`serving_pixels` signature at its own image size, or through the same pixel model converted for a faster runtime
once it answers as the SavedModel does (service/runtimes.py, chosen at load); the blend is
`ensemble.blend.apply_blend`, the same code that made the offline submission.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import CLASSES_FILE, SAVED_MODEL_DIR
from core.errors import ConfigError
from core.members import (
    DEFAULT_FIT,
    ArtifactError,
    EnsembleFile,
    is_ensemble_directory,
    is_run_directory,
    read_ensemble,
    read_json_file,
    read_member,
)
from core.runtimes import TENSORFLOW
from ensemble.blend import apply_blend
from ensemble.spec import WEIGHT_TOLERANCE, BlendSpec, SpecError
from imaging.geometry import fit_square_tf
from service.runtimes import RuntimeChoice, choose_runtime

SERVE_TTA_SEED = 1  # the TTA passes' augmentation is seeded by the pass alone: an image always gets the same answer
_COMPILED: dict[tuple, Any] = {}  # tf.functions of the square and the TTA passes, by what they depend on
_COMPILED_LOCK = threading.Lock()


def compiled(key: tuple, make: Callable[[], Any]) -> Any:
    """The tf.function `make()` makes for `key`, made once per process: members (and versions) of the same size and
    fit share one, traced once (the TTA passes' augmentation took seconds to trace for every member at every load)."""
    with _COMPILED_LOCK:
        if key not in _COMPILED:
            _COMPILED[key] = make()
        return _COMPILED[key]


@dataclass
class MemberModel:
    """One member: its name, image size and the SavedModel's pixel signature."""

    name: str
    path: Path
    image_size: int
    predict_pixels: Any  # concrete function: images [N,S,S,3] float32 -> {"probabilities": [N,C]}
    saved_model: Any = None  # the loaded object; keeps the signature's variables alive
    fit: str = DEFAULT_FIT  # how a photo becomes its square input (member.json "geometry", imaging.geometry)
    record_size: int = 0  # the size of the records it trained on (member.json "data".file_size), 0: image_size
    val_macro_f1: float | None = None  # member.json's validation macro F1 (shown by the metadata routes)
    runtime: Any = None  # the converted pixel model it runs on (service.runtimes), None: predict_pixels (TensorFlow)
    runtime_choice: RuntimeChoice = field(default_factory=RuntimeChoice)  # which runtime, and why (metadata routes)
    _square: dict = field(default_factory=dict, repr=False)  # fit_square_tf compiled for its geometry, by dtype
    _augment: Any = field(default=None, repr=False)  # the TTA passes' augmentation, compiled for its size (shared)

    def square(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB image (uint8, or float32 0..255) as this member's float32 input [S, S, 3], made as its
        training images were."""
        if image.shape[0] == image.shape[1] == self.image_size and self.record_size in (0, self.image_size):
            return image.astype(np.float32)
        dtype = "float32" if image.dtype == np.float32 else "uint8"
        if dtype not in self._square:
            import tensorflow as tf

            size, fit, record_size = self.image_size, self.fit, self.record_size
            self._square[dtype] = compiled(
                ("square", size, fit, record_size, dtype),
                lambda: tf.function(lambda im: fit_square_tf(im, size, fit, record_size),
                                    input_signature=[tf.TensorSpec([None, None, 3], dtype)]))
        return self._square[dtype](image.astype(dtype, copy=False)).numpy()

    def probabilities(self, images: list[np.ndarray], tta: int = 1) -> np.ndarray:
        """Probabilities [N, C] for decoded RGB images: the plain pass, averaged with tta-1 augmented passes."""
        batch = np.stack([self.square(image) for image in images])
        total = np.asarray(self.pixels(batch), dtype=np.float64)
        for k in range(1, tta):
            total += self.pixels(self._augmented(batch, k))
        return (total / tta).astype(np.float32)

    def pixels(self, batch: np.ndarray) -> np.ndarray:
        """The pixel model's probabilities [N, C] for squares [N, S, S, 3]: on the converted runtime chosen at load,
        else the SavedModel's serving_pixels."""
        if self.runtime is not None:
            return self.runtime(batch)
        import tensorflow as tf

        return np.asarray(self.predict_pixels(images=tf.constant(batch))["probabilities"])

    def _augmented(self, batch: np.ndarray, k: int) -> np.ndarray:
        """TTA pass k of a batch: the offline TTA's flips and mild affine transform, seeded by k alone and the same
        for every image of the batch (an image's answer does not depend on what it was batched with). TensorFlow
        code whatever the runtime: its pixels then go to the runtime."""
        import tensorflow as tf

        from imaging.augment import TTA_AUGMENT, augment_batch

        if self._augment is None:
            size = self.image_size
            self._augment = compiled(("augment", size), lambda: tf.function(
                lambda images, seed: augment_batch(images, seed, TTA_AUGMENT, size, shared=True),
                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([2], tf.int64)]))
        return self._augment(tf.constant(batch), tf.constant([SERVE_TTA_SEED + k, 0], tf.int64)).numpy()


@dataclass
class EnsemblePredictor:
    """Everything the service predicts with: the members' SavedModels, the classes and the blend."""

    classes: list[str]
    members: list[MemberModel]
    blend: BlendSpec
    warmed_up: set[str] = field(default_factory=set)
    tta: int = 1  # passes per member: the plain one and tta-1 augmented ones (as the offline predictions)
    on_member: Any = None  # called with (member name, seconds) after each member's part of a batch (metrics)
    cv: dict | None = None  # ensemble.json's cross-validated scores ("cv": folds, blend, members); None for a run
    concurrent_members: bool = True  # members of a batch run at once, a thread each (docs/BENCHMARKS.md: faster, on
    # TensorFlow and on LiteRT served)
    _pool: Any = field(default=None, init=False, repr=False, compare=False)  # made by the first concurrent batch
    _pool_lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def ready(self) -> bool:
        """True once every member has answered a warm-up prediction."""
        return self.warmed_up == {m.name for m in self.members}

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Decoded RGB images -> (blended probabilities [N, C], members' probabilities [M, N, C])."""

        def timed(member: MemberModel) -> np.ndarray:
            start = time.perf_counter()
            probs = self._member_predict(member, images)
            if self.on_member is not None:
                self.on_member(member.name, time.perf_counter() - start)
            return probs

        if self.concurrent_members and len(self.members) > 1:
            futures = [self._executor().submit(timed, member) for member in self.members]
            wait(futures)  # every member finishes before the batch answers, even when one of them fails
            votes = [future.result() for future in futures]  # the first failing member's exception, in order
        else:
            votes = [timed(member) for member in self.members]
        stacked = np.stack(votes)
        return apply_blend(self.blend, stacked).astype(np.float32), stacked

    def _executor(self) -> ThreadPoolExecutor:
        """The predictor's own thread per member, made once; its idle threads end when the predictor is collected."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.members), thread_name_prefix="member")
            return self._pool

    def _member_predict(self, member: MemberModel, images: list[np.ndarray]) -> np.ndarray:
        """One member's probabilities [N, C] for decoded RGB images, each made its square input (with TTA)."""
        return member.probabilities(images, self.tta)

    def warm_up(self) -> float:
        """Run one prediction through every member and the blend; returns the seconds it took.

        Raises ArtifactError naming the member whose probabilities are not all finite (NaN weights, an
        overflow) or have the wrong shape, or naming the blend when it turns finite votes non-finite:
        such an ensemble would answer NaN, so it is not served.
        """
        start = time.perf_counter()
        try:
            self._check_outputs()
        except BaseException:
            self.warmed_up = set()  # not ready: /readyz says why
            raise
        self.warmed_up = {m.name for m in self.members}
        return time.perf_counter() - start

    def _check_outputs(self) -> None:
        """A prediction of a grey probe through every member and the blend; ArtifactError when any is unusable."""
        probe = np.full((max(m.image_size for m in self.members),) * 2 + (3,), 128, np.uint8)
        votes = []
        for member in self.members:
            probs = self._member_predict(member, [probe])
            if probs.shape != (1, len(self.classes)):
                raise ArtifactError(f"member {member.name!r} ({member.path}) answers probabilities of shape "
                                    f"{list(probs.shape)} for one image and {len(self.classes)} classes")
            if not np.isfinite(probs).all():
                raise ArtifactError(f"member {member.name!r} ({member.path}): its warm-up probabilities are not all "
                                    f"finite ({int((~np.isfinite(probs)).sum())} of {probs.size} are NaN or "
                                    f"infinite); its weights are damaged, so it cannot be served")
            votes.append(probs)
        blended = apply_blend(self.blend, np.stack(votes))
        if not np.isfinite(blended).all():
            raise ArtifactError(f"the {self.blend.method!r} blend turns the members' finite warm-up probabilities "
                                f"into NaN or infinite values; check the blend in ensemble.json")


def served_model_info(predictor: Any) -> dict[str, Any]:
    """What a served model is made of, for the metadata routes and the page: members (image size, fit, blend
    weight, member.json's validation macro F1, the runtime it runs on and why others were refused), the blend
    method, ensemble.json's cross-validated scores ("cv", None for a run served alone), the serve-time TTA passes and
    the classes."""
    if predictor is None:
        return {}
    weights = getattr(predictor.blend, "weights", None)
    members = [{"name": m.name, "image_size": m.image_size, "fit": getattr(m, "fit", DEFAULT_FIT),
                "record_size": getattr(m, "record_size", 0) or m.image_size,
                "weight": None if weights is None else float(weights[i]),
                "val_macro_f1": getattr(m, "val_macro_f1", None),
                "runtime": getattr(m, "runtime_choice", RuntimeChoice()).as_dict()}
               for i, m in enumerate(predictor.members)]
    return {"members": members, "blend": predictor.blend.method, "tta": getattr(predictor, "tta", 1),
            "cv": getattr(predictor, "cv", None), "classes": list(predictor.classes)}


def _finite(value: Any) -> Any:
    """JSON data with every NaN or infinite number made null (a JSON answer cannot carry them)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _load_saved_model(saved: Path) -> Any:
    """`tf.saved_model.load`, its failures (a damaged or incompatible SavedModel) as ArtifactError naming it."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError  # a damaged saved_model.pb

    if not (saved / "saved_model.pb").is_file():
        raise ArtifactError(f"{saved} is not a SavedModel (no saved_model.pb)")
    try:
        return tf.saved_model.load(str(saved))
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError, tf.errors.OpError,
            DecodeError) as err:
        raise ArtifactError(f"{saved} cannot be loaded as a SavedModel: {type(err).__name__}: {err}") from err


def load_member_model(run_dir: Path, runtime: str = TENSORFLOW) -> tuple[MemberModel, list[str]]:
    """Load one run directory's SavedModel, check it against member.json and classes.json, and choose the runtime its
    pixel model runs on (service.runtimes: `auto`, `tensorflow` or a converted one, checked against TensorFlow)."""
    member = read_member(run_dir)
    classes = read_json_file(run_dir / CLASSES_FILE)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(f"{run_dir / CLASSES_FILE} must be a list of class names")
    size = member.image_size
    saved = run_dir / SAVED_MODEL_DIR
    model = _load_saved_model(saved)
    for signature in ("serving_default", "serving_pixels"):
        if signature not in model.signatures:
            raise ArtifactError(f"{saved} lacks the {signature!r} signature (has {sorted(model.signatures)})")
    pixels = model.signatures["serving_pixels"]
    shape = pixels.structured_input_signature[1]["images"].shape
    if list(shape[1:]) != [size, size, 3]:
        raise ArtifactError(f"{saved}: serving_pixels takes {shape}, but member.json says image_size {size}")
    outputs = pixels.structured_outputs["probabilities"].shape
    if outputs[-1] != len(classes):
        raise ArtifactError(f"{saved} outputs {outputs[-1]} classes, classes.json lists {len(classes)}")
    fit, record_size = member.geometry()
    member_model = MemberModel(member.name, run_dir, size, pixels, model, fit, record_size, member.val_macro_f1)
    member_model.runtime, member_model.runtime_choice = choose_runtime(run_dir, runtime, member_model.pixels, size,
                                                                       member.name)
    return member_model, [c.strip() for c in classes]


def load_run(run_dir: str | Path, tta: int = 1, runtime: str = TENSORFLOW) -> EnsemblePredictor:
    """Serve a single run directory (a blend of one), with `tta` passes per image, its pixel model on `runtime`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory not found: {run_dir}")
    member, classes = load_member_model(run_dir, runtime)
    predictor = EnsemblePredictor(classes, [member], BlendSpec("mean", weights=(1.0,)), tta=_check_tta(tta))
    predictor.warm_up()  # refuses a member whose outputs are not finite
    return predictor


def _check_tta(tta: int) -> int:
    """TTA passes are a whole number of at least 1."""
    if isinstance(tta, bool) or not isinstance(tta, int) or tta < 1:
        raise ConfigError(f"tta must be a whole number of passes >= 1, got {tta!r}")
    return tta


def _check_blend(ensemble: EnsembleFile) -> BlendSpec:
    """ensemble.json's blend (read by core.members), checked against its members and classes before loading."""
    file = ensemble.path
    try:
        blend = BlendSpec.from_dict(ensemble.blend)
    except SpecError as err:
        raise ArtifactError(f"{file}: {err}") from None
    if len(ensemble.members) != blend.member_count:
        raise ArtifactError(f"{file}: the blend is for {blend.member_count} members, 'members' lists "
                            f"{len(ensemble.members)}")
    if blend.method == "stack" and len(blend.intercept) != len(ensemble.classes):
        raise ArtifactError(f"{file}: blend.intercept has {len(blend.intercept)} entries for {len(ensemble.classes)} "
                            "classes")
    for entry in ensemble.members:
        if entry.weight is not None and blend.weights is not None \
                and abs(entry.weight - blend.weights[entry.index]) > WEIGHT_TOLERANCE:
            raise ArtifactError(f"{file}: members[{entry.index}] ({entry.name!r}) has weight {entry.weight}, "
                                f"but blend.weights[{entry.index}] is {blend.weights[entry.index]}")
    return blend


def load_ensemble(path: str | Path, tta: int = 1, runtime: str = TENSORFLOW) -> EnsemblePredictor:
    """Load ensemble.json (a file or its folder) and every member it names; `tta` passes per image and member, each
    member's pixel model on `runtime` (service.runtimes)."""
    ensemble = read_ensemble(path)
    file, blend = ensemble.path, _check_blend(ensemble)
    classes, document = list(ensemble.classes), ensemble.document
    members = []
    for entry in ensemble.members:
        run_dir = entry.run_dir(file)
        if not run_dir.is_dir():
            raise ArtifactError(f"{file}: members[{entry.index}] ({entry.name!r}): run directory not found: {run_dir}")
        member, member_classes = load_member_model(run_dir, runtime)
        if member.name != entry.name:
            raise ArtifactError(f"{file}: members[{entry.index}] is named {entry.name!r}, but its path {run_dir} "
                                f"holds member {member.name!r}")
        if member_classes != classes:
            raise ArtifactError(f"member {member.name!r} ({run_dir}) has other classes than {file}")
        members.append(member)
    cv = document.get("cv")  # the blend's cross-validated scores, shown by the metadata routes and the page
    predictor = EnsemblePredictor(classes, members, blend, tta=_check_tta(tta),
                                  cv=_finite(cv) if isinstance(cv, dict) else None)
    predictor.warm_up()  # refuses a member (or a blend) whose outputs are not finite
    return predictor


def load_version(path: str | Path, tta: int = 1, runtime: str = TENSORFLOW) -> EnsemblePredictor:
    """Load a model repository's version folder: an ensemble directory (ensemble.json) or a run directory."""
    path = Path(path)
    if is_ensemble_directory(path):
        return load_ensemble(path, tta, runtime)
    if is_run_directory(path):
        return load_run(path, tta, runtime)
    raise ArtifactError(f"{path} is neither an ensemble directory (no ensemble.json) nor a run directory "
                        f"(no member.json)")

"""A teacher's answers for distillation (`flower distil`): what an ensemble (or one run) would serve for every record
a student trains on, written as teacher.npz (core.teacher).

Each record is scored as `flower predict DATA:SPLIT` scores it (service/scoring.py): decoded as an upload, made each
member's square by its own geometry and size, run through the members, blended as ensemble.json says. So the student
learns the answers the served ensemble gives, and a record the service could not answer stops the teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.errors import DataError
from core.teacher import TeacherFile, teacher_fingerprint, write_teacher
from service.images import ImageError
from service.predictor import EnsemblePredictor
from service.scoring import (
    Options,
    Progress,
    batches,
    collect_inputs,
    count_images,
    infer_batch,
    iter_images,
    load_predictor,
    model_kind,
)

Log = Callable[[str], None]
DEFAULTS = Options()  # flower predict's: the service's decoding limits, batches of 32


def answers(predictor: EnsemblePredictor, spec: str, options: Options = DEFAULTS,
            quiet: bool = False) -> tuple[list[str], np.ndarray]:
    """The record ids of a DATA:SPLIT and the predictor's blended probabilities for them (float32 [N, C]), in the
    records' order; DataError naming the first record it cannot answer for."""
    inputs = collect_inputs([spec])
    size = max(m.image_size for m in predictor.members)
    progress = Progress(count_images(inputs, size), quiet)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    for batch in batches(iter_images(inputs, size, options.max_image_bytes), options.batch_size):
        for (name, _), result in zip(batch, infer_batch(predictor, batch, options), strict=True):
            if isinstance(result, ImageError):
                raise DataError(f"{name}: {result.kind}: {result.message}: the teacher must answer for every record "
                                "the student trains on")
            ids.append(name.removeprefix(f"{spec}#"))
            rows.append(result.blended)
        progress.update(len(ids), 0)
    return ids, np.stack(rows).astype(np.float32)


def make_teacher(model: str, train: str, out: Path, unlabeled: str | None = None, unlabeled_from: str | None = None,
                 classes: list[str] | None = None, tta: int = 1, log: Log = print, options: Options = DEFAULTS,
                 quiet: bool = False) -> TeacherFile:
    """Score the training records `train` (DATA:SPLIT) and the `unlabeled` ones with the ensemble or run `model`, and
    write the teacher file `out`; `unlabeled_from` is what the user named for the unlabeled images. With `classes`
    (the student's), a teacher of other classes is refused before any image is scored; `tta` passes per image and
    member, as the service's --tta."""
    started = time.perf_counter()
    kind = model_kind(model)
    predictor = load_predictor(model, tta=tta)
    if classes is not None and [c.strip() for c in classes] != [c.strip() for c in predictor.classes]:
        raise DataError(f"the teacher {model} answers for {len(predictor.classes)} classes {predictor.classes[:3]}..., "
                        f"the student's data for {len(classes)} {classes[:3]}...: distil on the teacher's data")
    log(f"teacher: {model} ({len(predictor.members)} member(s), TTA {tta}); scoring {train}"
        + (f" and {unlabeled}" if unlabeled else ""))
    ids, probs = answers(predictor, train, options, quiet)
    source = ["train"] * len(ids)
    if unlabeled:
        more, more_probs = answers(predictor, unlabeled, options, quiet)
        both = sorted(set(ids) & set(more))
        if both:
            raise DataError(f"{len(both)} records of {unlabeled} have the ids of training records of {train} (e.g. "
                            f"{both[:3]}): give unlabeled images that are not in the training split")
        ids, probs, source = ids + more, np.concatenate([probs, more_probs]), source + ["unlabeled"] * len(more)
    facts = {"path": str(Path(model).resolve()), "kind": kind, "name": Path(model).resolve().name,
             "fingerprint": teacher_fingerprint(model), "classes": list(predictor.classes), "train": train,
             "unlabeled": unlabeled, "unlabeled_from": unlabeled_from if unlabeled else None, "tta": tta}
    teacher = write_teacher(out, np.array(ids, dtype=str), probs, np.array(source, dtype=str), facts)
    seconds = time.perf_counter() - started
    log(f"teacher: {len(ids)} rows in {seconds:.0f} s ({len(ids) / max(seconds, 1e-9):.1f} images/s): {out}")
    return teacher

"""The targets of a distilled student: a teacher's probabilities (core.teacher) joined to the records by id.

Every record the student trains on gets a target row of 2C numbers, [soft | hard] (training.fit.distillation
reads both halves; CutMix and MixUp mix them as they mix any label):
  soft  the teacher's probabilities at temperature T, p^(1/T) renormalised (Hinton et al. 2015)
  hard  for a training record, distil.hard_weight x its label's one-hot (label-smoothed as train.label_smoothing);
        for an unlabeled record with distil.pseudo_threshold > 0, the teacher's top class at weight 1 (and no soft
        part) when its probability reaches the threshold; the other unlabeled records are then not trained on
The join is checked on the host before the first step: a record without a teacher row, an id found in both the
training and the unlabeled records, and any trained id that is a validation id are refused, naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from core.contract import parse_split_spec
from core.errors import DataError
from core.teacher import TeacherFile, read_teacher
from imaging.records import record_labels
from training.config import DistilConfig
from training.data.dataset import DROPPED_ROW, SplitInfo, split_info

MISSING = -1  # the row index of an id the teacher has no row for (DROPPED_ROW: one not trained on)


@dataclass(frozen=True)
class SoftTargets:
    """The student's target rows by record id, the unlabeled split it reads too, and what member.json says."""

    ids: np.ndarray  # unicode [K]: every record trained on
    rows: np.ndarray  # float32 [K, 2C]: [soft | hard] per id
    dropped: np.ndarray  # unicode: unlabeled ids under the pseudo-label threshold
    unlabeled: SplitInfo | None
    facts: dict

    def table(self) -> tf.lookup.StaticHashTable:
        """id -> row index in `rows`; DROPPED_ROW for an id not trained on, MISSING for any other."""
        keys = np.concatenate([self.ids, self.dropped])
        values = np.concatenate([np.arange(len(self.ids)), np.full(len(self.dropped), DROPPED_ROW)]).astype(np.int64)
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), MISSING)


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at a temperature: p^(1/T), renormalised per row (float64; zeros stay zero)."""
    logs = np.log(np.maximum(probs.astype(np.float64), 1e-300)) / temperature
    scaled = np.exp(logs - logs.max(axis=1, keepdims=True)) * (probs > 0)
    return scaled / scaled.sum(axis=1, keepdims=True)


def one_hot(labels: np.ndarray, classes: int, smoothing: float) -> np.ndarray:
    """Label-smoothed one-hot rows, as keras' categorical cross-entropy smooths them."""
    return np.eye(classes)[labels] * (1.0 - smoothing) + smoothing / classes


def _joined(teacher: TeacherFile, records: list[str], source: str, what: str) -> np.ndarray:
    """The teacher's probabilities of these records, in their order; DataError when one has no row."""
    rows = teacher.rows(source)
    missing = [i for i in records if i not in rows]
    if missing:
        raise DataError(f"{len(missing)} of the {len(records)} {what} have no {source!r} row in teacher file "
                        f"{teacher.path} (e.g. {missing[:3]}): it was made for other records; run flower distil again")
    return teacher.probs[[rows[i] for i in records]]


def _unlabeled_split(teacher: TeacherFile, image_size: int, file_size: int) -> SplitInfo | None:
    """The unlabeled records the teacher answered for, at the training records' size (None: none)."""
    spec = teacher.facts["unlabeled"]
    if not spec:
        return None
    parsed = parse_split_spec(spec)
    if parsed is None:
        raise DataError(f"teacher file {teacher.path}: its unlabeled records {spec!r} are not a DATA:SPLIT any more")
    return split_info(parsed.data, parsed.split, image_size, file_size)


def _refuse_overlaps(train: list[str], unlabeled: list[str], val: set[str], teacher: TeacherFile) -> None:
    """No id both a training and an unlabeled record, and none that is a validation id."""
    both = sorted(set(train) & set(unlabeled))
    if both:
        raise DataError(f"{len(both)} ids are both training and unlabeled records (e.g. {both[:3]}): give unlabeled "
                        "images that are not in the training split")
    leaked = sorted(val & (set(train) | set(unlabeled)))
    if leaked:
        raise DataError(f"{len(leaked)} of the records the student would train on are validation ids (e.g. "
                        f"{leaked[:3]}, teacher file {teacher.path}): validation rows are never trained on")


def soft_targets(teacher_path: str, infos: dict[str, SplitInfo], classes: list[str], distil: DistilConfig,
                 label_smoothing: float, image_size: int) -> SoftTargets:
    """Read the teacher file and join it to the training (and unlabeled) records: the rows of the student's loss.

    `infos` are the run's located train and val splits."""
    teacher = read_teacher(teacher_path)
    if [c.strip() for c in teacher.facts["classes"]] != [c.strip() for c in classes]:
        raise DataError(f"teacher file {teacher.path} answers for {len(teacher.facts['classes'])} classes "
                        f"{teacher.facts['classes'][:3]}..., not for the {len(classes)} classes of the training data")
    train = record_labels(list(infos["train"].files))
    unlabeled = _unlabeled_split(teacher, image_size, infos["train"].file_size)
    unlabeled_ids = list(record_labels(list(unlabeled.files))) if unlabeled else []
    _refuse_overlaps(list(train), unlabeled_ids, set(record_labels(list(infos["val"].files))), teacher)
    labels = np.array([-1 if v is None else v for v in train.values()], np.int64)
    if ((labels < 0) | (labels >= len(classes))).any():
        raise DataError(f"training records without a label in range 0..{len(classes) - 1} in "
                        f"{infos['train'].files[0]}'s split: distillation reads every training record's label")
    train_probs = _joined(teacher, list(train), "train", "training records")
    hard = distil.hard_weight * one_hot(labels, len(classes), label_smoothing)
    rows = [np.concatenate([tempered(train_probs, distil.temperature), hard], axis=1)]
    ids, dropped, kept = list(train), [], len(unlabeled_ids)
    if unlabeled:
        probs = _joined(teacher, unlabeled_ids, "unlabeled", "unlabeled records")
        if distil.pseudo_threshold > 0:
            keep = probs.max(axis=1) >= distil.pseudo_threshold
            pseudo = one_hot(probs.argmax(axis=1), len(classes), label_smoothing)
            rows.append(np.concatenate([np.zeros_like(pseudo), pseudo], axis=1)[keep])
            ids += [i for i, k in zip(unlabeled_ids, keep, strict=True) if k]
            dropped, kept = [i for i, k in zip(unlabeled_ids, keep, strict=True) if not k], int(keep.sum())
        else:
            rows.append(np.concatenate([tempered(probs, distil.temperature), np.zeros_like(probs)], axis=1))
            ids += unlabeled_ids
    facts = {key: teacher.facts[key] for key in ("path", "kind", "name", "fingerprint")}
    facts.update(file=str(teacher.path), temperature=distil.temperature, hard_weight=distil.hard_weight,
                 train_rows=len(train), unlabeled=None if unlabeled is None else {
                     "data": teacher.facts["unlabeled_from"], "records": teacher.facts["unlabeled"],
                     "rows": len(unlabeled_ids), "trained": kept, "pseudo_threshold": distil.pseudo_threshold})
    return SoftTargets(np.array(ids, dtype=str), np.concatenate(rows).astype(np.float32),
                       np.array(dropped, dtype=str), unlabeled, facts)

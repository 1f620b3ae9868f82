"""teacher.npz: a teacher's probabilities for every image a distilled student trains on (`flower distil`).

The service's inference path writes it (service/teacher.py: the answer the teacher would serve for each image),
training reads it (training/data/soft_targets.py); checked here on both sides, as the other prediction files are.

    ids      unicode [N]      record ids, unique: the student's training records, then the unlabeled ones
    probs    float32 [N, C]   the teacher's blended probabilities; each row sums to 1
    source   unicode [N]      'train' or 'unlabeled': which of the student's inputs a row belongs to
    teacher  unicode []       JSON object, TEACHER_FACTS: what the teacher is and what it answered for
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import MEMBER_FILE
from core.errors import DataError
from core.files import NpzRefused, read_npz_arrays, sha256_file, write_npz_atomic
from core.members import ensemble_file, is_ensemble_directory

TEACHER_FILE = "teacher.npz"
SOURCES = ("train", "unlabeled")
KEYS = ("ids", "probs", "source", "teacher")
# path: the ensemble (or run) directory as given, resolved; kind: ensemble | run; name: its folder's name;
# fingerprint: sha256 of its ensemble.json (or member.json); classes; train: the DATA:SPLIT of the training
# records; unlabeled: the DATA:SPLIT of the unlabeled records (None: none); unlabeled_from: what the user named
# (a DATA:SPLIT or a folder of photos), None without unlabeled data; tta: the passes per image and member (the
# service's --tta).
TEACHER_FACTS = ("path", "kind", "name", "fingerprint", "classes", "train", "unlabeled", "unlabeled_from", "tta")
ROW_TOLERANCE = 1e-3


def teacher_fingerprint(model: str | Path) -> str:
    """The sha256 of an ensemble's ensemble.json, or of a run directory's member.json: what names the teacher."""
    path = Path(model)
    document = path / MEMBER_FILE if path.is_dir() and not is_ensemble_directory(path) else ensemble_file(path)
    return sha256_file(document)


@dataclass(frozen=True)
class TeacherFile:
    """A checked teacher.npz: ids, probabilities, the source of each row, and the facts of the teacher."""

    path: Path
    ids: np.ndarray
    probs: np.ndarray
    source: np.ndarray
    facts: dict[str, Any]

    def rows(self, source: str) -> dict[str, int]:
        """Row index by id of one source's rows."""
        return {i: n for n, i in enumerate(self.ids.tolist()) if self.source[n] == source}


def teacher_problem(ids: np.ndarray, probs: np.ndarray, source: np.ndarray, facts: Any, classes: int) -> str | None:
    """Why these arrays are not a teacher file's (None when they are): dtypes, shapes, unique ids, rows that are
    finite distributions over `classes` classes, known sources, and the facts."""
    if ids.dtype.kind != "U" or ids.ndim != 1 or (ids == "").any():
        return f"'ids' must be non-empty unicode strings in a 1-D array, got {ids.dtype} of shape {ids.shape}"
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        return f"'ids' repeat {unique[counts > 1][:3].tolist()}: each image has one row"
    if probs.dtype != np.float32 or probs.shape != (len(ids), classes):
        return f"'probs' must be float32 of shape ({len(ids)}, {classes}), got {probs.dtype} of shape {probs.shape}"
    off = np.abs(probs.astype(np.float64).sum(axis=1) - 1.0) if len(ids) else np.zeros(0)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(off <= ROW_TOLERANCE)
    if bad.any():
        return f"{int(bad.sum())} rows of 'probs' are not probability distributions (the first: id {ids[bad][0]!r})"
    if source.shape != ids.shape or not np.isin(source, SOURCES).all():
        return f"'source' must give each row one of {SOURCES}"
    if not isinstance(facts, dict) or sorted(facts) != sorted(TEACHER_FACTS):
        return f"'teacher' must be a JSON object with {list(TEACHER_FACTS)}"
    if not isinstance(facts["classes"], list) or len(facts["classes"]) != classes:
        return f"'teacher' names {len(facts['classes'])} classes, 'probs' has {classes} columns"
    return None


def write_teacher(path: str | Path, ids: np.ndarray, probs: np.ndarray, source: np.ndarray,
                  facts: dict[str, Any]) -> TeacherFile:
    """Write teacher.npz atomically after checking it as a reader will; returns what was written."""
    ids, probs, source = np.asarray(ids, dtype=str), np.asarray(probs, dtype=np.float32), np.asarray(source, str)
    problem = teacher_problem(ids, probs, source, facts, probs.shape[1] if probs.ndim == 2 else -1)
    if problem:
        raise ValueError(f"not a teacher file: {problem}")
    write_npz_atomic(path, {"ids": ids, "probs": probs, "source": source, "teacher": np.array(json.dumps(facts))})
    return TeacherFile(Path(path), ids, probs, source, facts)


def read_teacher(path: str | Path) -> TeacherFile:
    """A teacher.npz, checked; DataError naming the file and its problem (made by another tool, damaged)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher file {path} not found (flower distil writes it)")
    try:
        arrays = read_npz_arrays(path, KEYS)
        facts = json.loads(str(arrays["teacher"]))
    except NpzRefused as refused:
        if refused.problem:
            raise DataError(f"teacher file {path}: {refused.problem}") from None
        raise DataError(f"teacher file {path} lacks {refused.missing} (has {refused.present})") from None
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"teacher file {path} cannot be read ({type(err).__name__}: {err})") from None
    probs = arrays["probs"]
    problem = teacher_problem(arrays["ids"], probs, arrays["source"], facts, probs.shape[1] if probs.ndim == 2 else -1)
    if problem:
        raise DataError(f"teacher file {path}: {problem}")
    return TeacherFile(path, arrays["ids"], probs, arrays["source"], facts)

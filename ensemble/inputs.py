"""Blend members' predictions and write the Kaggle submission.

    flower blend runs/* --out ens/demo [--method auto] [--folds 5] [--seed 0]

Reads each run directory's classes.json and predictions/{val,test}.npz, checks and aligns them by
id, scores every member and the blend by stratified K-fold CV on the validation rows, fits the
chosen method on all validation rows, and writes into --out:
  ensemble.json   members (relative paths), method, weights or stacker parameters, classes, CV scores
  submission.csv  id,label for every test id (checked before writing)
  report.md       members vs blend, per-class F1 of the blend's worst classes; weights.png, scores.png

Methods: mean (plain average), weighted (non-negative weights fitted on log loss; --power adds a
temperature per member), hill-climb (greedy selection with replacement on macro F1), stack
(multinomial logistic regression on log-probabilities), auto (the best CV macro F1 of the four).
Needs no TensorFlow.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from core.errors import DataError
from core.files import pattern_matches
from ensemble.members import MemberError


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories from paths or glob patterns, in the given order, without repeats."""
    runs: list[Path] = []
    for pattern in patterns:
        if not pattern.strip():
            raise MemberError("a run directory argument is empty")
        matches = pattern_matches(pattern)
        matches = [pattern] if matches is None else matches
        if not matches:
            raise MemberError(f"no run directory matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path not in runs:
                runs.append(path)
    return runs


def read_ids(path: Path) -> np.ndarray:
    """The `id` column of a CSV file (a sample submission or an answers file); a byte order mark is ignored."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read ids from {path}: {getattr(err, 'strerror', None) or err}") from None
    if not rows or "id" not in rows[0]:
        raise DataError(f"{path} has no 'id' column (or no rows)")
    ids = np.array([row["id"] or "" for row in rows], dtype=str)
    if (ids == "").any():
        raise DataError(f"{path}: {int((ids == '').sum())} rows have an empty id (the first is data row "
                         f"{int(np.flatnonzero(ids == '')[0]) + 1})")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path} has duplicate ids, e.g. {unique[counts > 1][:3].tolist()}")
    return ids

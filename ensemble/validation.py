"""Honest scores: stratified K-fold cross-validation of a blend and of every member on validation rows."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from core.errors import DataError
from ensemble.blend import METHODS, Blender, one_blas_thread
from ensemble.scores import scores

Progress = Callable[[str], None]


def _folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded folds; fewer than asked if the rarest class is too small, at least 2."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    usable = min(folds, int(counts[counts > 0].min()))
    if usable < 2:
        raise DataError(f"cannot cross-validate: a class has only {usable} validation row(s); need at least 2")
    splitter = StratifiedKFold(usable, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _summarise(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over folds, plus the standard deviation of macro F1."""
    out = {k: float(np.mean([f[k] for f in per_fold])) for k in per_fold[0]}
    out["macro_f1_std"] = float(np.std([f["macro_f1"] for f in per_fold]))
    return out


def member_scores(probs: np.ndarray, labels: np.ndarray, names: list[str], folds: int, seed: int) -> dict:
    """Each member's scores on the same held-out folds the blends are scored on."""
    splits = _folds(labels, folds, seed)
    return {
        name: _summarise([scores(labels[held], probs[i, held].astype(np.float64)) for _, held in splits])
        for i, name in enumerate(names)
    }


def cross_validate(
    probs: np.ndarray, labels: np.ndarray, method: str, options: dict[str, Any] | None = None,
    folds: int = 5, seed: int = 0, progress: Progress | None = None,
) -> dict[str, Any]:
    """Fit on K-1 folds, score on the held-out one; return mean scores and out-of-fold probabilities.

    The folds are fitted at once on up to one thread per core, each with one BLAS thread; their
    results and progress lines come in fold order.
    """
    splits = _folds(labels, folds, seed)

    def fit_fold(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        train, held = split
        start = time.perf_counter()
        blend = Blender(method, **(options or {})).fit(probs[:, train], labels[train]).predict_proba(probs[:, held])
        return held, blend, time.perf_counter() - start

    out_of_fold = np.zeros(probs.shape[1:])
    per_fold = []
    # After an error, map cancels the folds not yet started; the pool waits for the running ones.
    with one_blas_thread, ThreadPoolExecutor(min(len(splits), os.cpu_count() or 1)) as pool:
        for k, (held, blend, seconds) in enumerate(pool.map(fit_fold, splits), 1):
            out_of_fold[held] = blend
            per_fold.append(scores(labels[held], blend))
            if progress:
                progress(f"  {method}: fold {k}/{len(splits)} macro F1 {per_fold[-1]['macro_f1']:.4f} "
                         f"({seconds:.1f} s)")
    return {"scores": _summarise(per_fold), "out_of_fold": out_of_fold, "folds": len(splits)}


def choose_method(
    probs: np.ndarray, labels: np.ndarray, options: dict[str, dict[str, Any]], folds: int, seed: int,
    progress: Progress | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The `auto` method: cross-validate every method and pick the best CV macro F1 (simplest on ties)."""
    results = {m: cross_validate(probs, labels, m, options.get(m), folds, seed, progress) for m in METHODS}
    best = max(METHODS, key=lambda m: (round(results[m]["scores"]["macro_f1"], 10), -METHODS.index(m)))
    return best, results

"""Synthetic but realistic member predictions and run directories, for tests and benchmarks.

Each member's logits are the true class's bump (its skill) plus noise shared by all members (the
hard images everyone gets wrong) plus noise of its own; softmax gives its probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.members import write_member


def synthetic_probs(
    labels: np.ndarray, skills: list[float], classes: int, rng: np.random.Generator,
    shared: float = 1.0, own: float = 1.2,
) -> np.ndarray:
    """Probabilities [M, N, C] float32 of members with the given skills on rows with these labels."""
    n = len(labels)
    common = rng.normal(0.0, shared, (n, classes))
    out = []
    for skill in skills:
        logits = common + rng.normal(0.0, own, (n, classes))
        logits[np.arange(n), labels] += skill
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        out.append((p / p.sum(axis=1, keepdims=True)).astype(np.float32))
    return np.stack(out)


def write_run_dir(
    path: Path, name: str, classes: list[str], val_ids: np.ndarray, val_labels: np.ndarray,
    val_probs: np.ndarray, test_ids: np.ndarray, test_probs: np.ndarray,
) -> Path:
    """Write the prediction part of a run directory (member.json, classes.json, predictions/*.npz)."""
    (path / "predictions").mkdir(parents=True, exist_ok=True)
    write_member(path, {"name": name, "backbone": "synthetic"})
    (path / "classes.json").write_text(json.dumps(classes))
    np.savez(path / "predictions" / "val.npz", ids=val_ids, labels=val_labels.astype(np.int64), probs=val_probs)
    np.savez(path / "predictions" / "test.npz", ids=test_ids, probs=test_probs)
    return path


def synthetic_runs(
    root: Path, skills: list[float], classes: int = 10, val_rows: int = 400, test_rows: int = 300, seed: int = 0,
    shared: float = 1.0,
) -> list[Path]:
    """Write one run directory per skill under root; ids are shuffled per member to test alignment.

    `shared` is the noise all members share; 0 gives members whose errors are independent.
    """
    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(classes)]
    val_ids = np.array([f"v{i:06d}" for i in range(val_rows)])
    test_ids = np.array([f"t{i:06d}" for i in range(test_rows)])
    labels = np.arange(val_rows) % classes
    val = synthetic_probs(labels, skills, classes, rng, shared=shared)
    test = synthetic_probs(rng.integers(0, classes, test_rows), skills, classes, rng, shared=shared)
    runs = []
    for m, _ in enumerate(skills):
        v, t = rng.permutation(val_rows), rng.permutation(test_rows)
        runs.append(write_run_dir(root / f"member{m}", f"member{m}", names, val_ids[v], labels[v], val[m, v],
                                  test_ids[t], test[m, t]))
    return runs

"""Write the ensemble directory: ensemble.json, submission.csv, report.md and plots, each atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.members import Aligned
from ensemble.scores import per_class_f1
from ensemble.spec import BlendSpec

FORMAT_VERSION = 1


def write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Write through a temporary file in the same folder, then rename it into place.

    (training has its own copy: the parts share no code but the blend, see ARCHITECTURE.md.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def check_submission(ids: np.ndarray, labels: np.ndarray, num_classes: int, expected_ids: np.ndarray) -> None:
    """Refuse a submission with missing, extra or duplicate ids or labels out of range."""
    if len(ids) != len(expected_ids) or len(labels) != len(ids):
        raise ValueError(f"submission has {len(ids)} ids and {len(labels)} labels, expected {len(expected_ids)}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("submission ids are not unique")
    if set(ids.tolist()) != set(expected_ids.tolist()):
        raise ValueError("submission ids differ from the test ids")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"submission labels out of range 0..{num_classes - 1}")


def submission_text(ids: np.ndarray, labels: np.ndarray) -> str:
    """The CSV text `id,label` of a submission, rows in the given order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows(zip(ids.tolist(), labels.tolist(), strict=True))
    return buffer.getvalue()


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray, expected_ids: np.ndarray) -> Path:
    """Write `id,label` (label = argmax) in the given order, after checking the text that will be written.

    The check reads the CSV text back and compares its ids with `expected_ids` (the test ids the members
    were aligned on), so a row lost or repeated on the way to the file is refused, not submitted.
    """
    text = submission_text(np.asarray(ids), probs.argmax(axis=1))
    rows = list(csv.reader(io.StringIO(text)))
    if rows[0] != ["id", "label"]:
        raise ValueError(f"submission header is {rows[0]}, expected ['id', 'label']")
    written_ids = np.array([row[0] for row in rows[1:]], dtype=str)
    written_labels = np.array([int(row[1]) for row in rows[1:]], dtype=np.int64)
    check_submission(written_ids, written_labels, probs.shape[1], np.asarray(expected_ids, dtype=str))
    return write_text(path, text)


def write_ensemble_json(
    out_dir: Path, aligned: Aligned, spec: BlendSpec, cv: dict[str, Any], extra: dict[str, Any]
) -> Path:
    """Write ensemble.json: members (paths relative to it, weight or null for a stacker), blend spec, classes, CV."""
    weights = spec.weights if spec.weights is not None else (None,) * spec.member_count
    members = [
        {"name": m.name, "path": os.path.relpath(m.path.resolve(), out_dir.resolve()), "weight": w}
        for m, w in zip(aligned.members, weights, strict=True)
    ]
    document = {
        "version": FORMAT_VERSION, "method": spec.method, "members": members, "classes": aligned.classes,
        "blend": spec.to_dict(), "cv": cv, "validation_rows": int(len(aligned.val_ids)),
        "test_rows": int(len(aligned.test_ids)),
        **extra,
    }
    return write_text(out_dir / "ensemble.json", json.dumps(document, indent=1) + "\n")


def _save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_weights(path: Path, names: list[str], spec: BlendSpec) -> Path:
    """Bar chart of each member's weight (a stacker's: its mean coefficient)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 2), 3))
    ax.bar(range(len(names)), spec.importance, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("weight" if spec.method != "stack" else "mean coefficient")
    ax.set_title(f"blend weights ({spec.method})")
    return _save_figure(fig, path)


def plot_scores(path: Path, member_cv: dict[str, dict[str, float]], blend_cv: dict[str, float]) -> Path:
    """Bar chart of CV macro F1 of every member and of the blend, with fold standard deviations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*member_cv, "blend"]
    values = [member_cv[n]["macro_f1"] for n in member_cv] + [blend_cv["macro_f1"]]
    errors = [member_cv[n]["macro_f1_std"] for n in member_cv] + [blend_cv["macro_f1_std"]]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 2), 3))
    ax.bar(range(len(names)), values, yerr=errors, color=["#8c8c8c"] * len(member_cv) + ["#dd8452"], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("CV macro F1")
    ax.set_ylim(0, 1)
    ax.set_title("members vs blend (cross-validated on validation rows)")
    return _save_figure(fig, path)


def _score_row(name: str, s: dict[str, float]) -> str:
    """One markdown table row of CV scores."""
    return f"| {name} | {s['macro_f1']:.4f} | {s['macro_f1_std']:.4f} | {s['accuracy']:.4f} | {s['log_loss']:.4f} |"


def write_report(
    out_dir: Path, aligned: Aligned, method: str, blend_cv: dict[str, float], member_cv: dict[str, dict[str, float]],
    out_of_fold: np.ndarray, method_cv: dict[str, dict[str, float]] | None, worst: int = 10,
) -> Path:
    """report.md: members vs blend, method comparison, the blend's worst classes; plus two PNGs."""
    lines = [f"# Ensemble report\n\nMethod: **{method}**, {len(aligned.members)} members, "
             f"{len(aligned.val_ids)} validation rows, {len(aligned.test_ids)} test rows.\n",
             "Scores are K-fold cross-validated on the validation rows (fit on K-1 folds, scored on the "
             "held-out fold); the shipped blend is then fitted on all rows.\n",
             "| | CV macro F1 | std | accuracy | log loss |", "|---|---|---|---|---|"]
    lines += [_score_row(name, s) for name, s in member_cv.items()]
    lines.append(_score_row(f"**blend ({method})**", blend_cv))
    if method_cv:
        lines += ["", "## Methods compared (auto)", "", "| method | CV macro F1 | std | accuracy | log loss |",
                  "|---|---|---|---|---|"]
        lines += [_score_row(m, s) for m, s in method_cv.items()]
    f1, present = per_class_f1(aligned.val_labels, out_of_fold.argmax(1), len(aligned.classes))
    order = [i for i in np.argsort(f1) if present[i]][:worst]
    support = np.bincount(aligned.val_labels, minlength=len(aligned.classes))
    lines += ["", f"## The blend's {len(order)} worst classes (out-of-fold)", "", "| class | F1 | validation rows |",
              "|---|---|---|"]
    lines += [f"| {i}: {aligned.classes[i]} | {f1[i]:.3f} | {support[i]} |" for i in order]
    lines += ["", "![weights](weights.png)", "", "![scores](scores.png)", ""]
    return write_text(out_dir / "report.md", "\n".join(lines))

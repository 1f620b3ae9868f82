"""Write the ensemble directory: ensemble.json, submission.csv, report.md and plots, as one unit.

Every file is written into a fresh staging folder beside the ensemble directory, which then replaces
the old directory (old set aside, new renamed in, old removed): readers and a blend killed at any point
see the previous directory or the new one, whole, never a mix. The next blend removes what an
interrupted one left (staging folders, a set-aside directory, temporary files) and puts a set-aside
directory back when it was killed between the two renames.
"""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core.contract import ENSEMBLE_FILE
from core.errors import DataError, FlowerError, Kind
from core.files import Unit, write_atomic, write_text_atomic
from core.members import write_ensemble
from core.names import table_cell
from ensemble.members import Aligned
from ensemble.scores import per_class_f1
from ensemble.spec import BlendSpec

FORMAT_VERSION = 1
ENSEMBLE_FILES = (ENSEMBLE_FILE, "submission.csv", "report.md", "weights.png", "scores.png")
ENSEMBLE_DIRECTORY = Unit(lambda p: p.name in ENSEMBLE_FILES and p.is_file(), "blend")
T = TypeVar("T")


class OutputError(FlowerError, ValueError):
    """The ensemble directory cannot be written; the message names the path and the reason."""

    kind = Kind.CONFLICT


# --- where the ensemble directory may go --------------------------------------------------------------

def check_out_dir(out: str | Path) -> Path:
    """The ensemble directory to write (a symlink: its target), or OutputError before anything is loaded.

    Refused: an empty name, a file, a path under a file, a folder that holds anything but an ensemble
    directory's files (it is replaced as a whole), and a place that cannot be written.
    """
    if not str(out).strip():
        raise OutputError("--out is empty: name the ensemble directory to write")
    path = Path(out)
    try:
        path = path.resolve() if path.is_symlink() else Path(os.path.abspath(path))
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise OutputError(f"--out {out}: {err}") from None
    if not path.name or path.parent == path:
        raise OutputError(f"--out {out} names no folder of its own: name the ensemble directory to write")
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out} is a file, not an ensemble directory")
    try:
        entries = list(path.iterdir()) if path.is_dir() else []
    except OSError as err:
        raise OutputError(f"cannot read --out {out}: {err.strerror or err}") from None
    if str(out).startswith("~"):
        raise OutputError(f"--out {out} starts with '~', which the shell did not expand: give the folder's path")
    strangers = _strangers(entries)
    if strangers:
        raise OutputError(f"--out {out} is not an ensemble directory: it holds {strangers[:3]}, which a blend "
                          "would delete (it replaces the directory as a whole); name a new or ensemble directory")
    _check_writable(out, path.parent)
    return path


def _check_writable(out: str | Path, parent: Path) -> None:
    """Refuse a parent that is a file (or under one) or that this process may not write into."""
    existing = parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EROFS if _read_only(existing) else errno.EACCES)
        raise OutputError(f"cannot write into {existing}: {reason}")


def _read_only(path: Path) -> bool:
    """Whether the file system of path is mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _strangers(entries: list[Path]) -> list[str]:
    """Entries an ensemble directory does not hold: other names, and its names that are not plain files."""
    return ENSEMBLE_DIRECTORY.strangers(entries)


def _refusal(out: Path) -> Callable[[list[str]], OutputError]:
    """The error for files saved into out while this blend ran (out is left as it is)."""
    return lambda strangers: OutputError(f"{out} now holds {strangers[:3]}, which this blend would replace: "
                                         "nothing was changed; move them away and blend again")


def _write_error(err: OSError, out: Path) -> OutputError:
    """One line naming the file (as named in out) and the reason."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return OutputError(f"cannot write {out}: {reason}")
    shown = Path(os.path.abspath(err.filename))
    if shown == out or out in shown.parents:
        return OutputError(f"cannot write {shown}: {reason}")
    return OutputError(f"cannot write {out} ({shown}): {reason}")


def clean_leftovers(out: Path) -> None:
    """Remove what interrupted blends into `out` left beside it, putting back a set-aside directory."""
    ENSEMBLE_DIRECTORY.clean_leftovers(Path(out))


def publish_directory(out: Path, write: Callable[[Path], T]) -> T:
    """Call `write(staging_folder)`, then make the staging folder the directory `out`, as one unit.

    Leftovers of interrupted blends are removed first. On any error the staging folder is removed and
    `out` is what it was; an OSError becomes an OutputError naming the path and the reason.
    """
    out = Path(os.path.abspath(out))
    try:
        return ENSEMBLE_DIRECTORY.publish(out, write, _refusal(out))
    except OSError as err:
        raise _write_error(err, out) from None


def check_submission(ids: np.ndarray, labels: np.ndarray, num_classes: int, expected_ids: np.ndarray) -> None:
    """Refuse a submission with missing, extra or duplicate ids or labels out of range."""
    if len(ids) != len(expected_ids) or len(labels) != len(ids):
        raise DataError(f"submission has {len(ids)} ids and {len(labels)} labels, expected {len(expected_ids)}")
    if len(np.unique(ids)) != len(ids):
        raise DataError("submission ids are not unique")
    if set(ids.tolist()) != set(expected_ids.tolist()):
        raise DataError("submission ids differ from the test ids")
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
    """Write `id,label` (label = argmax) in the given order, after checking the text that will be written
    (write_label_submission)."""
    return write_label_submission(path, ids, probs.argmax(axis=1), probs.shape[1], expected_ids)


def write_label_submission(path: Path, ids: np.ndarray, labels: np.ndarray, num_classes: int,
                           expected_ids: np.ndarray) -> Path:
    """Write `id,label` in the given order, after checking the text that will be written.

    The check reads the CSV text back and compares its ids with `expected_ids` (the test ids the members
    were aligned on, or those `flower predict` scored), so a row lost or repeated on the way to the file is
    refused, not submitted.
    """
    text = submission_text(np.asarray(ids), np.asarray(labels))
    rows = list(csv.reader(io.StringIO(text)))
    if rows[0] != ["id", "label"]:
        raise ValueError(f"submission header is {rows[0]}, expected ['id', 'label']")
    written_ids = np.array([row[0] for row in rows[1:]], dtype=str)
    written_labels = np.array([int(row[1]) for row in rows[1:]], dtype=np.int64)
    check_submission(written_ids, written_labels, num_classes, np.asarray(expected_ids, dtype=str))
    return write_text_atomic(path, text)


def write_ensemble_json(
    out_dir: Path, aligned: Aligned, spec: BlendSpec, cv: dict[str, Any], extra: dict[str, Any],
    final_dir: Path | None = None,
) -> Path:
    """Write ensemble.json: members (paths relative to it, weight or null for a stacker), blend spec, classes, CV.

    `final_dir` is where the file will end up when out_dir is a staging folder: member paths are relative to it.
    """
    weights = spec.weights if spec.weights is not None else (None,) * spec.member_count
    home = (final_dir or out_dir).resolve()
    members = [
        {"name": m.name, "path": os.path.relpath(m.path.resolve(), home), "weight": w}
        for m, w in zip(aligned.members, weights, strict=True)
    ]
    document = {
        "version": FORMAT_VERSION, "method": spec.method, "members": members, "classes": aligned.classes,
        "blend": spec.to_dict(), "cv": cv, "validation_rows": int(len(aligned.val_ids)),
        "test_rows": int(len(aligned.test_ids)),
        **extra,
    }
    return write_ensemble(out_dir, document, final_dir)


def _save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_weights(path: Path, names: list[str], spec: BlendSpec) -> Path:
    """Bar chart of each member's weight (a stacker's: its mean coefficient)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(names) + 2), 3))
    ax.bar(range(len(names)), spec.importance, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8, parse_math=False)
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
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8, parse_math=False)
    ax.set_ylabel("CV macro F1")
    ax.set_ylim(0, 1)
    ax.set_title("members vs blend (cross-validated on validation rows)")
    return _save_figure(fig, path)


def _score_row(name: str, s: dict[str, float]) -> str:
    """One markdown table row of CV scores."""
    return (f"| {table_cell(name)} | {s['macro_f1']:.4f} | {s['macro_f1_std']:.4f} | {s['accuracy']:.4f} | "
            f"{s['log_loss']:.4f} |")


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
    lines += [f"| {i}: {table_cell(aligned.classes[i])} | {f1[i]:.3f} | {support[i]} |" for i in order]
    lines += ["", "![weights](weights.png)", "", "![scores](scores.png)", ""]
    return write_text_atomic(out_dir / "report.md", "\n".join(lines))

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
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core.errors import DataError, FlowerError, Kind
from ensemble.members import Aligned
from ensemble.scores import per_class_f1
from ensemble.spec import BlendSpec

try:
    import fcntl
except ImportError:  # Windows has no fcntl: staging folders are then not locked
    fcntl = None

FORMAT_VERSION = 1
ENSEMBLE_FILES = ("ensemble.json", "submission.csv", "report.md", "weights.png", "scores.png")
T = TypeVar("T")


class OutputError(FlowerError, ValueError):
    """The ensemble directory cannot be written; the message names the path and the reason."""

    kind = Kind.CONFLICT


def _umask() -> int:
    """The process umask: from /proc where it is there, else by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Write through a temporary file in the same folder, then rename it into place.

    The file gets the mode a plain open() would give (0666 less the umask, not mkstemp's 0600) and is
    flushed to disk before the rename. An OSError names `path`, not the temporary file.
    (training has its own copy: the parts share no code but the blend, see ARCHITECTURE.md.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _fsync(path: str | Path, flags: int) -> None:
    """Flush a file or folder to disk; a folder on a file system that cannot is skipped."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


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
    return sorted(p.name for p in entries
                  if not _is_tmp(p) and (p.name not in ENSEMBLE_FILES or not p.is_file()))


def _remove_old(folder: Path) -> None:
    """Remove a set-aside ensemble directory: its own files only; anything else found there is kept."""
    for path in folder.iterdir():
        if not _strangers([path]) or _is_tmp(path):
            try:
                path.unlink()
            except OSError:
                pass
    try:
        folder.rmdir()
    except OSError:
        print(f"warning: kept {folder}: it holds files a blend did not write (saved there during the blend?)",
              file=sys.stderr)


def _is_tmp(path: Path) -> bool:
    """A temporary file of write_atomic (`.<name>.<random>.tmp`), left by a killed write."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


# --- one unit: staging, swap, leftovers -----------------------------------------------------------------

def _leftover_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.(staging|old)-[0-9a-f]{{16}}")


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name beside out for a staging folder or the set-aside old directory."""
    return out.parent / f".{out.name}.{kind}-{secrets.token_hex(8)}"


def _lock(folder: Path) -> int | None:
    """Open folder and take an exclusive lock on it (None where locks are not supported).

    BlockingIOError when another process holds it.
    """
    fd = os.open(folder, os.O_RDONLY)
    if fcntl is None:
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # a file system without flock: the lock is only advisory anyway
        pass
    return fd


def _remove_if_stale(folder: Path) -> None:
    """Remove a staging folder unless a live blend holds its lock."""
    try:
        fd = _lock(folder)
    except BlockingIOError:
        return
    except OSError:
        fd = None
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def clean_leftovers(out: Path) -> None:
    """Remove what interrupted blends into `out` left beside it; put back a set-aside directory when the
    blend was killed between setting the old directory aside and renaming the new one in."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = _leftover_pattern(out)
    found = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    aside = sorted((p for p in found if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if aside and not out.exists():
        try:
            os.rename(aside.pop(), out)
        except OSError:
            pass
    for folder in aside:
        _remove_old(folder)
    for folder in found:
        if ".staging-" in folder.name:
            _remove_if_stale(folder)
    if out.is_dir():
        for path in out.iterdir():
            if _is_tmp(path):
                try:
                    path.unlink()
                except OSError:  # best effort: the directory is replaced as a whole anyway
                    pass


def _set_aside(out: Path) -> Path | None:
    """Rename the current ensemble directory to a fresh name beside it (None when there is none)."""
    if not out.exists():
        return None
    aside = _sibling(out, "old")
    os.rename(out, aside)
    return aside


def _move_in(stage: Path, out: Path) -> None:
    """Rename the finished staging folder to the ensemble directory's name."""
    os.rename(stage, out)


def _swap(stage: Path, out: Path) -> None:
    """Replace out by stage: old aside, new in, old removed; the old one is put back if the new cannot go in."""
    _fsync(stage, os.O_RDONLY)
    if out.is_dir() and _strangers(list(out.iterdir())):  # saved into --out while this blend ran
        raise OutputError(f"{out} now holds {_strangers(list(out.iterdir()))[:3]}, which this blend would "
                          "replace: nothing was changed; move them away and blend again")
    aside = _set_aside(out)
    try:
        _move_in(stage, out)
    except BaseException:
        if aside is not None and not out.exists():
            try:
                os.rename(aside, out)
            except OSError:  # the next blend puts it back (clean_leftovers)
                pass
        raise
    if aside is not None:
        _remove_old(aside)
    try:
        _fsync(out.parent, os.O_RDONLY)
    except OSError:  # the swap is done; only its durability across a power cut is not forced
        pass


def _make_stage(out: Path) -> tuple[Path, int | None]:
    """A fresh, locked staging folder beside out, with out's mode if out exists (else 0777 less the umask)."""
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(out, "staging")
    os.mkdir(stage)
    try:
        if out.is_dir():
            os.chmod(stage, stat.S_IMODE(out.stat().st_mode))
        return stage, _lock(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _write_error(err: OSError, stage: Path | None, out: Path) -> OutputError:
    """One line naming the file (as it will be named in out, not in the staging folder) and the reason."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return OutputError(f"cannot write {out}: {reason}")
    shown = Path(os.path.abspath(err.filename))
    try:  # a path in the staging folder (or the folder, or the set-aside directory) stands for one in out
        first, *rest = shown.relative_to(out.parent).parts
        if (stage is not None and first == stage.name) or _leftover_pattern(out).fullmatch(first):
            shown = out.joinpath(*rest)
    except ValueError:
        pass
    if shown == out or out in shown.parents:
        return OutputError(f"cannot write {shown}: {reason}")
    return OutputError(f"cannot write {out} ({shown}): {reason}")


def publish_directory(out: Path, write: Callable[[Path], T]) -> T:
    """Call `write(staging_folder)`, then make the staging folder the directory `out`, as one unit.

    Leftovers of interrupted blends are removed first. On any error the staging folder is removed and
    `out` is what it was; an OSError becomes an OutputError naming the path and the reason.
    """
    out = Path(os.path.abspath(out))
    stage, lock = None, None
    try:
        clean_leftovers(out)
        stage, lock = _make_stage(out)
        result = write(stage)
        _swap(stage, out)
        return result
    except OSError as err:
        raise _write_error(err, stage, out) from None
    finally:
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            os.close(lock)


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
    return write_text(out_dir / "ensemble.json", json.dumps(document, indent=1) + "\n")


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

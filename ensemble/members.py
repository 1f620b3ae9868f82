"""Load members' prediction files from run directories, check them, and align their rows by id."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import CLASSES_FILE
from core.errors import FlowerError
from core.files import NpzRefused, read_npz_arrays
from core.members import (
    ArtifactError,
    MemberFile,
    is_run_directory,
    read_json_file,
    read_member,
    validation_source_problem,
)

PROBABILITY_TOLERANCE = 1e-3


class MemberError(FlowerError, ValueError):
    """A member's files break the contract; the message names the member and the problem."""


@dataclass(frozen=True)
class Member:
    """One member's predictions as loaded from its run directory."""

    name: str
    path: Path
    classes: list[str]
    val_ids: np.ndarray
    val_labels: np.ndarray
    val_probs: np.ndarray
    test_ids: np.ndarray
    test_probs: np.ndarray


@dataclass(frozen=True)
class Aligned:
    """All members' rows in one id order: probs are [members, rows, classes]."""

    members: list[Member]
    classes: list[str]
    val_ids: np.ndarray
    val_labels: np.ndarray
    val_probs: np.ndarray
    test_ids: np.ndarray
    test_probs: np.ndarray

    @property
    def names(self) -> list[str]:
        """Member names in order."""
        return [m.name for m in self.members]


NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip
NPY_MAGIC = b"\x93NUMPY"


def _npz_magic(path: Path, member: str) -> None:
    """Refuse a file that is not a zip before numpy guesses at it (it would try to unpickle it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as err:
        raise MemberError(f"member {member!r}: cannot read {path}: {err.strerror or err}") from None
    if head.startswith(NPY_MAGIC):
        raise MemberError(f"member {member!r}: {path.name} is a .npy array, not an .npz of named arrays: {path}")
    if not head.startswith(NPZ_MAGIC):
        raise MemberError(f"member {member!r}: {path.name} is not an .npz (corrupt or truncated): {path}")


def _load_npz(path: Path, member: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load an .npz without pickle and check that the expected arrays are there."""
    if not path.is_file():
        raise MemberError(f"member {member!r}: {path} not found")
    _npz_magic(path, member)
    try:
        return read_npz_arrays(path, keys)
    except NpzRefused as refused:
        if refused.problem:
            problem = refused.problem
            raise MemberError(f"member {member!r}: {path.name} holds no predictions: {problem}: {path}") from None
        raise MemberError(f"member {member!r}: {path.name} lacks {refused.missing} (has {refused.present})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, MemoryError):
        raise MemberError(f"member {member!r}: {path.name} is not an .npz (corrupt or truncated): {path}") from None
    except ValueError as err:
        if "Object arrays" in str(err):
            raise MemberError(
                f"member {member!r}: {path.name} holds object arrays that need pickle; "
                "write ids as a unicode array (np.array(ids, dtype=str))"
            ) from None
        raise MemberError(f"member {member!r}: {path.name} holds a corrupt array ({err}): {path}") from None
    except OSError as err:
        raise MemberError(f"member {member!r}: cannot read {path}: {err.strerror or err}") from None


def _check_probs(probs: np.ndarray, ids: np.ndarray, classes: int, member: str, where: str) -> np.ndarray:
    """Check dtype, shape, finiteness and that every row is a probability distribution."""
    if probs.dtype != np.float32:
        raise MemberError(f"member {member!r}: {where} probs have dtype {probs.dtype}, expected float32")
    if probs.ndim != 2 or probs.shape != (len(ids), classes):
        raise MemberError(
            f"member {member!r}: {where} probs have shape {probs.shape}, expected ({len(ids)}, {classes}) "
            "(rows = ids, columns = classes)"
        )
    bad = ~np.isfinite(probs)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise MemberError(
            f"member {member!r}: {where} probs hold {int(bad.sum())} NaN/inf values (first at id {ids[row]!r})"
        )
    off = np.abs(probs.astype(np.float64).sum(axis=1) - 1.0)
    worst = int(off.argmax()) if len(off) else 0
    if (probs < 0).any():
        raise MemberError(f"member {member!r}: {where} probs hold negative values (min {probs.min():.4g})")
    if len(off) and off[worst] > PROBABILITY_TOLERANCE:
        raise MemberError(
            f"member {member!r}: {where} rows are not probability distributions: row of id {ids[worst]!r} "
            f"sums to {1 + (probs[worst].sum() - 1):.6f} (off by {off[worst]:.3g}; "
            f"{int((off > PROBABILITY_TOLERANCE).sum())} rows off by more than {PROBABILITY_TOLERANCE})"
        )
    return probs


def _check_ids(ids: np.ndarray, member: str, where: str) -> np.ndarray:
    """Ids must be a 1-D unicode array with no empty or duplicate entries."""
    if ids.dtype.kind != "U" or ids.ndim != 1:
        raise MemberError(f"member {member!r}: {where} ids have dtype {ids.dtype} and shape {ids.shape}, "
                          "expected a 1-D unicode string array")
    if (ids == "").any():
        raise MemberError(f"member {member!r}: {where} has {int((ids == '').sum())} empty ids")
    broken = [i for i in ids.tolist() if "\n" in i or "\r" in i]
    if broken:
        raise MemberError(f"member {member!r}: {where} has {len(broken)} id(s) with a line break, e.g. {broken[0]!r}: "
                          "a row of the submission CSV cannot hold it")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dupes = unique[counts > 1][:3].tolist()
        raise MemberError(f"member {member!r}: {where} has duplicate ids, e.g. {dupes}")
    return ids


def _read_json(path: Path, what: str) -> object:
    """A JSON file's content (core.members.read_json_file), its problem as one MemberError naming the file."""
    try:
        return read_json_file(path, what)
    except ArtifactError as err:
        raise MemberError(str(err)) from None


def _member_file(run_dir: Path) -> MemberFile | None:
    """member.json, read and checked by core.members (None when absent), its problem as a MemberError."""
    if not is_run_directory(run_dir):
        return None
    try:
        return read_member(run_dir)
    except ArtifactError as err:
        raise MemberError(str(err)) from None


def member_name(run_dir: Path) -> str:
    """The member's name from member.json, else its folder name."""
    member = _member_file(run_dir)
    try:
        return member.name if member else run_dir.name
    except ArtifactError as err:
        raise MemberError(str(err)) from None


def validation_source(run_dir: Path, name: str, classes: list[str]) -> Path:
    """The run whose validation predictions stand for this member's in a blend: itself, or for a refit
    (trained on train+val, member.json `validation_from`) the run trained on train only that it refits, with
    the same classes (core.members.validation_source_problem: what training checks before its first step).

    A member trained on its validation rows without such a run is refused: its validation predictions
    are in-sample and would win the blend unfairly.
    """
    member = _member_file(run_dir)
    if member is None or not member.train_on_val:
        return run_dir
    source = member.validation_from
    if source is None:
        raise MemberError(f"member {name!r} ({run_dir}) was trained on its validation rows (data.train_on_val); "
                          "its validation predictions are in-sample and would win the blend unfairly: blend the "
                          "run trained on train only instead, or a refit made with flower train --refit-of RUN")
    original = (run_dir / source).resolve()
    try:
        problem = validation_source_problem(original, classes)
    except ArtifactError as err:
        problem = str(err)
    if problem:
        raise MemberError(f"member {name!r}: its validation predictions come from {source} (member.json "
                          f"validation_from), and {problem}")
    return original


def _read_classes(run_dir: Path, name: str) -> list[str]:
    """A run directory's classes.json, checked."""
    classes_file = run_dir / CLASSES_FILE
    if not classes_file.is_file():
        raise MemberError(f"member {name!r}: {classes_file} not found")
    classes = _read_json(classes_file, f"member {name!r}: ")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise MemberError(f"member {name!r}: classes.json must be a non-empty list of class names")
    return classes


def load_member_predictions(run_dir: str | Path) -> Member:
    """Load and check a run directory's classes and prediction files (a refit's validation rows: its original's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MemberError(f"run directory not found: {run_dir}")
    name = member_name(run_dir)
    classes = _read_classes(run_dir, name)
    val_dir = validation_source(run_dir, name, classes)
    val = _load_npz(val_dir / "predictions" / "val.npz", name, ("ids", "labels", "probs"))
    test = _load_npz(run_dir / "predictions" / "test.npz", name, ("ids", "probs"))
    val_ids = _check_ids(val["ids"], name, "val.npz")
    test_ids = _check_ids(test["ids"], name, "test.npz")
    labels = val["labels"]
    if labels.dtype.kind not in "iu" or labels.shape != val_ids.shape:
        raise MemberError(f"member {name!r}: val.npz labels have dtype {labels.dtype} and shape {labels.shape}, "
                          f"expected int64 of shape {val_ids.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise MemberError(f"member {name!r}: val.npz labels out of range 0..{len(classes) - 1}")
    val_probs = _check_probs(val["probs"], val_ids, len(classes), name, "val.npz")
    test_probs = _check_probs(test["probs"], test_ids, len(classes), name, "test.npz")
    val_order, test_order = np.argsort(val_ids), np.argsort(test_ids)
    return Member(
        name, run_dir, [c.strip() for c in classes], val_ids[val_order], labels[val_order].astype(np.int64),
        val_probs[val_order], test_ids[test_order], test_probs[test_order],
    )


def _same_ids(reference: Member, other: Member, attr: str, where: str) -> None:
    """Raise naming both members if two id sets differ."""
    a, b = getattr(reference, attr), getattr(other, attr)
    if len(a) == len(b) and (a == b).all():
        return
    only_other = np.setdiff1d(b, a)[:3].tolist()
    only_ref = np.setdiff1d(a, b)[:3].tolist()
    raise MemberError(
        f"member {other.name!r}: {where} ids differ from member {reference.name!r} "
        f"({len(b)} vs {len(a)} rows; only in {other.name!r}: {only_other}; only in {reference.name!r}: {only_ref})"
    )


def align_members(members: list[Member]) -> Aligned:
    """Check that members agree on classes, ids and labels; stack their rows in one order."""
    if not members:
        raise MemberError("no members given")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise MemberError(f"member names must be unique, got {names}: train each with its own "
                          "--set name=... (or its own output folder), or set 'name' in its member.json")
    first = members[0]
    for m in members[1:]:
        if len(m.classes) != len(first.classes):
            raise MemberError(f"member {m.name!r} has {len(m.classes)} classes, member {first.name!r} has "
                              f"{len(first.classes)}")
        if m.classes != first.classes:
            i = next(i for i, (a, b) in enumerate(zip(m.classes, first.classes, strict=True)) if a != b)
            raise MemberError(f"member {m.name!r}: class {i} is {m.classes[i]!r}, member {first.name!r} has "
                              f"{first.classes[i]!r}")
        _same_ids(first, m, "val_ids", "val")
        _same_ids(first, m, "test_ids", "test")
        disagree = np.flatnonzero(m.val_labels != first.val_labels)
        if len(disagree):
            i = disagree[0]
            raise MemberError(
                f"member {m.name!r}: val labels disagree with member {first.name!r} on {len(disagree)} rows "
                f"(id {first.val_ids[i]!r}: {m.val_labels[i]} vs {first.val_labels[i]})"
            )
    return Aligned(
        members, first.classes, first.val_ids, first.val_labels,
        np.stack([m.val_probs for m in members]), first.test_ids, np.stack([m.test_probs for m in members]),
    )


def load_members(run_dirs: list[str | Path]) -> Aligned:
    """Load every run directory and align them."""
    return align_members([load_member_predictions(d) for d in run_dirs])

"""The import's source scan: class folders and their photos (core.photos' one rule), each real file once."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from core.contract import class_name_problem
from core.errors import DataError
from core.names import shown
from core.photos import HIDDEN_NAME, NOT_A_PHOTO_NAME, Problem, entry_problem, walk_photos


@dataclass
class Scan:
    """The source tree: classes, each file once with its label, and what was skipped on the way (with reasons)."""

    classes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def rel(src: Path, path: Path) -> str:
    """A file's path under the source as shown and stored (bytes that are not UTF-8 escaped)."""
    return shown(path.relative_to(src).as_posix())


def scan_source(src: Path) -> Scan:
    """Find classes (sub-folders, sorted) and their files: links followed, every real file once."""
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    scan = Scan()
    scan.classes = _class_folders(src, scan)
    if len(scan.classes) < 2:
        raise DataError(f"{src} must hold one sub-folder per class (at least 2); found {scan.classes}")
    problem = class_name_problem(scan.classes)
    if problem:
        raise DataError(f"class folders in {src}: {problem}; rename the folders (a class is named by its folder)")
    found: list[list[Path]] = []
    reached: dict[str, list[tuple[Path, int]]] = {}  # real path: every (path, label) it is reached by
    for label, name in enumerate(scan.classes):
        walk = walk_photos(src / name)
        files = walk.photos
        problems = walk.problems + [Problem(path, "other", NOT_A_PHOTO_NAME) for path in walk.others] + \
            [Problem(path, "hidden", HIDDEN_NAME) for path in walk.hidden]
        scan.skipped += sorted(({"path": rel(src, p.path), "reason": p.reason} for p in problems),
                               key=lambda s: s["path"])
        if not files:
            raise DataError(f"class folder {src / name} holds no files"
                            + (f" it can read ({len(problems)} skipped: broken links or the like)" if problems else ""))
        found.append(files)
        for path in files:
            reached.setdefault(os.path.realpath(path), []).append((path, label))
    dropped = _files_reached_twice(src, reached, scan)
    for label, files in enumerate(found):
        kept = [path for path in files if path not in dropped]
        scan.files += kept
        scan.labels += [label] * len(kept)
    return scan


def _class_folders(src: Path, scan: Scan) -> list[str]:
    """The class folders' names (sorted); links followed, a broken one reported; refuses a link to the source or
    above it, two class folders that are one folder (or one inside the other), and a name that is not UTF-8."""
    source, found = Path(os.path.realpath(src)), []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith("."):
            scan.skipped.append({"path": shown(entry.name), "reason": f"{HIDDEN_NAME} as a class folder"})
            continue
        try:
            is_folder = stat.S_ISDIR(os.stat(entry.path).st_mode)
        except OSError as err:  # a broken link or a loop: listed with the reason, like a file
            reason = f"{entry_problem(entry, err).reason} (not read as a class folder)"
            scan.skipped.append({"path": shown(entry.name), "reason": reason})
            continue
        if not is_folder:
            scan.skipped.append({"path": shown(entry.name), "reason": "a file beside the class folders: not imported "
                                                                      "(photos go in one folder per class)"})
            continue
        real = Path(os.path.realpath(entry.path))
        if source.is_relative_to(real):
            raise DataError(f"class folder {src / entry.name} is a link to {real}, the source folder or a folder "
                            "above it: its photos would be read again under another label; remove the link")
        if shown(entry.name) != entry.name:
            raise DataError(f"class folder name '{shown(entry.name)}' in {src} is not valid UTF-8 (or holds a control "
                            "character) and cannot be a class name; rename the folder")
        found.append((entry.name, real))
    for (a, real_a), (b, real_b) in combinations(found, 2):
        if real_a == real_b:
            raise DataError(f"class folders {a} and {b} are the same folder ({real_a}, through a link): every photo "
                            f"would have two labels; remove the link in {src}")
        if real_a.is_relative_to(real_b) or real_b.is_relative_to(real_a):
            (inner, real), outer = ((a, real_a), b) if real_a.is_relative_to(real_b) else ((b, real_b), a)
            raise DataError(f"class folder {inner} ({real}, through a link) lies inside class folder {outer} in "
                            f"{src}: its photos would have two labels; remove the link")
    return [name for name, _ in found]


def _files_reached_twice(src: Path, reached: dict[str, list[tuple[Path, int]]], scan: Scan) -> set[Path]:
    """The paths not imported because they reach a file already read (through links): the later paths of a file
    within one class, and every path of a file reached from two class folders (its label is ambiguous)."""
    dropped: set[Path] = set()
    ambiguous: list[list[str]] = []
    for paths in reached.values():
        if len(paths) < 2:
            continue
        folders = sorted({scan.classes[label] for _, label in paths})
        names = [rel(src, path) for path, _ in paths]
        if len(folders) == 1:
            dropped.update(path for path, _ in paths[1:])
            scan.skipped += [{"path": name, "reason": f"the same file as {names[0]} (reached through a link): "
                                                      "imported once"} for name in names[1:]]
            continue
        dropped.update(path for path, _ in paths)
        ambiguous.append(names)
        scan.skipped += [{"path": name, "reason": f"one file reached from class folders {' and '.join(folders)} "
                                                  f"(through a link: {', '.join(names)}): its label is ambiguous, "
                                                  "not imported"} for name in names]
    if ambiguous:
        scan.warnings.append(f"{len(ambiguous)} file(s) are reached through links from more than one class folder "
                             f"({', '.join(ambiguous[0])}{' and more' if len(ambiguous) > 1 else ''}): not imported, "
                             "their label is ambiguous; remove the links in the source folders")
    return dropped

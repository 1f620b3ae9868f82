"""Import a folder-per-class tree of photos into the competition layout (`flower import`).

    flower import photos/ data/mine --sizes 192,224

    <src>/<class>/<any>.jpg|png|...  ->  <out>/tfrecords-jpeg-<S>x<S>/{train,val,test}/*.tfrec
                                         <out>/classes.json, <out>/test_answers.csv, <out>/import_report.json

The split is stratified by class and seeded. Duplicates stay together: files with the same bytes, and
near duplicates (the same photo resized, recompressed, slightly edited or cropped: perceptual hashes at most
--near-duplicate-distance bits apart of 64, 'off' for exact copies only) form a group, and each group goes
whole to one split, so a photo in val or test never has a copy in train. The hash is taken of what is
stored: the square (per --fit) at the largest size, as the JPEG written, so a wide photo and its square crop,
or two wide shots with the same middle, are one group. A flat or noise-free smooth image (one colour, a clean
gradient) has a hash with few bits set that says nothing; it is grouped by its bytes only and listed as such.
Per-class counts stay as close to the fractions as the groups allow (exact when there are no duplicates); a
class whose val or test falls short of its target, or that is too small to get any val or test photo, is
warned about, and an import that would leave val or test empty is refused before anything is written. A
group whose files sit in different class folders is a label conflict: it is imported (into train, so it is
never scored) and reported as a warning; fix the labels in the source folders and import again (an import
whose val or test only label conflicts could fill is refused). Groups and warnings are in
`import_report.json` and on screen.

Test records carry no label; their labels go to `test_answers.csv` (`id,label`) so a submission can be
scored. Files that are not readable images are listed in the report and on screen, never dropped silently:
so are images whose header declares more than --max-pixels pixels (decompression bombs; never decoded),
broken links, link loops and pipes or devices. Links are followed; a file reached twice through links is
imported once, and not at all when it is reached from two class folders (its label is ambiguous). A class
folder that is a link to the source folder or above it, or two class folders that are one folder, are
refused. A file name that is not valid UTF-8 is imported, shown with its odd bytes escaped (`bad\\xff.jpg`).

OUT is one data set: its size folders, classes.json, test_answers.csv and import_report.json. An import into
a folder that holds one is refused unless --overwrite is given, which replaces all of them as one unit (size
folders the import does not write are removed; other files in OUT are kept). Everything is written into a
staging folder inside OUT first; only when it is complete is the old data set moved aside and the new one
moved in, and the old one is deleted last. A failed import leaves the earlier data untouched; one killed
half-way is finished or undone by the next import into the same folder, before it does anything else.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from core.contract import CLASSES_FILE, IMPORT_REPORT_FILE, SIZE_FOLDER, TEST_ANSWERS_FILE, size_folder_name
from core.errors import ConfigError, DataError
from core.files import lock_folder, write_text_atomic
from core.members import FIT_MODES
from core.names import shown
from core.photos import DEFAULT_MAX_PIXELS, PhotoError, Problem, check_max_pixels, entry_problem, load_rgb, walk_photos
from training.data.near_duplicates import (
    DEFAULT_DISTANCE,
    check_distance,
    find_duplicates,
    perceptual_hash,
)

NOT_A_PHOTO = "not an image"
MAX_SIZE = 4096  # the largest square written (each photo is held in memory at the largest size)
OUTPUT_FILES = (CLASSES_FILE, TEST_ANSWERS_FILE, IMPORT_REPORT_FILE)
STAGING, NEW, OLD, INCOMING = ".import-staging", ".import-new", ".import-old", ".import-incoming"


@dataclass
class ImportReport:
    """What an import did: classes, counts per split and class, and every skipped file with the reason."""

    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    near_duplicate_distance: int | None = DEFAULT_DISTANCE  # None: exact copies only
    duplicates: dict[str, int] = field(default_factory=dict)  # counts of the groups below
    duplicate_groups: list[dict] = field(default_factory=list)  # files, classes, kind, distance, split
    exact_only: list[str] = field(default_factory=list)  # files whose hash says nothing (flat): grouped by bytes
    targets: dict[str, dict[str, int]] = field(default_factory=dict)  # val and test count each class aims at
    warnings: list[str] = field(default_factory=list)  # label conflicts, classes short of a val/test target
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images were skipped without being decoded
    fit: str = "crop"  # how each photo became a square (imaging.geometry: runs and the service read it)
    filter: str = "lanczos"  # the antialiased resize filter (PIL); the service uses TensorFlow's lanczos3


def fit_square(image: Image.Image, size: int, fit: str) -> Image.Image:
    """Make a size x size image: centre crop, stretch, or pad (black bars) to a square first."""
    if fit == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    if fit == "pad":
        width, height = image.size
        if min(width, height) * size * 2 <= max(width, height):  # PIL would scale the short side to 0 px: all black
            middle = round((size - 1) / 2)  # keep a one-pixel strip, centred as imaging.geometry does
            strip, corner = ((size, 1), (0, middle)) if width > height else ((1, size), (middle, 0))
            image = image if image.mode in ("RGB", "L") else image.convert("RGB")  # a palette is not pasted along
            out = Image.new(image.mode, (size, size), 0)
            out.paste(image.resize(strip, Image.Resampling.LANCZOS), corner)
            return out
        return ImageOps.pad(image, (size, size), Image.Resampling.LANCZOS, color=(0, 0, 0))
    if fit == "stretch":
        return image.resize((size, size), Image.Resampling.LANCZOS)
    raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")


def image_id(relative_path: str, taken: set[str]) -> str:
    """A stable id from the file's path under the source (9 hex digits, longer only on a clash); a name that is not
    valid UTF-8 is hashed as the bytes it is on disk."""
    digest = hashlib.sha1(os.fsencode(relative_path)).hexdigest()
    for length in range(9, len(digest) + 1):
        if digest[:length] not in taken:
            taken.add(digest[:length])
            return digest[:length]
    raise DataError(f"cannot make a unique id for {relative_path}")


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int,
    groups: Sequence[int] | None = None,
) -> dict[str, list[int]]:
    """Indices per split, every class split in the same proportions (at least one train image each).

    With `groups` (a group id per item), items of one group stay in one split: each group of a class draws
    its split at random in the class's proportions and goes there if it fits the remaining count (else to
    train), the single items then fill test and val to their exact counts in a random order, and a split
    still short takes the train group that brings it closest. Without duplicates this is the plain per-class
    shuffle cut at the exact counts, drawing the same random numbers. A group spanning classes goes to train.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val/test fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    units, conflicts = _class_units(labels, groups)
    out: dict[str, list[int]] = {"train": list(conflicts), "val": [], "test": []}
    for label in np.unique(labels):
        n_val, n_test = split_targets(int(np.sum(labels == label)), val_fraction, test_fraction)
        order = rng.permutation(len(units[label]))
        placed = _place_units([units[label][k] for k in order], {"test": n_test, "val": n_val},
                              int(sum(labels[i] == label for i in conflicts)), rng)
        for split in ("test", "val", "train"):
            out[split] += [i for unit in placed[split] for i in unit]
    return {k: rng.permutation(v).tolist() for k, v in out.items()}


def split_targets(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """A class's (val, test) counts for `total` images: the rounded fractions, leaving one or more for train."""
    n_test = int(round(total * test_fraction))
    n_val = int(round(total * val_fraction))
    while n_test + n_val >= total and n_test + n_val > 0:  # keep one training image per class
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _class_units(labels: np.ndarray, groups: Sequence[int] | None) -> tuple[dict[int, list[list[int]]], list[int]]:
    """Each class's groups (lists of indices, in order of their first index), and the items of mixed groups."""
    units: dict[int, list[list[int]]] = {int(label): [] for label in np.unique(labels)}
    if groups is None:
        for i, label in enumerate(labels.tolist()):
            units[label].append([i])
        return units, []
    if len(groups) != len(labels):
        raise ValueError(f"groups must give one group per item: {len(groups)} groups for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for i, group in enumerate(np.asarray(groups).tolist()):
        members.setdefault(group, []).append(i)
    mixed = {g for g, items in members.items() if len({int(labels[i]) for i in items}) > 1}
    for group, items in sorted(members.items(), key=lambda item: item[1][0]):
        if group not in mixed:
            units[int(labels[items[0]])].append(items)
    return units, sorted(i for g in mixed for i in members[g])


def _place_units(units: list[list[int]], targets: dict[str, int], fixed_train: int,
                 rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Assign a class's groups (in the given order) to test, val, train, as close to the targets as they allow."""
    placed: dict[str, list[list[int]]] = {"test": [], "val": [], "train": []}
    count = {"test": 0, "val": 0, "train": 0}
    total = sum(map(len, units)) + fixed_train
    for unit in (u for u in units if len(u) > 1):  # a group: a split drawn in proportion, if the group fits there
        draw = rng.random() * total
        split = "test" if draw < targets["test"] else "val" if draw < targets["test"] + targets["val"] else "train"
        split = split if split == "train" or count[split] + len(unit) <= targets[split] else "train"
        placed[split].append(unit)
        count[split] += len(unit)
    for unit in (u for u in units if len(u) == 1):  # single items: test, then val, to exactly the targets
        split = next((s for s in ("test", "val") if count[s] < targets[s]), "train")
        placed[split].append(unit)
        count[split] += 1
    for split in ("test", "val"):  # a split left short takes train groups while that brings it closer
        while True:
            spare = sum(map(len, placed["train"])) + fixed_train
            error = abs(targets[split] - count[split])
            moves = [(abs(targets[split] - count[split] - len(u)), k) for k, u in enumerate(placed["train"])
                     if abs(targets[split] - count[split] - len(u)) < error and spare - len(u) >= 1]
            if not moves:
                break
            unit = placed["train"].pop(min(moves)[1])
            placed[split].append(unit)
            count[split] += len(unit)
    return placed


@dataclass
class Scan:
    """The source tree: classes, each file once with its label, and what was skipped on the way (with reasons)."""

    classes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _rel(src: Path, path: Path) -> str:
    """A file's path under the source as shown and stored (bytes that are not UTF-8 escaped)."""
    return shown(path.relative_to(src).as_posix())


def _scan(src: Path) -> Scan:
    """Find classes (sub-folders, sorted) and their files: links followed, every real file once."""
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    scan = Scan()
    scan.classes = _class_folders(src, scan)
    if len(scan.classes) < 2:
        raise DataError(f"{src} must hold one sub-folder per class (at least 2); found {scan.classes}")
    found: list[list[Path]] = []
    reached: dict[str, list[tuple[Path, int]]] = {}  # real path: every (path, label) it is reached by
    for label, name in enumerate(scan.classes):
        walk = walk_photos(src / name)
        files = walk.photos
        problems = walk.problems + [Problem(path, "other", NOT_A_PHOTO) for path in walk.others]
        scan.skipped += sorted(({"path": _rel(src, p.path), "reason": p.reason} for p in problems),
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
            continue
        try:
            is_folder = stat.S_ISDIR(os.stat(entry.path).st_mode)
        except OSError as err:  # a broken link or a loop: listed with the reason, like a file
            reason = f"{entry_problem(entry, err).reason} (not read as a class folder)"
            scan.skipped.append({"path": shown(entry.name), "reason": reason})
            continue
        if not is_folder:
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
        names = [_rel(src, path) for path, _ in paths]
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


API_NAMES = {"sizes": "sizes", "val": "val_fraction", "test": "test_fraction", "records": "records_per_file",
             "fit": "fit", "distance": "near_duplicate_distance", "max_pixels": "max_pixels"}
CLI_NAMES = {"sizes": "--sizes", "val": "--val", "test": "--test", "records": "--records-per-file", "fit": "--fit",
             "distance": "--near-duplicate-distance", "max_pixels": "--max-pixels"}


def check_import_options(sizes: Sequence[int], val_fraction: float, test_fraction: float, records_per_file: int,
                         fit: str = "crop", names: dict[str, str] = API_NAMES,
                         near_duplicate_distance: int | None = DEFAULT_DISTANCE,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse options an import cannot use, before anything is read or written (ConfigError naming the option)."""
    check_distance(near_duplicate_distance, names["distance"])
    check_max_pixels(max_pixels, names["max_pixels"])
    if fit not in FIT_MODES:
        raise ConfigError(f"{names['fit']} must be one of {FIT_MODES}, got {fit!r}")
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 8 for s in sizes):
        raise ConfigError(f"{names['sizes']} must be a non-empty list of whole numbers >= 8, got {sizes}")
    if max(sizes) > MAX_SIZE:
        raise ConfigError(f"{names['sizes']} allows squares up to {MAX_SIZE}, got {sizes}")
    twice = [s for i, s in enumerate(sizes) if s in sizes[:i]]
    if twice:
        raise ConfigError(f"{names['sizes']} lists {twice[0]} twice")
    if isinstance(records_per_file, bool) or not isinstance(records_per_file, int | np.integer) \
            or records_per_file < 1:
        raise ConfigError(f"{names['records']} must be a whole number >= 1, got {records_per_file!r}")
    for key, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"{names[key]} must be a fraction above 0 and below 1 (training needs train, val and "
                             f"test images), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"{names['val']} + {names['test']} must be below 1 to leave training images, "
                         f"got {val_fraction} + {test_fraction}")


def import_folders(
    src: str | Path,
    out: str | Path,
    sizes: Sequence[int] = (192,),
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    fit: str = "crop",
    records_per_file: int = 512,
    overwrite: bool = False,
    progress: bool = True,
    near_duplicate_distance: int | None = DEFAULT_DISTANCE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImportReport:
    """Import a folder-per-class photo tree into the competition layout (duplicate groups kept in one split)."""
    src, out = Path(src), Path(out)
    check_import_options(sizes, val_fraction, test_fraction, records_per_file, fit,
                         near_duplicate_distance=near_duplicate_distance, max_pixels=max_pixels)
    near_duplicate_distance = check_distance(near_duplicate_distance)
    _check_out(out)
    scan = _scan(src)
    _check_out_is_not_in(out, src)
    if out.is_dir():  # an interrupted import is finished or undone first; data already there is refused early
        with _locked(out):
            _recover(out, progress)
            _refuse_existing(out, overwrite, scan.classes, sizes)
    report = ImportReport(classes=scan.classes, sizes=list(sizes), near_duplicate_distance=near_duplicate_distance,
                          skipped=list(scan.skipped), warnings=list(scan.warnings), max_pixels=max_pixels,
                          fit=fit)
    if progress:
        for entry in scan.skipped:
            print(f"  skipped {entry['path']}: {entry['reason']}", flush=True)
    files, labels = scan.files, scan.labels
    images, prints = _read_squares(src, files, max(sizes), fit, report, progress, near_duplicate_distance is not None)
    kept = sorted(images)
    kept_labels = [labels[i] for i in kept]
    for label, name in enumerate(scan.classes):
        if label not in kept_labels:
            raise DataError(f"class {name!r} has no readable images in {src / name}")
    taken: set[str] = set()
    ids = {i: image_id(str(files[i].relative_to(src)), taken) for i in kept}
    splits, in_groups = _split_keeping_duplicates(src, files, labels, kept, prints,
                                                  (val_fraction, test_fraction, seed), report)
    _check_split_counts(report, splits, labels, (val_fraction, test_fraction), in_groups)
    if progress and report.duplicate_groups:
        print(f"  kept {len(report.duplicate_groups)} group(s) of duplicates within one split each", flush=True)
    report.counts = {
        split: {scan.classes[c]: sum(1 for i in members if labels[i] == c) for c in range(len(scan.classes))}
        for split, members in splits.items()
    }
    examples = {i: (images[i], ids[i], labels[i]) for i in kept}

    def stage(folder: Path) -> None:
        _write_records(folder, sizes, splits, examples, records_per_file, progress)
        _write_reports(folder, src, report, [(ids[i], labels[i]) for i in splits["test"]])

    _publish(out, stage, overwrite, scan.classes, sizes, progress)
    return report


def _check_out(out: Path) -> None:
    """Refuse a data folder that cannot be one: a file (or a folder under a file), or a path that is not UTF-8."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{existing} is a file, not a folder: cannot write the data set to {out}")
    if shown(str(out)) != str(out):
        raise DataError(f"the data folder path {shown(str(out))} is not valid UTF-8 (TensorFlow cannot write "
                        "there); choose another name")


def _check_out_is_not_in(out: Path, src: Path) -> None:
    """Refuse a data folder inside the source folder: the next import would read its records as photos."""
    real_out, real_src = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if real_out.is_relative_to(real_src):
        raise DataError(f"the data folder {out} is inside the source folder {src}: the next import would read its "
                        "files as photos; write the data set somewhere else")


def _read_squares(src: Path, files: list[Path], size: int, fit: str, report: ImportReport, progress: bool,
                  near: bool = True) -> tuple[dict[int, Image.Image], dict[int, tuple[str, int]]]:
    """Open every file as an RGB square of the largest size, with its (sha256 of the file, perceptual hash of the
    square as stored or 0); unreadable files and images over report.max_pixels (never decoded) go to the report."""
    images: dict[int, Image.Image] = {}
    prints: dict[int, tuple[str, int]] = {}
    for i, path in enumerate(files):
        try:
            square = fit_square(load_rgb(path, report.max_pixels), size, fit)  # keep only the largest square
            # The hash of what the records hold (the JPEG of this square), as `flower overlap DATA:split` sees it.
            stored = perceptual_hash(load_rgb(_encode(square, size), None)) if near else 0
            prints[i] = (_sha256(path), stored)
            images[i] = square
        except (PhotoError, OSError) as err:
            reason = _skip_reason(err, report.max_pixels)
            report.skipped.append({"path": _rel(src, path), "reason": reason})
            if progress:
                print(f"  skipped {_rel(src, path)}: {reason}", flush=True)
        if progress and ((i + 1) % 500 == 0 or i + 1 == len(files)):
            print(f"  read {i + 1}/{len(files)} files", flush=True)
    return images, prints


def _skip_reason(err: PhotoError | OSError, max_pixels: int) -> str:
    """Why a file was skipped, as the import report says it."""
    code = getattr(err, "code", "")
    if code == "too_many_pixels":
        return f"{err} (--max-pixels {max_pixels}); not decoded (a decompression bomb?)"
    if code in ("not_an_image", "unsupported_format"):
        return NOT_A_PHOTO if code == "not_an_image" else shown(str(err))
    return f"unreadable image ({shown(str(err))})"


def _sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_keeping_duplicates(src: Path, files: list[Path], labels: list[int], kept: list[int],
                              prints: dict[int, tuple[str, int]], split_args: tuple[float, float, int],
                              report: ImportReport) -> tuple[dict[str, list[int]], dict[str, Counter]]:
    """Group duplicates among the kept files, split with each group whole, and list the groups in the report.
    Also returns, per class, how many of its photos are in groups ("grouped") and in label conflicts."""
    duplicates = find_duplicates([prints[i][1] for i in kept], [prints[i][0] for i in kept],
                                 report.near_duplicate_distance)
    kept_labels = [labels[i] for i in kept]
    report.exact_only = [_rel(src, files[kept[j]]) for j in duplicates.exact_only]
    split_idx = stratified_split(kept_labels, *split_args, groups=duplicates.group_of)
    splits = {name: [kept[j] for j in idx] for name, idx in split_idx.items()}
    split_of = {i: name for name, members in splits.items() for i in members}
    in_groups: dict[str, Counter] = {"grouped": Counter(), "conflicts": Counter()}
    for group, exact, distance in zip(duplicates.groups, duplicates.exact, duplicates.distance, strict=True):
        members = [kept[j] for j in group]
        names = [_rel(src, files[i]) for i in members]
        classes = sorted({report.classes[labels[i]] for i in members})
        entry = {"files": names, "classes": classes, "kind": "exact" if exact else "near", "distance": distance,
                 "split": split_of[members[0]], "label_conflict": len(classes) > 1}
        assert all(split_of[i] == entry["split"] for i in members), entry  # a group never straddles splits
        report.duplicate_groups.append(entry)
        in_groups["conflicts" if entry["label_conflict"] else "grouped"].update(report.classes[labels[i]]
                                                                                for i in members)
        if entry["label_conflict"]:
            what = "byte-identical copies" if exact else f"near duplicates (hash distance {distance})"
            report.warnings.append(f"label conflict: {', '.join(names)} are {what} but sit in different class "
                                   f"folders ({', '.join(classes)}); imported into train, never scored; fix the "
                                   "labels in the source folders and import again")
    groups = report.duplicate_groups
    report.duplicates = {"groups": len(groups), "files_in_groups": sum(len(g["files"]) for g in groups),
                         "exact_groups": sum(g["kind"] == "exact" for g in groups),
                         "near_groups": sum(g["kind"] == "near" for g in groups),
                         "label_conflicts": sum(g["label_conflict"] for g in groups)}
    return splits, in_groups


def _check_split_counts(report: ImportReport, splits: dict[str, list[int]], labels: list[int],
                        fractions: tuple[float, float], in_groups: dict[str, Counter]) -> None:
    """Record each class's val/test targets, warn for a class short of one or too small for any val or test photo,
    and refuse an import that would leave val or test empty."""
    per_split = {name: Counter(labels[i] for i in members) for name, members in splits.items()}
    grouped, conflicts = in_groups["grouped"], in_groups["conflicts"]
    report.targets = {"val": {}, "test": {}}
    free = {}
    for c, name in enumerate(report.classes):
        total = sum(counts[c] for counts in per_split.values())
        free[name] = total - conflicts[name]
        report.targets["val"][name], report.targets["test"][name] = split_targets(total, *fractions)
        short = [f"{s} has {per_split[s][c]} of its target {report.targets[s][name]}" for s in ("val", "test")
                 if per_split[s][c] < report.targets[s][name]]
        if short:
            report.warnings.append(f"class {name!r}: {' and '.join(short)} photo(s): duplicate groups stay whole "
                                   f"and did not fit ({grouped[name] + conflicts[name]} of its {total} photos are in "
                                   f"groups, {conflicts[name]} of them in label conflicts, which go to train); its "
                                   "val/test scores rest on fewer photos")
        small = [s for s, fraction in zip(("val", "test"), fractions, strict=True)
                 if fraction > 0 and report.targets[s][name] == 0]
        if small:
            report.warnings.append(f"class {name!r} has only {total} photo(s): too few for a share of "
                                   f"{' and '.join(small)} (the fractions give it none, and one photo always stays "
                                   f"in train), so it has no {' and no '.join(small)} photos and is never scored "
                                   f"there; add photos to the class")
    empty = [s for s in ("val", "test") if not splits[s]]
    if empty:
        raise DataError(_empty_split_message(empty, report, free))


def _empty_split_message(empty: list[str], report: ImportReport, free: dict[str, int]) -> str:
    """Why an import would leave val and/or test empty (it is refused, nothing written)."""
    wanted = {s: sum(report.targets[s].values()) for s in empty}
    groups = report.duplicate_groups
    conflicts = [g for g in groups if g["label_conflict"]]
    if not any(wanted.values()):
        cause = ("no class has enough photos for the val/test fractions to give it one; add photos or raise "
                 "the fractions")
    elif not any(free[name] for s in empty for name, target in report.targets[s].items() if target):
        cause = (f"every photo that could go there is in a label conflict ({sum(len(g['files']) for g in conflicts)} "
                 f"photos in {len(conflicts)} groups of copies that sit in different class folders, which go to "
                 "train); fix the labels in the source folders and import again")
    else:
        cause = (f"{' and '.join(f'{s} should hold {n}' for s, n in wanted.items() if n)} photo(s), but the photos "
                 f"that could go there are in duplicate groups ({sum(len(g['files']) for g in groups)} photos in "
                 f"{len(groups)} groups, {len(conflicts)} of them label conflicts), each "
                 "kept whole and too large for its class's target; add photos that are not duplicates, or raise "
                 "the val/test fractions so that whole groups fit")
    return f"the import would leave {' and '.join(empty)} empty: {cause}; nothing was written"


# --- writing: stage the whole data set, then swap it in --------------------------------------------------------


def _output_names(out: Path) -> list[str]:
    """The entries of OUT that belong to its data set (size folders, classes.json, ...), sorted."""
    if not out.is_dir():
        return []
    return sorted(name for name in os.listdir(out) if name in OUTPUT_FILES or SIZE_FOLDER.match(name))


def _listed(names: Sequence[str], most: int = 8) -> str:
    """Names joined with commas, the first `most` of them."""
    names = [shown(str(name)) for name in names]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _refuse_existing(out: Path, overwrite: bool, classes: list[str], sizes: Sequence[int]) -> None:
    """Without overwrite, refuse a folder that already holds a data set, naming what is there."""
    names = _output_names(out)
    if overwrite or not names:
        return
    there = []
    if "classes.json" in names:
        try:
            old = json.loads((out / "classes.json").read_text())
            there.append(f"classes {_listed(old)} in classes.json" if isinstance(old, list) else
                         "classes.json (not a list of classes)")
        except (OSError, ValueError):
            there.append("classes.json (unreadable)")
    there += [name for name in names if name != "classes.json"]
    raise DataError(f"{out} already holds a data set ({'; '.join(there)}); this import writes classes "
                    f"{_listed(classes)} at {', '.join(f'{s}x{s}' for s in sizes)}: pass overwrite=True "
                    "(--overwrite) to replace the whole data set, or import into another folder")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold OUT's import lock (an flock on the folder; released when the process ends, even when it is killed)."""
    try:
        fd = lock_folder(out)
    except BlockingIOError:
        raise DataError(f"another import is writing to {out} right now; wait for it to end and try again") from None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _publish(out: Path, stage: Callable[[Path], None], overwrite: bool, classes: list[str], sizes: Sequence[int],
             progress: bool) -> None:
    """Write the whole data set into OUT/.import-staging, then swap it in for the old one (see _swap)."""
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _recover(out, progress)
        _refuse_existing(out, overwrite, classes, sizes)
        staging = out / STAGING
        staging.mkdir()
        try:
            stage(staging)
            os.replace(staging, out / NEW)  # complete: from here on it can be swapped in
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap(out)


def _swap(out: Path) -> None:
    """Move the old data set aside into .import-old, rename .import-new to .import-incoming, move its entries into
    OUT, and remove the emptied .import-incoming (the commit); only then delete the old data set. On a failure the
    old data set is put back at once; after a kill, _recover does it on the next import."""
    old, incoming = out / OLD, out / INCOMING
    try:
        old.mkdir()
        for name in _output_names(out):
            os.replace(out / name, old / name)
        os.replace(out / NEW, incoming)
        for name in sorted(os.listdir(incoming)):
            os.replace(incoming / name, out / name)
        os.rmdir(incoming)  # the commit: the new data set is complete and in place
    except BaseException as err:  # a failure, or Ctrl-C: put the old data set back now
        try:
            _recover(out, progress=False)
        except Exception as second:
            raise DataError(f"the import could not move its data into place in {out} ({err}), nor put the earlier "
                            f"data back ({second}); it is in {old}, and the next import into {out} puts it "
                            "back") from err
        if not isinstance(err, Exception):
            raise
        raise DataError(f"the import could not move its data into place in {out} ({err}); the earlier data is "
                        "back in place") from err
    try:
        shutil.rmtree(old)
    except OSError as err:
        print(f"note: the earlier data in {old} could not be deleted ({err}); the next import into {out} deletes "
              "it", file=sys.stderr)


def _recover(out: Path, progress: bool) -> None:
    """Finish or undo an import killed while staging or swapping, from what is on disk (see _swap).

    .import-staging: a partial stage, deleted. .import-incoming: killed before the commit, the new entries moved in
    so far go back to it, it becomes .import-new again; then .import-new: the old entries in .import-old go back
    into OUT and the new data set is deleted. .import-old alone: killed after the commit, while the old data set
    was deleted: deleted. Each step can be killed and redone."""
    old, new, incoming = out / OLD, out / NEW, out / INCOMING
    staged = os.path.lexists(out / STAGING)
    undone, finished = os.path.lexists(new) or os.path.lexists(incoming), os.path.lexists(old)
    if staged:
        _remove(out / STAGING)
    if incoming.is_dir():
        for name in _output_names(out):  # all new: every old entry was moved aside before .import-incoming existed
            os.replace(out / name, incoming / name)
        os.replace(incoming, new)
    if os.path.lexists(new):
        if old.is_dir():
            for name in sorted(os.listdir(old)):
                os.replace(old / name, out / name)
            os.rmdir(old)
        _remove(new)
    elif os.path.lexists(old):
        _remove(old)
    if progress and (staged or undone or finished):
        what = ("undone: the earlier data set is back in place" if undone else
                "finished: its data set was in place, the earlier one left behind is deleted" if finished else
                "cleaned up: the earlier data set was not touched")
        print(f"  an interrupted import into {out} was {what}", flush=True)


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_records(folder: Path, sizes: Sequence[int], splits: dict[str, list[int]],
                   examples: dict[int, tuple[Image.Image, str, int]], records_per_file: int, progress: bool) -> None:
    """Write every size's records into folder (the staging folder)."""
    from imaging.records import Record, write_split

    for size in sizes:
        for split, members in splits.items():
            labelled = split != "test"
            records = (Record(_encode(examples[i][0], size), examples[i][1], examples[i][2] if labelled else None)
                       for i in members)
            write_split(str(folder / size_folder_name(size) / split), size, records, records_per_file)
        if progress:
            print(f"  wrote records at {size}x{size}", flush=True)


def _write_reports(folder: Path, src: Path, report: ImportReport, answers: list[tuple[str, int]]) -> None:
    """classes.json, test_answers.csv (id,label of the unlabelled test records) and import_report.json."""
    write_text_atomic(folder / "classes.json", json.dumps(report.classes, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows(sorted(answers))
    write_text_atomic(folder / "test_answers.csv", buffer.getvalue())
    write_text_atomic(folder / "import_report.json",
                      json.dumps(report.__dict__ | {"source": shown(str(src))}, indent=1) + "\n")


def _encode(square: Image.Image, size: int) -> bytes:
    """Resize a square image to `size` and encode it as JPEG (quality 95, colour at full resolution: 4:2:0 chroma
    subsampling alone moved a 64 px flower photo's pixels by 2.2 grey levels on average, 4:4:4 by 1.7)."""
    buffer = io.BytesIO()
    fit_square(square, size, "stretch").save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()

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
class whose val or test falls short of its target is warned about, and an import that would leave a whole
split empty is refused before anything is written. A group whose files sit in different class folders is a
label conflict: it is imported (into train, so it is never scored) and reported as a warning; fix the labels
in the source folders and import again. Groups and warnings are in `import_report.json` and on screen.

Test records carry no label; their labels go to `test_answers.csv` (`id,label`) so a submission can be
scored. Files that are not readable images are listed in the report and on screen, never dropped silently.
Everything is staged in a temporary folder and moved into place at the end, so a failed import leaves
earlier data untouched.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import DataError
from training.near_duplicates import (
    DEFAULT_DISTANCE,
    MAX_DISTANCE,
    check_distance,
    find_duplicates,
    load_rgb,
    parse_distance,
    perceptual_hash,
)
from training.writing import write_text_atomic

FIT_MODES = ("crop", "stretch", "pad")


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


def fit_square(image: Image.Image, size: int, fit: str) -> Image.Image:
    """Make a size x size image: centre crop, stretch, or pad (black bars) to a square first."""
    if fit == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    if fit == "pad":
        return ImageOps.pad(image, (size, size), Image.Resampling.LANCZOS, color=(0, 0, 0))
    if fit == "stretch":
        return image.resize((size, size), Image.Resampling.LANCZOS)
    raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")


def image_id(relative_path: str, taken: set[str]) -> str:
    """A stable id from the file's path under the source (9 hex digits, longer only on a clash)."""
    digest = hashlib.sha1(relative_path.encode()).hexdigest()
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


def _scan(src: Path) -> tuple[list[str], list[Path], list[int]]:
    """Find classes (sub-folders, sorted) and their files."""
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{src} must hold one sub-folder per class (at least 2); found {classes}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (src / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise DataError(f"class folder {src / name} holds no files")
        files += found
        labels += [label] * len(found)
    return classes, files, labels


API_NAMES = {"sizes": "sizes", "val": "val_fraction", "test": "test_fraction", "records": "records_per_file",
             "fit": "fit", "distance": "near_duplicate_distance"}
CLI_NAMES = {"sizes": "--sizes", "val": "--val", "test": "--test", "records": "--records-per-file", "fit": "--fit",
             "distance": "--near-duplicate-distance"}


def check_import_options(sizes: Sequence[int], val_fraction: float, test_fraction: float, records_per_file: int,
                         fit: str = "crop", names: dict[str, str] = API_NAMES,
                         near_duplicate_distance: int | None = DEFAULT_DISTANCE) -> None:
    """Refuse options an import cannot use, before anything is read or written (ValueError naming the option)."""
    check_distance(near_duplicate_distance, names["distance"])
    if fit not in FIT_MODES:
        raise ValueError(f"{names['fit']} must be one of {FIT_MODES}, got {fit!r}")
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 8 for s in sizes):
        raise ValueError(f"{names['sizes']} must be a non-empty list of whole numbers >= 8, got {sizes}")
    twice = [s for i, s in enumerate(sizes) if s in sizes[:i]]
    if twice:
        raise ValueError(f"{names['sizes']} lists {twice[0]} twice")
    if isinstance(records_per_file, bool) or not isinstance(records_per_file, int | np.integer) \
            or records_per_file < 1:
        raise ValueError(f"{names['records']} must be a whole number >= 1, got {records_per_file!r}")
    for key, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{names[key]} must be a fraction above 0 and below 1 (training needs train, val and "
                             f"test images), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"{names['val']} + {names['test']} must be below 1 to leave training images, "
                         f"got {val_fraction} + {test_fraction}")


def _parse_sizes(text: str) -> list[int]:
    """The --sizes option: comma-separated whole numbers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise ValueError(f"--sizes must be comma-separated whole numbers, got {text!r}")
    return sizes


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
) -> ImportReport:
    """Import a folder-per-class photo tree into the competition layout (duplicate groups kept in one split)."""
    src, out = Path(src), Path(out)
    check_import_options(sizes, val_fraction, test_fraction, records_per_file, fit,
                         near_duplicate_distance=near_duplicate_distance)
    near_duplicate_distance = check_distance(near_duplicate_distance)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{existing} is a file, not a folder: cannot write the data set to {out}")
    for size in sizes:
        target = out / f"tfrecords-jpeg-{size}x{size}"
        if target.exists() and not overwrite:
            raise DataError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    classes, files, labels = _scan(src)
    report = ImportReport(classes=classes, sizes=list(sizes), near_duplicate_distance=near_duplicate_distance)
    images, prints = _read_squares(src, files, max(sizes), fit, report, progress, near_duplicate_distance is not None)
    kept = sorted(images)
    kept_labels = [labels[i] for i in kept]
    for label, name in enumerate(classes):
        if label not in kept_labels:
            raise DataError(f"class {name!r} has no readable images in {src / name}")
    taken: set[str] = set()
    ids = {i: image_id(str(files[i].relative_to(src)), taken) for i in kept}
    splits = _split_keeping_duplicates(src, files, labels, kept, prints, (val_fraction, test_fraction, seed), report)
    _check_split_counts(report, splits, labels, (val_fraction, test_fraction))
    if progress and report.duplicate_groups:
        print(f"  kept {len(report.duplicate_groups)} group(s) of duplicates within one split each", flush=True)
    examples = {i: (images[i], ids[i], labels[i]) for i in kept}
    _write_records(out, f".import-staging-{seed}", sizes, splits, examples, records_per_file, progress)
    report.counts = {
        split: {classes[c]: sum(1 for i in members if labels[i] == c) for c in range(len(classes))}
        for split, members in splits.items()
    }
    _write_reports(out, src, report, [(ids[i], labels[i]) for i in splits["test"]])
    return report


def _read_squares(src: Path, files: list[Path], size: int, fit: str, report: ImportReport, progress: bool,
                  near: bool = True) -> tuple[dict[int, Image.Image], dict[int, tuple[str, int]]]:
    """Open every file as an RGB square of the largest size, with its (sha256 of the file, perceptual hash of the
    square as stored or 0); unreadable files go to the report."""
    images: dict[int, Image.Image] = {}
    prints: dict[int, tuple[str, int]] = {}
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
            images[i] = fit_square(load_rgb(data), size, fit)  # keep only the largest square
            # The hash of what the records hold (the JPEG of this square), as `flower overlap DATA:split` sees it.
            stored = perceptual_hash(load_rgb(_encode(images[i], size))) if near else 0
            prints[i] = (hashlib.sha256(data).hexdigest(), stored)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
            report.skipped.append({"path": str(path.relative_to(src)), "reason": reason})
            if progress:
                print(f"  skipped {path.relative_to(src)}: {reason}", flush=True)
        if progress and ((i + 1) % 500 == 0 or i + 1 == len(files)):
            print(f"  read {i + 1}/{len(files)} files", flush=True)
    return images, prints


def _split_keeping_duplicates(src: Path, files: list[Path], labels: list[int], kept: list[int],
                              prints: dict[int, tuple[str, int]], split_args: tuple[float, float, int],
                              report: ImportReport) -> dict[str, list[int]]:
    """Group duplicates among the kept files, split with each group whole, and list the groups in the report."""
    duplicates = find_duplicates([prints[i][1] for i in kept], [prints[i][0] for i in kept],
                                 report.near_duplicate_distance)
    kept_labels = [labels[i] for i in kept]
    report.exact_only = [str(files[kept[j]].relative_to(src)) for j in duplicates.exact_only]
    split_idx = stratified_split(kept_labels, *split_args, groups=duplicates.group_of)
    splits = {name: [kept[j] for j in idx] for name, idx in split_idx.items()}
    split_of = {i: name for name, members in splits.items() for i in members}
    for group, exact, distance in zip(duplicates.groups, duplicates.exact, duplicates.distance, strict=True):
        members = [kept[j] for j in group]
        names = [str(files[i].relative_to(src)) for i in members]
        classes = sorted({report.classes[labels[i]] for i in members})
        entry = {"files": names, "classes": classes, "kind": "exact" if exact else "near", "distance": distance,
                 "split": split_of[members[0]], "label_conflict": len(classes) > 1}
        assert all(split_of[i] == entry["split"] for i in members), entry  # a group never straddles splits
        report.duplicate_groups.append(entry)
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
    return splits


def _check_split_counts(report: ImportReport, splits: dict[str, list[int]], labels: list[int],
                        fractions: tuple[float, float]) -> None:
    """Record each class's val/test targets, warn for a class short of one, and refuse an empty val or test."""
    per_split = {name: Counter(labels[i] for i in members) for name, members in splits.items()}
    grouped, conflicts = Counter(), Counter()
    for group in report.duplicate_groups:
        for file in group["files"]:  # a file's path under the source starts with its class folder
            (conflicts if group["label_conflict"] else grouped)[Path(file).parts[0]] += 1
    report.targets = {"val": {}, "test": {}}
    for c, name in enumerate(report.classes):
        total = sum(counts[c] for counts in per_split.values())
        report.targets["val"][name], report.targets["test"][name] = split_targets(total, *fractions)
        short = [f"{s} has {per_split[s][c]} of its target {report.targets[s][name]}" for s in ("val", "test")
                 if per_split[s][c] < report.targets[s][name]]
        if short:
            report.warnings.append(f"class {name!r}: {' and '.join(short)} photo(s): duplicate groups stay whole "
                                   f"and did not fit ({grouped[name] + conflicts[name]} of its {total} photos are in "
                                   f"groups, {conflicts[name]} of them in label conflicts, which go to train); its "
                                   "val/test scores rest on fewer photos")
    free = {name: sum(counts[c] for counts in per_split.values()) - conflicts[name]
            for c, name in enumerate(report.classes)}
    for split in (s for s in ("val", "test") if not splits[s]):
        if any(free[name] for name, target in report.targets[split].items() if target):
            raise DataError(_empty_split_message([s for s in ("val", "test") if not splits[s]], report))
        # Only label conflicts (already warned about, kept in train) left it empty: fixing the labels fixes it.
        report.warnings.append(f"{split} is empty: every photo that could go there is in a label conflict; fix "
                               "the labels in the source folders and import again")


def _empty_split_message(empty: list[str], report: ImportReport) -> str:
    """Why an import would leave val and/or test empty (it is refused, nothing written)."""
    wanted = {s: sum(report.targets[s].values()) for s in empty}
    if not any(wanted.values()):
        cause = ("no class has enough photos for the val/test fractions to give it one; add photos or raise "
                 "the fractions")
    else:
        groups = report.duplicate_groups
        cause = (f"{' and '.join(f'{s} should hold {n}' for s, n in wanted.items() if n)} photo(s), but the photos "
                 f"that could go there are in duplicate groups ({sum(len(g['files']) for g in groups)} photos in "
                 f"{len(groups)} groups, {sum(g['label_conflict'] for g in groups)} of them label conflicts), each "
                 "kept whole and too large for its class's target; add photos that are not duplicates, or raise "
                 "the val/test fractions so that whole groups fit")
    return f"the import would leave {' and '.join(empty)} empty: {cause}; nothing was written"


def _write_records(out: Path, staging_name: str, sizes: Sequence[int], splits: dict[str, list[int]],
                   examples: dict[int, tuple[Image.Image, str, int]], records_per_file: int, progress: bool) -> None:
    """Write every size's records into a staging folder, then move each size folder into place."""
    from training.records import Record, write_split

    out.mkdir(parents=True, exist_ok=True)
    staging = out / staging_name
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for size in sizes:
            for split, members in splits.items():
                if not members:
                    continue
                labelled = split != "test"
                records = (Record(_encode(examples[i][0], size), examples[i][1], examples[i][2] if labelled else None)
                           for i in members)
                write_split(str(staging / f"tfrecords-jpeg-{size}x{size}" / split), size, records, records_per_file)
            if progress:
                print(f"  wrote records at {size}x{size}", flush=True)
        for size in sizes:
            name = f"tfrecords-jpeg-{size}x{size}"
            if (out / name).exists():
                shutil.rmtree(out / name)
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_reports(out: Path, src: Path, report: ImportReport, answers: list[tuple[str, int]]) -> None:
    """classes.json, test_answers.csv (id,label of the unlabelled test records) and import_report.json."""
    write_text_atomic(out / "classes.json", json.dumps(report.classes, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows(sorted(answers))
    write_text_atomic(out / "test_answers.csv", buffer.getvalue())
    write_text_atomic(out / "import_report.json", json.dumps(report.__dict__ | {"source": str(src)}, indent=1) + "\n")


def _encode(square: Image.Image, size: int) -> bytes:
    """Resize a square image to `size` and encode it as JPEG (quality 95)."""
    buffer = io.BytesIO()
    fit_square(square, size, "stretch").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def main(argv: list[str] | None = None, prog: str = "python -m training.photos") -> int:
    """Command line entry point of `flower import`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with one sub-folder of photos per class (JPEG/PNG/GIF/BMP/WebP, any size)")
    parser.add_argument("out", help="data folder to write (competition layout)")
    parser.add_argument("--sizes", default="192", help="comma-separated square sizes to write, e.g. 192,224 "
                                                        "(default 192)")
    parser.add_argument("--val", type=float, default=0.15, help="fraction of each class for validation (default 0.15)")
    parser.add_argument("--test", type=float, default=0.15, help="fraction of each class for test (default 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    parser.add_argument("--fit", choices=FIT_MODES, default="crop",
                        help="how a non-square photo becomes square: centre crop, stretch, or pad (default crop)")
    parser.add_argument("--records-per-file", type=int, default=512, help="records per .tfrec file (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace records of the same size in OUT")
    parser.add_argument("--near-duplicate-distance", default=str(DEFAULT_DISTANCE), metavar="N",
                        help="photos whose 64-bit perceptual hashes differ in at most N bits are near duplicates and "
                             f"go to the same split, like files with the same bytes; 0..{MAX_DISTANCE}, or 'off' / -1 "
                             f"to group exact copies only (default {DEFAULT_DISTANCE})")
    args = parser.parse_args(argv)
    try:
        sizes = _parse_sizes(args.sizes)
        distance = parse_distance(args.near_duplicate_distance)
        check_import_options(sizes, args.val, args.test, args.records_per_file, args.fit, CLI_NAMES, distance)
        report = import_folders(args.src, args.out, sizes, args.val, args.test, args.seed, args.fit,
                                args.records_per_file, args.overwrite, near_duplicate_distance=distance)
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(report, Path(args.out) / "import_report.json"))
    return 0


def _summary(report: ImportReport, report_file: Path) -> str:
    """What `flower import` prints at the end: counts, duplicate groups, warnings, skipped files."""
    lines = [f"{split:5s} {sum(per_class.values()):6d}  " + ", ".join(f"{k}={v}" for k, v in per_class.items())
             for split, per_class in report.counts.items()]
    found = report.duplicates
    rule = ("same bytes" if report.near_duplicate_distance is None
            else f"same bytes or hash distance <= {report.near_duplicate_distance}")
    lines.append(f"duplicates: {found.get('groups', 0)} group(s) of {found.get('files_in_groups', 0)} files "
                 f"({found.get('exact_groups', 0)} exact, {found.get('near_groups', 0)} near; {rule}), "
                 "each kept within one split")
    if report.exact_only:
        lines.append(f"{len(report.exact_only)} photo(s) too flat or smooth for the perceptual hash (a flat colour, "
                     "a clean gradient): grouped by their bytes only")
    lines += [f"WARNING: {warning}" for warning in report.warnings]
    lines.append(f"skipped {len(report.skipped)} file(s) (skipped files, duplicate groups and the photos grouped "
                 f"by bytes only are listed in {report_file})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""`import_folders`: folders of photos (one per class) into one data set in the competition layout."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from core.contract import CLASSES_FILE, IMPORT_REPORT_FILE, TEST_ANSWERS_FILE, size_folder_name
from core.errors import DataError
from core.files import write_text_atomic
from core.names import shown
from core.photos import DEFAULT_MAX_PIXELS
from training.data.importer.options import check_import_options
from training.data.importer.publish import locked, publish, recover, refuse_existing
from training.data.importer.report import ImportReport
from training.data.importer.sources import rel, scan_source
from training.data.importer.split import image_id, split_targets, stratified_split
from training.data.importer.squares import encode, read_squares
from training.data.near_duplicates import (
    DEFAULT_DISTANCE,
    check_distance,
    find_duplicates,
)


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
    scan = scan_source(src)
    _check_out_is_not_in(out, src)
    if out.is_dir():  # an interrupted import is finished or undone first; data already there is refused early
        with locked(out):
            recover(out, progress)
            refuse_existing(out, overwrite, scan.classes, sizes)
    report = ImportReport(classes=scan.classes, sizes=list(sizes), near_duplicate_distance=near_duplicate_distance,
                          skipped=list(scan.skipped), warnings=list(scan.warnings), max_pixels=max_pixels,
                          fit=fit)
    if progress:
        for entry in scan.skipped:
            print(f"  skipped {entry['path']}: {entry['reason']}", flush=True)
    files, labels = scan.files, scan.labels
    images, prints = read_squares(src, files, max(sizes), fit, report, progress, near_duplicate_distance is not None)
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

    publish(out, stage, overwrite, scan.classes, sizes, progress)
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


def _split_keeping_duplicates(src: Path, files: list[Path], labels: list[int], kept: list[int],
                              prints: dict[int, tuple[str, int]], split_args: tuple[float, float, int],
                              report: ImportReport) -> tuple[dict[str, list[int]], dict[str, Counter]]:
    """Group duplicates among the kept files, split with each group whole, and list the groups in the report.
    Also returns, per class, how many of its photos are in groups ("grouped") and in label conflicts."""
    duplicates = find_duplicates([prints[i][1] for i in kept], [prints[i][0] for i in kept],
                                 report.near_duplicate_distance)
    kept_labels = [labels[i] for i in kept]
    report.exact_only = [rel(src, files[kept[j]]) for j in duplicates.exact_only]
    split_idx = stratified_split(kept_labels, *split_args, groups=duplicates.group_of)
    splits = {name: [kept[j] for j in idx] for name, idx in split_idx.items()}
    split_of = {i: name for name, members in splits.items() for i in members}
    in_groups: dict[str, Counter] = {"grouped": Counter(), "conflicts": Counter()}
    for group, exact, distance in zip(duplicates.groups, duplicates.exact, duplicates.distance, strict=True):
        members = [kept[j] for j in group]
        names = [rel(src, files[i]) for i in members]
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


def _write_records(folder: Path, sizes: Sequence[int], splits: dict[str, list[int]],
                   examples: dict[int, tuple[Image.Image, str, int]], records_per_file: int, progress: bool) -> None:
    """Write every size's records into folder (the staging folder)."""
    from imaging.records import Record, write_split

    for size in sizes:
        for split, members in splits.items():
            labelled = split != "test"
            records = (Record(encode(examples[i][0], size), examples[i][1], examples[i][2] if labelled else None)
                       for i in members)
            write_split(str(folder / size_folder_name(size) / split), size, records, records_per_file)
        if progress:
            print(f"  wrote records at {size}x{size}", flush=True)


def _write_reports(folder: Path, src: Path, report: ImportReport, answers: list[tuple[str, int]]) -> None:
    """classes.json, test_answers.csv (id,label of the unlabelled test records) and import_report.json."""
    write_text_atomic(folder / CLASSES_FILE, json.dumps(report.classes, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows(sorted(answers))
    write_text_atomic(folder / TEST_ANSWERS_FILE, buffer.getvalue())
    write_text_atomic(folder / IMPORT_REPORT_FILE,
                      json.dumps(report.__dict__ | {"source": shown(str(src))}, indent=1) + "\n")

"""Import a folder-per-class tree of photos into the competition layout (`flower import`).

    flower import photos/ data/mine --sizes 192,224

    <src>/<class>/<any>.jpg|png|...  ->  <out>/tfrecords-jpeg-<S>x<S>/{train,val,test}/*.tfrec
                                         <out>/classes.json, <out>/test_answers.csv, <out>/import_report.json

The split is stratified by class and seeded. Test records carry no label; their labels go to
`test_answers.csv` (`id,label`) so a submission can be scored. Files that are not readable images are
listed in the report and on screen, never dropped silently. Everything is staged in a temporary folder
and moved into place at the end, so a failed import leaves earlier data untouched.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import DataError
from training.pixels import to_rgb
from training.writing import write_text_atomic

FIT_MODES = ("crop", "stretch", "pad")


@dataclass
class ImportReport:
    """What an import did: classes, counts per split and class, and every skipped file with the reason."""

    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Open an image file (or bytes) as RGB: EXIF orientation applied, alpha composited on white."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return to_rgb(image)


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
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Indices per split, every class split in the same proportions (at least one train image each)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val/test fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        while n_test + n_val >= len(idx) and n_test + n_val > 0:  # keep one training image per class
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {k: rng.permutation(v).tolist() for k, v in out.items()}


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
             "fit": "fit"}
CLI_NAMES = {"sizes": "--sizes", "val": "--val", "test": "--test", "records": "--records-per-file", "fit": "--fit"}


def check_import_options(sizes: Sequence[int], val_fraction: float, test_fraction: float, records_per_file: int,
                         fit: str = "crop", names: dict[str, str] = API_NAMES) -> None:
    """Refuse options an import cannot use, before anything is read or written (ValueError naming the option)."""
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
) -> ImportReport:
    """Import a folder-per-class photo tree into the competition layout; return what was done."""
    src, out = Path(src), Path(out)
    check_import_options(sizes, val_fraction, test_fraction, records_per_file, fit)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"{existing} is a file, not a folder: cannot write the data set to {out}")
    for size in sizes:
        target = out / f"tfrecords-jpeg-{size}x{size}"
        if target.exists() and not overwrite:
            raise DataError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    classes, files, labels = _scan(src)
    report = ImportReport(classes=classes, sizes=list(sizes))
    images = _read_squares(src, files, max(sizes), fit, report, progress)
    kept = sorted(images)
    kept_labels = [labels[i] for i in kept]
    for label, name in enumerate(classes):
        if label not in kept_labels:
            raise DataError(f"class {name!r} has no readable images in {src / name}")
    taken: set[str] = set()
    ids = {i: image_id(str(files[i].relative_to(src)), taken) for i in kept}
    split_idx = stratified_split(kept_labels, val_fraction, test_fraction, seed)
    splits = {name: [kept[j] for j in idx] for name, idx in split_idx.items()}
    examples = {i: (images[i], ids[i], labels[i]) for i in kept}
    _write_records(out, f".import-staging-{seed}", sizes, splits, examples, records_per_file, progress)
    report.counts = {
        split: {classes[c]: sum(1 for i in members if labels[i] == c) for c in range(len(classes))}
        for split, members in splits.items()
    }
    _write_reports(out, src, report, [(ids[i], labels[i]) for i in splits["test"]])
    return report


def _read_squares(src: Path, files: list[Path], size: int, fit: str, report: ImportReport,
                  progress: bool) -> dict[int, Image.Image]:
    """Open every file as an RGB square of the largest size; unreadable files go to the report."""
    images: dict[int, Image.Image] = {}
    for i, path in enumerate(files):
        try:
            images[i] = fit_square(load_rgb(path), size, fit)  # keep only the largest square
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
            report.skipped.append({"path": str(path.relative_to(src)), "reason": reason})
            if progress:
                print(f"  skipped {path.relative_to(src)}: {reason}", flush=True)
        if progress and ((i + 1) % 500 == 0 or i + 1 == len(files)):
            print(f"  read {i + 1}/{len(files)} files", flush=True)
    return images


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
    args = parser.parse_args(argv)
    try:
        sizes = _parse_sizes(args.sizes)
        check_import_options(sizes, args.val, args.test, args.records_per_file, args.fit, CLI_NAMES)
        report = import_folders(
            args.src, args.out, sizes, args.val, args.test, args.seed, args.fit, args.records_per_file, args.overwrite
        )
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, per_class in report.counts.items():
        print(f"{split:5s} {sum(per_class.values()):6d}  " + ", ".join(f"{k}={v}" for k, v in per_class.items()))
    print(f"skipped {len(report.skipped)} file(s) (listed in {Path(args.out) / 'import_report.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

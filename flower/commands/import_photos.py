"""`flower import`: import folders of photos, one per class, into the competition layout (see
training/data/importer/)."""

from __future__ import annotations

import argparse
from pathlib import Path

import training.data.importer
from core.contract import IMPORT_REPORT_FILE
from core.errors import ConfigError
from core.members import FIT_MODES
from core.photos import DEFAULT_MAX_PIXELS
from flower.commands import command
from training.data.importer.folders import import_folders
from training.data.importer.options import CLI_NAMES, check_import_options
from training.data.importer.report import ImportReport
from training.data.near_duplicates import DEFAULT_DISTANCE, MAX_DISTANCE, parse_distance


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower import`."""
    parser = argparse.ArgumentParser(prog=prog, description=training.data.importer.__doc__,
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the data set in OUT as a whole (every size folder, classes.json, "
                             "test_answers.csv, import_report.json; other files are kept); without it an import into "
                             "a folder that holds a data set is refused")
    parser.add_argument("--near-duplicate-distance", default=str(DEFAULT_DISTANCE), metavar="N",
                        help="photos whose 64-bit perceptual hashes differ in at most N bits are near duplicates and "
                             f"go to the same split, like files with the same bytes; 0..{MAX_DISTANCE}, or 'off' / -1 "
                             f"to group exact copies only (default {DEFAULT_DISTANCE})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip (and list in the report) images whose header declares more than N pixels, width "
                             "x height, without decoding them: a small file can unpack to gigabytes (a "
                             f"decompression bomb) (default {DEFAULT_MAX_PIXELS}, a 40-megapixel photo)")
    return parser


def parse_sizes(text: str) -> list[int]:
    """The --sizes option: comma-separated whole numbers (ConfigError otherwise)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise ConfigError(f"--sizes must be comma-separated whole numbers, got {text!r}")
    return sizes


@command
def main(argv: list[str] | None = None, prog: str = "flower import") -> int:
    """Run `flower import`; returns the exit status."""
    args = parser(prog).parse_args(argv)
    sizes = parse_sizes(args.sizes)
    distance = parse_distance(args.near_duplicate_distance)
    check_import_options(sizes, args.val, args.test, args.records_per_file, args.fit, CLI_NAMES, distance,
                         args.max_pixels)
    report = import_folders(args.src, args.out, sizes, args.val, args.test, args.seed, args.fit,
                            args.records_per_file, args.overwrite, near_duplicate_distance=distance,
                            max_pixels=args.max_pixels)
    print(summary(report, Path(args.out) / IMPORT_REPORT_FILE))
    return 0


def summary(report: ImportReport, report_file: Path) -> str:
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

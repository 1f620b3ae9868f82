"""`flower overlap`: which photos of one set reappear in another, a leak check (see
training/data/near_duplicates.py). Exit status 0: no pair; 1: pairs found; 2: bad arguments."""

from __future__ import annotations

import argparse
import json

import training.data.near_duplicates as near
from core.errors import DataError
from core.files import check_output_file, write_text_atomic
from core.photos import DEFAULT_MAX_PIXELS, check_max_pixels
from flower.commands import command
from training.data.near_duplicates import DEFAULT_DISTANCE, MAX_DISTANCE

PAIRS_FOUND = 1  # documented: the sets overlap
DEFAULT_LISTED = 1000  # matches listed; the counts cover all of them


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower overlap`."""
    parser = argparse.ArgumentParser(prog=prog, description=near.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a folder of photos, or DATA_DIR:train|val|test (a split written by flower import)")
    parser.add_argument("b", help="the other side (another set): a folder of photos, or DATA_DIR:train|val|test")
    parser.add_argument("--near-duplicate-distance", default=str(DEFAULT_DISTANCE), metavar="N",
                        help=f"largest Hamming distance (of 64 hash bits) that counts as a near duplicate, 0.."
                             f"{MAX_DISTANCE}, or 'off' / -1 for exact copies only (default {DEFAULT_DISTANCE})")
    parser.add_argument("--json", metavar="OUT", help="also write every pair and the counts to this JSON file (its "
                                                      "folder must exist; checked before the photos are read)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="skip (count as unreadable) images whose header declares more than N pixels (width x "
                             "height), before decoding them: decompression bombs (default "
                             f"{DEFAULT_MAX_PIXELS})")
    parser.add_argument("--max-listed", type=int, default=DEFAULT_LISTED, metavar="N",
                        help="list at most N matches (pairs of groups of identical photos, closest first) on stdout "
                             f"and in --json; the counts cover them all (default {DEFAULT_LISTED})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr while reading")
    return parser


@command
def main(argv: list[str] | None = None, prog: str = "flower overlap") -> int:
    """Run `flower overlap`; returns 0 (no pair), 1 (pairs found) or 2 (bad arguments)."""
    args = parser(prog).parse_args(argv)
    max_distance = near.parse_distance(args.near_duplicate_distance)
    max_pixels = check_max_pixels(args.max_pixels, "--max-pixels")
    if near.same_set(args.a, args.b):
        raise DataError(f"A and B are the same set ({args.a} and {args.b}): every photo would match itself; "
                        "compare two different sets")
    if args.max_listed < 0:
        raise DataError(f"--max-listed must be 0 or more, got {args.max_listed}")
    if args.json:
        check_output_file(args.json, "--json")
    a = near.read_photos(args.a, args.b, progress=not args.quiet, max_pixels=max_pixels)
    b = near.read_photos(args.b, args.a, progress=not args.quiet, max_pixels=max_pixels)
    overlap = near.cross_groups(a, b, max_distance)
    report = near.overlap_report(overlap, max_distance, args.max_listed)
    for match in report["pairs"]:
        print(f"{match['kind']:5s}  distance {match['distance']:2d}  {_shown(match['a'], match['a_files'])}  "
              f"{_shown(match['b'], match['b_files'])}")
    print(summary(report))
    if args.json:
        try:
            write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
        except OSError as err:
            raise DataError(f"cannot write --json {args.json}: {err}") from err
    return PAIRS_FOUND if report["counts"]["pairs"] else 0


def _shown(name: str, files: int) -> str:
    """A photo of a match, with the number of identical files it stands for."""
    return name if files == 1 else f"{name} (and {files - 1} identical)"


def summary(report: dict) -> str:
    """The closing lines of `flower overlap`."""
    a, b, counts = report["a"], report["b"], report["counts"]
    threshold = report["near_duplicate_distance"]
    rule = "same bytes only" if threshold is None else f"same bytes, or Hamming distance <= {threshold} of 64 bits"
    lines = [f"{letter}: {side['images']} image(s) in {side['spec']}"
             + (f", {len(side['skipped'])} unreadable file(s) skipped" if side["skipped"] else "")
             + (f", {len(side['not_photos'])} file(s) not named like photos left out" if side["not_photos"] else "")
             + (f", {len(side['exact_only'])} too flat or smooth for the perceptual hash (matched by their bytes "
                "only)" if side["exact_only"] else "")
             for letter, side in (("A", a), ("B", b))]
    if counts["files_in_both"]:
        lines.append(f"{counts['files_in_both']} file(s) are in both A and B (one folder holds the other): "
                     "not paired with themselves")
    if counts["pairs"]:
        unlisted = counts["group_pairs"] - len(report["pairs"])
        if unlisted:
            lines.append(f"{unlisted} more match(es) not listed (--max-listed {len(report['pairs'])})")
        lines.append(f"OVERLAP: {counts['pairs']} cross pair(s) ({counts['exact']} exact, {counts['near']} near; "
                     f"{counts['photos_of_a']} photo(s) of A, {counts['photos_of_b']} of B; "
                     f"{counts['group_pairs']} match(es) of groups of identical photos), {rule}")
    else:
        lines.append(f"no overlap: no photo of A matches a photo of B ({rule})")
    return "\n".join(lines)

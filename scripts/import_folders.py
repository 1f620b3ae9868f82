#!/usr/bin/env python3
"""Convert a folder-per-class tree of photos into the competition layout (see training/import_folders.py).

Example (the shared real photos, at 128 px):
    python scripts/import_folders.py ../shared/data/flowers5-128px data/flowers5 --sizes 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.import_folders import FIT_MODES, import_folders  # noqa: E402
from training.layout import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with one sub-folder of photos per class (JPEG/PNG/GIF/BMP/WebP, any size)")
    parser.add_argument("out", help="data folder to write (competition layout)")
    parser.add_argument("--sizes", default="192", help="comma-separated square sizes to write, e.g. 192,224")
    parser.add_argument("--val", type=float, default=0.15, help="fraction of each class for validation")
    parser.add_argument("--test", type=float, default=0.15, help="fraction of each class for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--fit", choices=FIT_MODES, default="crop", help="how a non-square photo becomes square")
    parser.add_argument("--records-per-file", type=int, default=512, help="records per .tfrec file")
    parser.add_argument("--overwrite", action="store_true", help="replace records of the same size in OUT")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        report = import_folders(
            args.src, args.out, sizes, args.val, args.test, args.seed, args.fit, args.records_per_file, args.overwrite
        )
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, per_class in report.counts.items():
        print(f"{split:5s} {sum(per_class.values()):6d}  " + ", ".join(f"{k}={v}" for k, v in per_class.items()))
    print(f"skipped {len(report.skipped)} file(s) (listed in {Path(args.out) / 'import_report.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The demo job: make the synthetic demo data set in the competition layout and show it.

    python scripts/demo.py [--out demo]     # about 30 s on 2 CPU cores

Writes <out>/data (records at 64 and 96 px, classes.json, test_answers.csv) and
<out>/augment.png (augmented training samples), and prints what is in the data set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.demo_data import make_demo_data  # noqa: E402
from training.layout import SPLITS, available_sizes, count_records, load_classes, split_files  # noqa: E402
from training.show_augment import main as show_augment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for the demo data and outputs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()
    print(f"[1/2] making the demo data set in {out / 'data'}")
    make_demo_data(out / "data", sizes=(64, 96))
    data = str(out / "data")
    print(f"      classes: {', '.join(load_classes(data))}")
    for size in available_sizes(data):
        counts = {s: count_records(split_files(data, size, s)) for s in SPLITS}
        print(f"      {size}x{size}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    print(f"[2/2] writing augmented samples to {out / 'augment.png'}")
    show_augment(["--data", data, "--size", "96", "--out", str(out / "augment.png"), "--set", "cutmix_prob=0.3"])
    print(f"done in {time.time() - start:.0f} s; look at {out / 'augment.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write the synthetic demo flower data set in the competition layout (see training/demo_data.py).

    python scripts/make_demo_data.py demo/data --sizes 64,96     # about 15 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.demo_data import make_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="data folder to write")
    parser.add_argument("--sizes", default="64,96", help="comma-separated square image sizes")
    parser.add_argument("--train", type=int, default=720, help="training images")
    parser.add_argument("--val", type=int, default=240, help="validation images")
    parser.add_argument("--test", type=int, default=240, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    counts = make_demo_data(args.out, sizes, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    print(f"wrote {sum(counts.values())} images x {len(sizes)} sizes to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

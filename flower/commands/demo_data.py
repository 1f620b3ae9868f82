"""`flower demo-data`: write the synthetic demo flower data set (see training/data/demo_data.py)."""

from __future__ import annotations

import argparse

import training.data.demo_data
from core.errors import ConfigError
from flower.commands import command


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower demo-data`."""
    parser = argparse.ArgumentParser(prog=prog, description=training.data.demo_data.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="data folder to write")
    parser.add_argument("--sizes", default="64,96", help="comma-separated square image sizes (default 64,96)")
    parser.add_argument("--train", type=int, default=720, help="training images (default 720)")
    parser.add_argument("--val", type=int, default=240, help="validation images (default 240)")
    parser.add_argument("--test", type=int, default=240, help="test images (default 240)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _sizes(text: str) -> list[int]:
    """The --sizes option as whole numbers >= 8 (ConfigError otherwise)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 8:
        raise ConfigError(f"--sizes must be comma-separated whole numbers >= 8, got {text!r}")
    return sizes


@command
def main(argv: list[str] | None = None, prog: str = "flower demo-data") -> int:
    """Run `flower demo-data`; returns the exit status."""
    from training.data.demo_data import make_demo_data

    args = parser(prog).parse_args(argv)
    sizes = _sizes(args.sizes)
    for split in ("train", "val", "test"):
        if getattr(args, split) < 1:
            raise ConfigError(f"--{split} must be at least 1 (training needs train, val and test images), "
                              f"got {getattr(args, split)}")
    counts = make_demo_data(args.out, sizes, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    print(f"wrote {sum(counts.values())} images x {len(sizes)} sizes to {args.out}: {counts}")
    return 0

"""`flower augment-grid`: a PNG grid of augmented training samples (see training/data/augment_grid.py)."""

from __future__ import annotations

import argparse

import training.data.augment_grid
from core.errors import ConfigError
from flower.commands import command
from imaging.augment_config import AugmentConfig
from training.config_values import parse_assignments


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower augment-grid`."""
    parser = argparse.ArgumentParser(prog=prog, description=training.data.augment_grid.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder in the competition layout (local or gs://)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"],
                        help="split to sample (default train)")
    parser.add_argument("--size", type=int, required=True, help="model image size to augment to")
    parser.add_argument("--rows", type=int, default=4, help="how many source images (rows; default 4)")
    parser.add_argument("--copies", type=int, default=5, help="augmented copies per image (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="augment.png", help="PNG file to write (default augment.png)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override an augmentation option, e.g. --set rotation=30 --set cutmix_prob=0.5 "
        "(options: " + ", ".join(AugmentConfig.__dataclass_fields__) + ")",
    )
    return parser


@command
def main(argv: list[str] | None = None, prog: str = "flower augment-grid") -> int:
    """Run `flower augment-grid`; returns the exit status."""
    from training.data.augment_grid import augmented_grid, mixed_batches, write_grid_png

    args = parser(prog).parse_args(argv)
    for flag, value in (("--size", args.size), ("--rows", args.rows), ("--copies", args.copies)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    config = AugmentConfig.from_dict(parse_assignments(args.set))
    originals, copies, titles = augmented_grid(args.data, args.split, args.size, args.rows, args.copies, config,
                                               args.seed)
    mixed = mixed_labels = classes = None
    if config.mixes_batches and args.split != "test":
        from training.data.layout import load_classes

        classes = load_classes(args.data)
        mixed, mixed_labels = mixed_batches(args.data, args.size, args.copies + 1, config, args.seed)
    out = write_grid_png(args.out, originals, copies, titles, mixed, mixed_labels, classes)
    print(f"wrote {out}")
    return 0

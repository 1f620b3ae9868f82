#!/usr/bin/env python3
"""Train one member in a Kaggle TPU notebook (or VM) against the competition's GCS data.

In a Kaggle notebook with the TPU accelerator and the "tpu-getting-started" competition data:

    !git clone <this repository> flower-ensemble && pip install -q -e flower-ensemble   # no extra: keeps TF
    !python flower-ensemble/scripts/kaggle_tpu.py --config flower-ensemble/training/configs/effnet_b7_ns_512.toml

The run directory lands in /kaggle/working/runs/<name> (the notebook's output), ready to be blended
with `flower blend` anywhere. Pretrained weights download when the notebook has internet; else
attach a dataset with the weights file and add --set model.weights=/kaggle/input/<dataset>/<file>.h5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flower.commands.train import main as train_main
from training.config_values import parse_assignments

COMPETITION = "tpu-getting-started"
OUTPUT = Path("/kaggle/working/runs")


def competition_data_path(competition: str) -> str:
    """The competition's GCS path as Kaggle exposes it, or the local input folder as a fallback."""
    try:
        from kaggle_datasets import KaggleDatasets  # only inside Kaggle notebooks

        return KaggleDatasets().get_gcs_path(competition)
    except ImportError:
        local = Path("/kaggle/input") / competition
        if local.is_dir():
            return str(local)
        raise SystemExit(f"error: not in a Kaggle notebook and {local} does not exist; pass --data") from None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (TOML)")
    parser.add_argument("--data", help="data folder or gs:// path (default: the competition's GCS path)")
    parser.add_argument("--competition", default=COMPETITION, help="Kaggle competition slug")
    parser.add_argument("--out", default=str(OUTPUT), help="parent folder of the run directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    data = args.data or competition_data_path(args.competition)
    overrides = parse_assignments(args.set)
    name = overrides.get("name")
    if name is None:
        from training.config import load_config

        name = load_config(args.config).name
    forwarded = ["--config", args.config, "--set", f"data.dir={data}", "--set", f"output={Path(args.out) / name}"]
    for item in args.set:
        forwarded += ["--set", item]
    print(f"data: {data}\nrun directory: {Path(args.out) / name}")
    return train_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())

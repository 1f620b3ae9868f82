"""`flower train`: train one ensemble member from a TOML config plus overrides, and write its run directory.

    flower train --config training/configs/demo_cnn_64.toml [--set train.epochs=3 ...]

The run directory (ARCHITECTURE.md) gets member.json, classes.json, saved_model/ (signatures
serving_default: image_bytes -> probabilities, serving_pixels: images -> probabilities),
predictions/{val,test}.npz, history.csv, curves.png, schedule.png and checkpoints/. Running the same
command again after an interruption resumes from the last finished epoch. SIGTERM stops it as Ctrl-C does
(status 143, Ctrl-C 130). With several workers (TF_CONFIG), each waits for the others at most
train.cluster_timeout_seconds; a worker lost midway stops the others with one line naming it and the command
that resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from flower.commands import command, error, stop_on_sigterm
from training.config import describe_options, load_config, refit_config
from training.config_values import parse_assignments
from training.fit.cluster import WorkerLost


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower train`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=describe_options(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (defaults apply where it is silent)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option, e.g. --set train.epochs=2 --set data.dir=gs://bucket/data")
    parser.add_argument("--refit-of", metavar="RUN",
                        help="refit a finished run on train+val for its best epoch count, into RUN-refit (its "
                             "validation predictions stand for the refit in a blend); --set applies on top")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


@command
def main(argv: list[str] | None = None, prog: str = "flower train") -> int:
    """Run `flower train`; returns the exit status."""
    options = parser(prog)
    args = options.parse_args(argv)
    if args.refit_of and args.config:
        options.error("--refit-of takes the run's own config; give --set overrides, not --config")
    overrides = parse_assignments(args.set)
    config = refit_config(args.refit_of, overrides) if args.refit_of else load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    from training.fit.loop import train_member  # TensorFlow is imported only when training

    stop_on_sigterm()
    try:
        train_member(config)
    except WorkerLost as err:
        again = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
        return error(f"{err}; to resume, start every worker again (each with its TF_CONFIG) with: {again}")
    return 0

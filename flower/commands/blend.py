"""`flower blend`: blend run directories, cross-validate, write the Kaggle submission (see ensemble/inputs.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import ensemble.inputs
from core.errors import ConfigError
from ensemble.spec import METHODS
from flower.commands import command


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower blend`."""
    parser = argparse.ArgumentParser(prog=prog, description=ensemble.inputs.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or glob patterns (quoted globs are expanded here)")
    parser.add_argument("--out", required=True, help="ensemble directory to write")
    parser.add_argument("--method", default="auto", choices=[*METHODS, "auto"], help="blending method (default auto)")
    parser.add_argument("--folds", type=int, default=5, help="K of the stratified K-fold CV (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    parser.add_argument("--power", action="store_true", help="weighted: also fit a power (temperature) per member")
    parser.add_argument("--stack-features", choices=["log", "probs"], default="log",
                        help="stack: regress on log-probabilities (default) or probabilities")
    parser.add_argument("--expect-ids", metavar="CSV",
                        help="a CSV with an 'id' column (e.g. the competition's sample_submission.csv): the "
                             "submission must hold exactly these ids (default: the ids the members agree on)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


@command
def main(argv: list[str] | None = None, prog: str = "flower blend") -> int:
    """Run `flower blend`; returns the exit status."""
    from ensemble.build import build_ensemble
    from ensemble.inputs import expand_runs, read_ids
    from ensemble.output import check_out_dir

    args = parser(prog).parse_args(argv)
    if args.folds < 2 or args.seed < 0:
        raise ConfigError(f"--folds must be at least 2 (got {args.folds}) and --seed at least 0 (got {args.seed})")
    options = {"weighted": {"power": args.power}, "stack": {"features": args.stack_features, "seed": args.seed}}
    out = check_out_dir(args.out)  # before anything is loaded
    if args.expect_ids is not None and not args.expect_ids.strip():
        raise ConfigError("--expect-ids is empty: name a CSV with an 'id' column, or leave the option out")
    expected = read_ids(Path(args.expect_ids)) if args.expect_ids else None
    build_ensemble(expand_runs(args.runs), out, args.method, args.folds, args.seed, options,
                   progress=(lambda _: None) if args.quiet else print, expected_test_ids=expected)
    return 0

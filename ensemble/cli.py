"""Blend members' predictions and write the Kaggle submission.

    flower blend runs/* --out ens/demo [--method auto] [--folds 5] [--seed 0]

Reads each run directory's classes.json and predictions/{val,test}.npz, checks and aligns them by
id, scores every member and the blend by stratified K-fold CV on the validation rows, fits the
chosen method on all validation rows, and writes into --out:
  ensemble.json   members (relative paths), method, weights or stacker parameters, classes, CV scores
  submission.csv  id,label for every test id (checked before writing)
  report.md       members vs blend, per-class F1 of the blend's worst classes; weights.png, scores.png

Methods: mean (plain average), weighted (non-negative weights fitted on log loss; --power adds a
temperature per member), hill-climb (greedy selection with replacement on macro F1), stack
(multinomial logistic regression on log-probabilities), auto (the best CV macro F1 of the four).
Needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

import numpy as np

from ensemble.build import build_ensemble
from ensemble.members import MemberError
from ensemble.output import check_out_dir
from ensemble.spec import METHODS, SpecError


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories from paths or glob patterns, in the given order, without repeats."""
    runs: list[Path] = []
    for pattern in patterns:
        if not pattern.strip():
            raise MemberError("a run directory argument is empty")
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matches:
            raise MemberError(f"no run directory matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path not in runs:
                runs.append(path)
    return runs


def read_ids(path: Path) -> np.ndarray:
    """The `id` column of a CSV file (a sample submission or an answers file); a byte order mark is ignored."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read ids from {path}: {getattr(err, 'strerror', None) or err}") from None
    if not rows or "id" not in rows[0]:
        raise ValueError(f"{path} has no 'id' column (or no rows)")
    ids = np.array([row["id"] or "" for row in rows], dtype=str)
    if (ids == "").any():
        raise ValueError(f"{path}: {int((ids == '').sum())} rows have an empty id (the first is data row "
                         f"{int(np.flatnonzero(ids == '')[0]) + 1})")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path} has duplicate ids, e.g. {unique[counts > 1][:3].tolist()}")
    return ids


def main(argv: list[str] | None = None, prog: str = "python -m ensemble") -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
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
    args = parser.parse_args(argv)
    if args.folds < 2 or args.seed < 0:
        print(f"error: --folds must be at least 2 (got {args.folds}) and --seed at least 0 (got {args.seed})",
              file=sys.stderr)
        return 2
    options = {"weighted": {"power": args.power}, "stack": {"features": args.stack_features, "seed": args.seed}}
    try:
        out = check_out_dir(args.out)  # before anything is loaded
        if args.expect_ids is not None and not args.expect_ids.strip():
            raise ValueError("--expect-ids is empty: name a CSV with an 'id' column, or leave the option out")
        expected = read_ids(Path(args.expect_ids)) if args.expect_ids else None
        build_ensemble(expand_runs(args.runs), out, args.method, args.folds, args.seed, options,
                       progress=(lambda _: None) if args.quiet else print, expected_test_ids=expected)
    except (MemberError, SpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # anything not named closer to where it happened
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; --out {args.out} was not left half-written", file=sys.stderr)
        return 130
    return 0


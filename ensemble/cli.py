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
import glob
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensemble.blend import METHODS, Blender
from ensemble.members import MemberError, load_members
from ensemble.output import plot_scores, plot_weights, write_ensemble_json, write_report, write_submission
from ensemble.validation import choose_method, cross_validate, member_scores


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories from paths or glob patterns, in the given order, without repeats."""
    runs: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matches:
            raise MemberError(f"no run directory matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path not in runs:
                runs.append(path)
    return runs


def build_ensemble(
    runs: list[Path], out_dir: Path, method: str = "auto", folds: int = 5, seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None, progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load, cross-validate, fit and write the ensemble directory; return the ensemble.json content."""
    if method not in (*METHODS, "auto"):
        raise ValueError(f"unknown method {method!r}; expected one of {(*METHODS, 'auto')}")
    options = options or {}
    start = time.perf_counter()
    aligned = load_members(runs)
    progress(f"loaded {len(aligned.members)} members: {len(aligned.val_ids)} validation rows, "
             f"{len(aligned.test_ids)} test rows, {len(aligned.classes)} classes")
    labels, val_probs = aligned.val_labels, aligned.val_probs
    members_cv = member_scores(val_probs, labels, aligned.names, folds, seed)
    method_cv = None
    if method == "auto":
        method, results = choose_method(val_probs, labels, options, folds, seed, progress)
        method_cv = {m: r["scores"] for m, r in results.items()}
        chosen = results[method]
        progress(f"auto chose {method!r}")
    else:
        chosen = cross_validate(val_probs, labels, method, options.get(method), folds, seed, progress)
    blender = Blender(method, **options.get(method, {})).fit(val_probs, labels)
    test_blend = blender.predict_proba(aligned.test_probs)

    out_dir.mkdir(parents=True, exist_ok=True)
    cv = {"folds": chosen["folds"], "seed": seed, "blend": chosen["scores"], "members": members_cv}
    if method_cv:
        cv["methods"] = method_cv
    path = write_ensemble_json(out_dir, aligned, blender.spec_, cv, {"seconds": time.perf_counter() - start})
    write_submission(out_dir / "submission.csv", aligned.test_ids, test_blend)
    plot_weights(out_dir / "weights.png", aligned.names, blender.spec_["weights"], method)
    plot_scores(out_dir / "scores.png", members_cv, chosen["scores"])
    write_report(out_dir, aligned, method, chosen["scores"], members_cv, chosen["out_of_fold"], method_cv)
    best = max(members_cv.values(), key=lambda s: s["macro_f1"])["macro_f1"]
    progress(f"blend ({method}) CV macro F1 {chosen['scores']['macro_f1']:.4f} (best member {best:.4f}); "
             f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return json.loads(path.read_text())


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
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    options = {"weighted": {"power": args.power}, "stack": {"features": args.stack_features, "seed": args.seed}}
    try:
        build_ensemble(expand_runs(args.runs), Path(args.out), args.method, args.folds, args.seed, options,
                       progress=(lambda _: None) if args.quiet else print)
    except (MemberError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


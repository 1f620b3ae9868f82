#!/usr/bin/env python3
"""Benchmark: fit and cross-validate every blending method at competition scale.

    python scripts/bench_ensemble.py [--members 8] [--rows 3712] [--classes 104] [--test 7382] [--folds 5]
                                     [--busy N] [--auto-only]

Synthetic but realistic member probabilities (shared + own noise, skills spread over members).
For each method: 5-fold CV (fit on 4 folds, score the held-out one) + the final fit on all rows +
applying it to the test rows. Then the whole `auto` run of `flower blend` (load, CV of every
method, fit, submission, report, plots) on run directories written to a temporary folder.
CPU (s) is this process's CPU time (all its threads): on a busy machine the wall time is about the
CPU time divided by the share of a core the process gets.
Goals (issue: ensemble): weighted and hill-climb under 10 s each, the whole auto run under 60 s,
also while the machine is busy (issue 25: while the test suite runs): `--busy 2` keeps two CPU-bound
Python processes running beside the benchmark (as the suite's two pytest-xdist workers on 2 cores do).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import numpy as np  # noqa: E402

from ensemble.blend import METHODS, Blender  # noqa: E402
from ensemble.build import build_ensemble  # noqa: E402
from ensemble.validation import cross_validate, member_scores  # noqa: E402
from testkit.synthetic import synthetic_probs, write_run_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rows", type=int, default=3712)
    parser.add_argument("--classes", type=int, default=104)
    parser.add_argument("--test", type=int, default=7382)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="keep N CPU-bound processes running beside the benchmark (default 0)")
    parser.add_argument("--auto-only", action="store_true", help="time only the whole auto run, not each method")
    args = parser.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return _run(args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _run(args: argparse.Namespace) -> int:
    """Generate the data, time every method (unless --auto-only) and the whole auto run."""
    rng = np.random.default_rng(0)
    skills = list(np.linspace(2.5, 4.5, args.members))
    labels = np.arange(args.rows) % args.classes
    val = synthetic_probs(labels, skills, args.classes, rng)
    test = synthetic_probs(rng.integers(0, args.classes, args.test), skills, args.classes, rng)
    print(f"{args.members} members x {args.rows} rows x {args.classes} classes, {args.test} test rows; "
          f"{args.busy} CPU-bound process(es) beside it, load average {os.getloadavg()[0]:.1f}")
    members = member_scores(val, labels, [f"m{m}" for m in range(args.members)], args.folds, 0)
    print(f"best member's CV macro F1: {max(s['macro_f1'] for s in members.values()):.4f}")
    print("\n| method | CV + fit + apply (s) | CPU (s) | CV macro F1 |\n|---|---|---|---|")
    for method in () if args.auto_only else METHODS:
        start, cpu = time.perf_counter(), time.process_time()
        cv = cross_validate(val, labels, method, folds=args.folds)
        Blender(method).fit(val, labels).predict_proba(test)
        print(f"| {method} | {time.perf_counter() - start:.2f} | {time.process_time() - cpu:.2f} | "
              f"{cv['scores']['macro_f1']:.4f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"class {i}" for i in range(args.classes)]
        val_ids = np.array([f"{i:09x}" for i in range(args.rows)])
        test_ids = np.array([f"{i + 10**6:09x}" for i in range(args.test)])
        runs = [write_run_dir(Path(tmp) / f"m{m}", f"m{m}", names, val_ids, labels, val[m], test_ids, test[m])
                for m in range(args.members)]
        start, cpu = time.perf_counter(), time.process_time()
        document = build_ensemble(runs, Path(tmp) / "ens", "auto", folds=args.folds, progress=lambda _: None)
        print(f"| whole auto run (flower blend) | {time.perf_counter() - start:.2f} | "
              f"{time.process_time() - cpu:.2f} | "
              f"{document['cv']['blend']['macro_f1']:.4f} ({document['method']}) |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

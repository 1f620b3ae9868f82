#!/usr/bin/env python3
"""Benchmark: each member's pixel model on TensorFlow, LiteRT and ONNX Runtime, and the ensemble on each.

    python scripts/bench_runtimes.py [--ensemble ENS] [--members efficientnet-lite0:128,...] [--rounds 5]
                                     [--seconds 2] [--threads]

Without --ensemble, three runs with random weights (they do not change speed) and the 104 classes,
EfficientNet-Lite0/1/2 at 128 px (the issue's ensemble), blended with equal weights. Members without converted files
are converted first (into a copy when --ensemble is given: the original run directories are not written), and the
conversion's seconds are reported. Then, per round (the order of the runtimes turning round by round):
  members    each member's pixel model (`MemberModel.pixels`, squares given) at batch 1 and 32 on every runtime;
             speed-up = median of the rounds' ratios to TensorFlow
  ensemble   `EnsemblePredictor.predict` on decoded 128 px photos at batch 1, 8 and 32 on every runtime, members at
             once (one thread each, the default) and, with --threads, one after another: wall time and the process's
             CPU time per image (CPU: the median over batches of the rounds' ratios to TensorFlow)
  chunks     each member on LiteRT at batches of 1, 8 and 32 run whole: CPU time per image (LiteRTPixels.CHUNK); and
             batches of 1 and 8 in turn on one interpreter resized every call, against two that never resize
Every runtime's answers are compared with TensorFlow's on the same inputs first (the largest difference is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import numpy as np  # noqa: E402
from bench_members import make_benchmark_ensemble, parse_members  # noqa: E402 (scripts/, beside this one)

from testkit.artifacts import photo  # noqa: E402

RUNTIMES = ("tensorflow", "litert", "onnx")
DEFAULT_MEMBERS = "efficientnet-lite0:128,efficientnet-lite1:128,efficientnet-lite2:128"


def median_seconds(call, seconds: float) -> float:
    """Median wall seconds of `call()`, called for at least `seconds` (3 calls at least) after one warm-up."""
    return timed(call, seconds)[0]


def timed(call, seconds: float) -> tuple[float, float]:
    """Median wall seconds of `call()` and the process's CPU seconds per call, calls for at least `seconds` (3 at
    least) after one warm-up. CPU time is what a saturated machine's throughput divides: it moves less than wall
    time when other jobs share the cores."""
    call()
    walls: list[float] = []
    stop = time.perf_counter() + seconds
    cpu = time.process_time()
    while len(walls) < 3 or time.perf_counter() < stop:
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), (time.process_time() - cpu) / len(walls)


def chunk_table(ens: Path, seconds: float) -> list[str]:
    """Each member on LiteRT, CPU milliseconds per image: batches of 1, 8 and 32 run whole on one interpreter (what
    LiteRTPixels.CHUNK was chosen by), and batches of 1 and 8 in turn on one interpreter resized at every call
    against two interpreters that never resize."""
    from ai_edge_litert.interpreter import Interpreter

    from core.members import read_ensemble
    from core.runtimes import converted_path
    from service.runtimes import cpu_threads

    ensemble = read_ensemble(ens)
    rows = ["| LiteRT | batch 1: CPU ms/image | batch 8 | batch 32 | 1 and 8 in turn, resized | the same, two "
            "interpreters |", "|---|---|---|---|---|---|"]
    for entry in ensemble.members:
        run = entry.run_dir(ensemble.path)
        size = json.loads((run / "member.json").read_text())["image_size"]
        squares = np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype(np.float32)
        one, eight = (Interpreter(model_path=str(converted_path(run, "litert")), num_threads=cpu_threads())
                      .get_signature_runner("serving_pixels") for _ in range(2))
        cells = [timed(lambda b=batch, r=one, s=squares: r(images=s[:b]), seconds)[1] / batch for batch in (1, 8, 32)]
        cells.append(timed(lambda r=one, s=squares: (r(images=s[:1]), r(images=s[:8])), seconds)[1] / 9)
        cells.append(timed(lambda r=one, e=eight, s=squares: (r(images=s[:1]), e(images=s[:8])), seconds)[1] / 9)
        rows.append(f"| {entry.name} | " + " | ".join(f"{1000 * cell:.2f}" for cell in cells) + " |")
    return rows


def converted_ensemble(ens: Path | None, specs: list[tuple[str, int]], root: Path) -> tuple[Path, list[str]]:
    """An ensemble whose members all have both converted files, and lines saying how long each conversion took."""
    from core.members import read_ensemble
    from core.runtimes import CONVERTED, checked_file
    from training.fit.runtimes import convert_run

    if ens is None:
        ens = make_benchmark_ensemble(root, specs)
    else:  # a copy: the benchmark writes no file into the user's run directories
        ensemble = read_ensemble(ens)
        for entry in ensemble.members:
            shutil.copytree(entry.run_dir(ensemble.path), root / "runs" / entry.name,
                            ignore=shutil.ignore_patterns("checkpoints"))
        shutil.copytree(ensemble.path.parent, root / "ens")
        ens = root / "ens"
        rewritten = ensemble.document | {"members": [{**member, "path": f"../runs/{member['name']}"}
                                                     for member in ensemble.document["members"]]}
        (ens / "ensemble.json").write_text(json.dumps(rewritten))
    lines = []
    for run in sorted((ens.parent / "runs").iterdir()):
        for runtime in CONVERTED:
            try:
                checked_file(run, runtime)
            except ValueError:
                start = time.perf_counter()
                convert_run(run, runtime, log=lambda _: None)
                lines.append(f"converted {run.name} to {runtime} in {time.perf_counter() - start:.1f} s")
    return ens, lines


def member_table(ens: Path, rounds: int, seconds: float) -> list[str]:
    """Each member's pixel model at batch 1 and 32 on every runtime."""
    from core.members import read_ensemble
    from service.predictor import load_member_model

    ensemble = read_ensemble(ens)
    rows = ["| member | batch | " + " | ".join(f"{r} ms" for r in RUNTIMES) + " | litert speed-up | onnx speed-up "
            "| max difference litert / onnx |", "|---|---|---|---|---|---|---|---|"]
    for entry in ensemble.members:
        members = {runtime: load_member_model(entry.run_dir(ensemble.path), runtime)[0] for runtime in RUNTIMES}
        size = members["tensorflow"].image_size
        for batch in (1, 32):
            squares = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            reference = members["tensorflow"].pixels(squares)
            differences = [float(np.abs(members[r].pixels(squares) - reference).max()) for r in RUNTIMES[1:]]
            times: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
            for round_ in range(rounds):
                order = RUNTIMES[round_ % 3:] + RUNTIMES[:round_ % 3]
                for runtime in order:
                    times[runtime].append(median_seconds(lambda m=members[runtime], s=squares: m.pixels(s), seconds))
            speedups = [statistics.median(t / r for t, r in zip(times["tensorflow"], times[runtime], strict=True))
                        for runtime in RUNTIMES[1:]]
            rows.append(f"| {entry.name} | {batch} | " + " | ".join(f"{1000 * statistics.median(times[r]):.1f}"
                                                                     for r in RUNTIMES)
                        + f" | **{speedups[0]:.2f}x** | {speedups[1]:.2f}x | {differences[0]:.1e} / "
                          f"{differences[1]:.1e} |")
    return rows


def ensemble_table(ens: Path, rounds: int, seconds: float, threads: bool) -> list[str]:
    """The ensemble's predict at batch 1 and 32 on every runtime (members at once, and one after another)."""
    from service.predictor import load_ensemble

    photos = [np.asarray(photo(128, 128, seed)) for seed in range(32)]
    predictors = {runtime: load_ensemble(ens, runtime=runtime) for runtime in RUNTIMES}
    modes = (True, False) if threads else (True,)
    batches = (1, 8, 32)
    rows = ["| runtime | members | " + " | ".join(f"batch {b}: ms, CPU ms/image" for b in batches)
            + " | vs TensorFlow, wall at " + " / ".join(map(str, batches)) + " | CPU | max difference |",
            "|---|---|" + "---|" * (len(batches) + 3)]
    reference = predictors["tensorflow"].predict(photos)[0]
    for concurrent in modes:
        times: dict[tuple[str, int], list[tuple[float, float]]] = {(r, b): [] for r in RUNTIMES for b in batches}
        for round_ in range(rounds):
            for runtime in RUNTIMES[round_ % 3:] + RUNTIMES[:round_ % 3]:
                predictor = predictors[runtime]
                predictor.concurrent_members = concurrent
                for batch in batches:
                    times[runtime, batch].append(timed(lambda p=predictor, b=batch: p.predict(photos[:b]), seconds))
        for runtime in RUNTIMES:
            ratios = [statistics.median(t[0] / r[0] for t, r in zip(times["tensorflow", b], times[runtime, b],
                                                                     strict=True)) for b in batches]
            cpu_ratio = statistics.median(t[1] / r[1] for b in batches
                                          for t, r in zip(times["tensorflow", b], times[runtime, b], strict=True))
            difference = float(np.abs(predictors[runtime].predict(photos)[0] - reference).max())
            cells = [f"{1000 * statistics.median(t[0] for t in times[runtime, b]):.1f}, "
                     f"{1000 * statistics.median(t[1] for t in times[runtime, b]) / b:.1f}" for b in batches]
            rows.append(f"| {runtime} | {'at once' if concurrent else 'one by one'} | " + " | ".join(cells)
                        + f" | {' / '.join(f'{r:.2f}x' for r in ratios)} | {cpu_ratio:.2f}x | {difference:.1e} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", type=Path, help="an ensemble directory (default: random-weight members)")
    parser.add_argument("--members", default=DEFAULT_MEMBERS, help="backbone:size,... without --ensemble")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="calls per measurement for at least this long")
    parser.add_argument("--threads", action="store_true", help="also the ensemble with its members one by one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ens, conversions = converted_ensemble(args.ensemble, parse_members(args.members), Path(tmp))
        print("\n".join(conversions), flush=True)
        rows = member_table(ens, args.rounds, args.seconds)
        print("\n".join(rows), flush=True)
        print("\n".join(ensemble_table(ens, args.rounds, args.seconds, args.threads)), flush=True)
        print("\n".join(chunk_table(ens, args.seconds)))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

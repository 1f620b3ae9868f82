#!/usr/bin/env python3
"""Benchmark: an ensemble's members run one after another vs. at once (a thread each) in EnsemblePredictor.predict.

    python scripts/bench_members.py [--members efficientnet-b0:224,efficientnet-lite0:192,efficientnetv2-b0:256]
                                    [--loads 1,32,1x6] [--rounds 5] [--seconds 2]

Three runs with random weights (they do not change speed) and the 104 classes, blended with equal weights
and loaded as the service loads them (`load_ensemble`, warm-up included). Each batch is decoded photo-like
images of 500 x 375 px, so every member makes its own square input as in the service. Per round, both ways
are timed back to back at every batch size, which goes first alternating by round (calls for at least
`--seconds`, the median call kept). The table gives the medians over rounds, the process CPU time per batch,
and the speed-up as the median of the rounds' ratios (each pair measured back to back, so the noise of a
shared machine mostly cancels). A load BxN is N threads calling predict on B images at once, as the server
with batching off does (figures per call: elapsed time / calls). Both ways must answer the same probabilities:
the script checks that first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import numpy as np  # noqa: E402

from testkit.artifacts import make_run, photo  # noqa: E402

DEFAULT_MEMBERS = "efficientnet-b0:224,efficientnet-lite0:192,efficientnetv2-b0:256"


def parse_members(text: str) -> list[tuple[str, int]]:
    """'backbone:size,backbone:size' -> [(backbone, size), ...]."""
    specs = []
    for item in text.split(","):
        backbone, _, size = item.strip().rpartition(":")
        specs.append((backbone, int(size)))
    return specs


def make_benchmark_ensemble(root: Path, specs: list[tuple[str, int]]) -> Path:
    """Runs `root/runs/BACKBONE-SIZE` (random weights, the 104 classes) and `root/ens/ensemble.json` blending them
    with equal weights; returns the ensemble directory."""
    from core.contract import competition_classes
    from core.members import write_ensemble

    classes = competition_classes()
    runs = [make_run(root / "runs", f"{backbone}-{size}", size, seed=i, sharpness=1.0, backbone=backbone,
                     classes=classes) for i, (backbone, size) in enumerate(specs)]
    weights = [1.0 / len(runs)] * len(runs)
    ens = root / "ens"
    ens.mkdir(parents=True, exist_ok=True)
    write_ensemble(ens, {
        "version": 1, "method": "weighted", "classes": classes,
        "members": [{"name": r.name, "path": f"../runs/{r.name}", "weight": w} for r, w in zip(runs, weights,
                                                                                               strict=True)],
        "blend": {"method": "weighted", "weights": weights},
    })
    return ens


def median_call(predictor: object, images: list[np.ndarray], seconds: float) -> tuple[float, float]:
    """Median wall and process-CPU seconds of predictor.predict(images), calls for at least `seconds` (3 at least)."""
    walls: list[float] = []
    cpus: list[float] = []
    stop = time.perf_counter() + seconds
    while len(walls) < 3 or time.perf_counter() < stop:
        start, cpu = time.perf_counter(), time.process_time()
        predictor.predict(images)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def callers_call(predictor: object, images: list[np.ndarray], callers: int, seconds: float) -> tuple[float, float]:
    """Wall and process-CPU seconds per call when `callers` threads call predictor.predict(images) back to back
    for `seconds` (as the unbatched server's thread pool does): elapsed / calls."""
    calls, lock = [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def caller() -> None:
        while time.perf_counter() < stop:
            predictor.predict(images)
            with lock:
                calls[0] += 1

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - start) / calls[0], (time.process_time() - cpu) / calls[0]


def parse_loads(text: str) -> list[tuple[int, int]]:
    """'1,32,1x6' -> [(batch, callers), ...]: '1x6' is batch 1 from 6 threads at once."""
    loads = []
    for item in text.split(","):
        batch, _, callers = item.strip().partition("x")
        loads.append((int(batch), int(callers or 1)))
    return loads


def measure(predictor: object, loads: list[tuple[int, int]], rounds: int,
            seconds: float) -> dict[tuple[str, tuple[int, int]], list[tuple[float, float]]]:
    """Every load both ways per round, back to back, which goes first alternating by round."""
    photos = [np.asarray(photo(500, 375, seed)) for seed in range(max(batch for batch, _ in loads))]
    modes = {"sequential": False, "concurrent": True}
    for batch, _ in loads:  # warm up every batch size both ways (oneDNN primitives per shape)
        for concurrent in modes.values():
            predictor.concurrent_members = concurrent
            predictor.predict(photos[:batch])
    figures: dict = {(mode, load): [] for mode in modes for load in loads}
    for round_ in range(rounds):
        for batch, callers in loads:
            for mode, concurrent in sorted(modes.items(), reverse=round_ % 2 == 1):
                predictor.concurrent_members = concurrent
                if callers == 1:
                    figures[mode, (batch, callers)].append(median_call(predictor, photos[:batch], seconds))
                else:
                    figures[mode, (batch, callers)].append(callers_call(predictor, photos[:batch], callers, seconds))
    return figures


def same_answers(predictor: object, images: list[np.ndarray]) -> bool:
    """Whether sequential and concurrent members answer exactly the same probabilities."""
    answers = []
    for concurrent in (False, True):
        predictor.concurrent_members = concurrent
        answers.append(predictor.predict(images))
    return all(np.array_equal(a, b) for a, b in zip(*answers, strict=True))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default=DEFAULT_MEMBERS, help="backbone:size,... (default: %(default)s)")
    parser.add_argument("--loads", default="1,32,1x6", help="batch sizes, comma-separated; BxN: batch B from N "
                        "threads at once (1x6: the unbatched server's 6 threads on 2 CPUs)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median of each is kept")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per figure per round")
    args = parser.parse_args(argv)
    from service.predictor import load_ensemble

    loads = parse_loads(args.loads)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_ensemble(make_benchmark_ensemble(Path(tmp), parse_members(args.members)))
        same = same_answers(predictor, [np.asarray(photo(500, 375, seed)) for seed in range(8)])
        if not same:
            print("the two ways answer different probabilities", file=sys.stderr)
            return 1
        figures = measure(predictor, loads, args.rounds, args.seconds)
    print(f"\n{args.members}, {os.cpu_count()} CPUs, {args.rounds} rounds; identical probabilities both ways: {same}")
    report(figures, loads)
    return 0


def report(figures: dict[tuple[str, tuple[int, int]], list[tuple[float, float]]], loads: list[tuple[int, int]]) -> None:
    """Print the table: medians over rounds of wall ms and CPU ms per batch, and the speed-up (the median of the
    rounds' ratios, each measured back to back)."""
    print("| batch | callers | sequential ms/batch | concurrent ms/batch | sequential img/s | concurrent img/s | "
          "concurrent speed-up | per round | CPU ms/batch seq / conc |\n|---|---|---|---|---|---|---|---|---|")
    for batch, callers in loads:
        seq, conc = ([row[0] for row in figures[mode, (batch, callers)]] for mode in ("sequential", "concurrent"))
        seq_cpu, conc_cpu = (statistics.median(row[1] for row in figures[mode, (batch, callers)])
                             for mode in ("sequential", "concurrent"))
        ratios = [s / c for s, c in zip(seq, conc, strict=True)]
        seq, conc = statistics.median(seq), statistics.median(conc)
        print(f"| {batch} | {callers} | {1000 * seq:.1f} | {1000 * conc:.1f} | {batch / seq:.1f} | "
              f"{batch / conc:.1f} | {statistics.median(ratios):.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"{1000 * seq_cpu:.0f} / {1000 * conc_cpu:.0f} |")


if __name__ == "__main__":
    sys.exit(main())

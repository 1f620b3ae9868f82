#!/usr/bin/env python3
"""Benchmark: `flower predict` in one process vs. on Apache Beam's DirectRunner with 1 and 2 worker processes.

    python scripts/bench_beam.py [--photos ../shared/data/flowers5-128px] [--counts 200,1000] [--rounds 2]
                                 [--backbone efficientnet-b0] [--size 224]

One run with random weights (they do not change speed) and the 104 classes (testkit.artifacts.make_benchmark_run)
scores the first N photos of the folder's manifest.csv, for each N of --counts, as a user runs the command: a
fresh `python -m flower predict` process each time (TensorFlow's import, the model's load and, on Beam, the
worker processes' start included). Per round every variant runs at every count, the variants' order rotating by
round; the table keeps each figure's best round (interference only slows a run down). From the two counts:
the fixed cost of a run (the line's intercept) and the cost of one more image (its slope): the per-image
overhead of Beam is the difference of the slopes, its fixed overhead that of the intercepts. Every variant's
rows are checked against the local one's (paths and top classes equal, probabilities within 1e-5).

The last part puts the 2-worker rate per core on paper for Dataflow: what 10 million photos take (workers,
hours, cost) at that rate, with the machine type and prices given as options (assumptions, printed with it),
and times the launcher's share that grows with the photos: merging --merge-rows rows from 8 shards.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository root: testkit is not installed
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = {
    "flower predict": [],
    "beam, 1 worker": ["--runner", "beam", "--beam-option", "direct_num_workers=1"],
    "beam, 2 workers": ["--runner", "beam", "--beam-option", "direct_num_workers=2"],
}


def first_photos(folder: Path, count: int) -> list[str]:
    """The first `count` photos of the folder's manifest.csv (path column), as absolute paths."""
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        paths = [str(folder / row["path"]) for row in csv.DictReader(f)]
    if len(paths) < count:
        raise SystemExit(f"{folder} lists {len(paths)} photos, fewer than {count}")
    return paths[:count]


def score(model: Path, photos: list[str], out: Path, extra: list[str]) -> float:
    """Run `flower predict` in a fresh process; its wall seconds."""
    command = [sys.executable, "-m", "flower", "predict", str(model), *photos, "--out", str(out), "--quiet",
               "--overwrite", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... {' '.join(extra)} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return seconds


def same_rows(ours: Path, theirs: Path) -> bool:
    """Paths and top classes equal, every top probability within 1e-5."""
    with open(ours, newline="") as a, open(theirs, newline="") as b:
        rows, local = list(csv.DictReader(a)), list(csv.DictReader(b))
    columns = [c for c in rows[0] if c.startswith("top") and not c.endswith("probability")]
    return len(rows) == len(local) and all(
        r["path"] == s["path"] and r["ok"] == s["ok"] == "true" and all(r[c] == s[c] for c in columns)
        and all(abs(float(r[c + "_probability"]) - float(s[c + "_probability"])) <= 1e-5 for c in columns)
        for r, s in zip(rows, local, strict=True))


def measure(model: Path, photos: list[str], counts: list[int], rounds: int, folder: Path) -> dict:
    """Best wall seconds of each (variant, count) over the rounds; exits when a variant's rows differ."""
    best: dict[tuple[str, int], float] = {}
    names = list(VARIANTS)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for count in counts:
            for name in order:
                out = folder / f"{name.replace(' ', '_').replace(',', '')}-{count}.csv"
                seconds = score(model, photos[:count], out, VARIANTS[name])
                best[name, count] = min(seconds, best.get((name, count), math.inf))
                print(f"  round {r + 1}: {name}, {count} photos: {seconds:.1f} s ({count / seconds:.1f} images/s)",
                      file=sys.stderr, flush=True)
            local = folder / f"flower_predict-{count}.csv"
            for name in names[1:]:
                if not same_rows(folder / f"{name.replace(' ', '_').replace(',', '')}-{count}.csv", local):
                    raise SystemExit(f"{name} wrote other rows than flower predict for {count} photos")
    return best


def report(best: dict, counts: list[int]) -> dict[str, tuple[float, float]]:
    """Print the table; returns each variant's (fixed seconds, seconds per image) from the line through two counts."""
    small, large = min(counts), max(counts)
    lines: dict[str, tuple[float, float]] = {}
    print("| variant | " + " | ".join(f"{n} photos: s (images/s)" for n in counts)
          + " | fixed s | ms per image | images/s once started |")
    print("|---|" + "---|" * (len(counts) + 3))
    for name in VARIANTS:
        per_image = (best[name, large] - best[name, small]) / (large - small)
        fixed = best[name, small] - small * per_image
        lines[name] = (fixed, per_image)
        cells = " | ".join(f"{best[name, n]:.1f} ({n / best[name, n]:.1f})" for n in counts)
        print(f"| {name} | {cells} | {fixed:.1f} | {1000 * per_image:.1f} | {1 / per_image:.1f} |")
    base_fixed, base_per_image = lines["flower predict"]
    for name in list(VARIANTS)[1:]:
        fixed, per_image = lines[name]
        print(f"{name}: {1000 * (per_image - base_per_image):+.1f} ms per image and {fixed - base_fixed:+.1f} s "
              f"fixed against flower predict")
    return lines


def dataflow_on_paper(per_image_2_workers: float, args: argparse.Namespace) -> None:
    """What --total photos cost on Dataflow at the 2-worker DirectRunner's rate per core here (assumptions printed)."""
    per_core = 1 / (per_image_2_workers * (os.cpu_count() or 2))  # images/s of one core, two processes on two cores
    vcpu_hours = args.total / per_core / 3600
    vm_hours = vcpu_hours / args.vcpus
    workers = math.ceil(vm_hours / args.hours)
    start_hours = workers * args.start_minutes / 60
    vm_price = args.vcpus * args.vcpu_price + args.memory_gb * args.gb_price + args.disk_gb * args.disk_price
    cost = (vm_hours + start_hours) * vm_price + args.total / 1000 * args.read_price
    print(f"\nDataflow on paper: {args.total:,} photos at {per_core:.1f} images/s per vCPU (the 2-worker rate here / "
          f"{os.cpu_count()} cores)")
    print(f"  {vcpu_hours:,.0f} vCPU-hours = {vm_hours:,.0f} worker-hours of {args.vcpus} vCPUs; {workers} workers "
          f"for about {args.hours:g} h (+{args.start_minutes:g} min each to start)")
    print(f"  ${cost:,.0f} at ${vm_price:.3f} per worker-hour ({args.vcpus} x ${args.vcpu_price}/vCPU-h + "
          f"{args.memory_gb:g} GB x ${args.gb_price}/GB-h + {args.disk_gb:g} GB disk x ${args.disk_price}/GB-h) "
          f"and ${args.read_price} per 1,000 object reads")


def time_merge(rows: int, folder: Path) -> float:
    """Seconds to merge `rows` shard rows (8 shards, keys shuffled, rows as a 5-class CSV has them) into one CSV."""
    import random

    from service.beam.shards import merge_shards, shard_line
    from service.scoring import Summary

    keys = list(range(rows))
    random.Random(0).shuffle(keys)
    row = ["/data/photos/class/1234567890_abcdef.jpg", "true", "", "daisy", "0.51234", "tulip", "0.2345678",
           "rose", "0.12345678", "sunflower", "0.0912345", "dandelion", "0.0234567"]
    for shard in range(8):
        with open(folder / f"rows-{shard}.csv", "w", encoding="utf-8") as f:
            f.writelines(shard_line((key, 0), row, None) + "\n" for key in keys[shard::8])
    start = time.perf_counter()
    merge_shards(str(folder / "rows-*.csv"), folder / "merged.csv", ["path", "ok", "error"] + [f"c{i}" for i in
                                                                                              range(10)], True,
                 Summary())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "flowers5-128px")
    parser.add_argument("--counts", default="200,1000", help="photo counts, comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each figure's best is kept")
    parser.add_argument("--backbone", default="efficientnet-b0")
    parser.add_argument("--size", type=int, default=224)
    paper = parser.add_argument_group("Dataflow on paper (assumptions: us-central1 batch list prices, n1-standard-4)")
    paper.add_argument("--total", type=int, default=10_000_000, help="photos to score")
    paper.add_argument("--vcpus", type=int, default=4)
    paper.add_argument("--memory-gb", type=float, default=15.0)
    paper.add_argument("--disk-gb", type=float, default=250.0, help="a batch worker's default persistent disk")
    paper.add_argument("--vcpu-price", type=float, default=0.056, help="$ per vCPU-hour")
    paper.add_argument("--gb-price", type=float, default=0.003557, help="$ per GB-hour of memory")
    paper.add_argument("--disk-price", type=float, default=0.000054, help="$ per GB-hour of standard disk")
    paper.add_argument("--read-price", type=float, default=0.0004, help="$ per 1,000 GCS class B operations")
    paper.add_argument("--hours", type=float, default=2.0, help="the wall time to aim at")
    paper.add_argument("--start-minutes", type=float, default=5.0, help="a worker's start (VM, image, model)")
    paper.add_argument("--merge-rows", type=int, default=500_000, help="rows of the timed merge (0: none)")
    args = parser.parse_args(argv)
    from testkit.artifacts import make_benchmark_run

    counts = sorted(int(n) for n in args.counts.split(","))
    photos = first_photos(args.photos, max(counts))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_benchmark_run(Path(tmp), args.backbone, args.size)
        best = measure(model, photos, counts, args.rounds, Path(tmp))
    print(f"\n{args.backbone} at {args.size} px, {os.cpu_count()} CPUs, {args.rounds} rounds, best round of each; "
          "every variant's rows equal flower predict's")
    lines = report(best, counts)
    dataflow_on_paper(lines["beam, 2 workers"][1], args)
    if args.merge_rows:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = time_merge(args.merge_rows, Path(tmp))
        print(f"  the launcher's merge: {args.merge_rows:,} rows in {seconds:.1f} s ({args.merge_rows / seconds:,.0f} "
              f"rows/s; {args.total:,} rows: about {args.total / (args.merge_rows / seconds) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

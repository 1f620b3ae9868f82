#!/usr/bin/env python3
"""Benchmark: training images/s on 1 vs 2 logical CPU replicas, and steps_per_execution 1 vs 8.

    python scripts/bench_replicas.py [--backbones small-cnn,efficientnet-b0] [--size 128] [--batch 32]
                                     [--steps 16] [--repeats 3] [--rounds 2]

Each setting runs in a fresh process (logical CPU devices can only be made before TensorFlow starts):
the model as the trainer builds and compiles it (random weights, AdamW, cross-entropy), one global
batch of `--batch` fed from memory, so only the strategy and the host round trips differ. The child
warms up (tracing and compiling), then times `--steps` steps `--repeats` times and keeps the best. The
parent runs every setting once per round, alternating, and reports the best of the rounds and the
ratios to the 1-replica, 1-step-per-execution figure measured in the same run. There is no speed goal
on a shared 2-core CPU: the point is the strategy's overhead, and to catch a pathologically slow path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(1, 1), (2, 1), (1, 8), (2, 8)]  # (replicas, steps_per_execution)


def child(backbone: str, size: int, batch: int, steps: int, repeats: int, per_execution: int) -> float:
    """Best images/s of `repeats` timings of `steps` training steps, under FLOWER_CPU_REPLICAS."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from training.fit.strategy import detect_strategy
    from training.models.model import build_classifier

    strategy, _ = detect_strategy(lambda _: None)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, batch)]
    with strategy.scope():
        model = build_classifier(backbone, size, 5, dropout=0.2)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy",
                      steps_per_execution=per_execution)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, epochs=1, steps_per_epoch=2 * per_execution, verbose=0)  # trace and compile
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        best = max(best, steps * batch / (time.perf_counter() - start))
    return best


def measure(args: argparse.Namespace, backbone: str, replicas: int, per_execution: int) -> float:
    """Run one setting in a fresh process; its images/s."""
    command = [sys.executable, __file__, "--child", backbone, "--size", str(args.size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--per-execution", str(per_execution)]
    env = {**os.environ, "FLOWER_CPU_REPLICAS": str(replicas), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{backbone} on {replicas} replica(s), {per_execution} step(s)/execution failed:\n"
                         f"{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="small-cnn,efficientnet-b0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="global batch (split among the replicas)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", metavar="BACKBONE", help=argparse.SUPPRESS)
    parser.add_argument("--per-execution", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps % 8 or args.batch % 2:
        parser.error("--steps must be a multiple of 8 and --batch even (2 replicas split it)")
    if args.child:
        speed = child(args.child, args.size, args.batch, args.steps, args.repeats, args.per_execution)
        print(json.dumps({"images_per_second": speed}))
        return 0
    best: dict[tuple[str, int, int], float] = {}
    for round_ in range(args.rounds):
        for backbone in args.backbones.split(","):
            for replicas, per_execution in SETTINGS:
                speed = measure(args, backbone, replicas, per_execution)
                key = (backbone, replicas, per_execution)
                best[key] = max(best.get(key, 0.0), speed)
                print(f"round {round_ + 1}: {backbone} {replicas} replica(s), {per_execution} step(s)/execution: "
                      f"{speed:.1f} img/s", flush=True)
    print(f"\n{args.size} px, global batch {args.batch}, best of {args.rounds} round(s) x {args.repeats} timing(s) "
          f"of {args.steps} steps, fed from memory")
    print("| backbone | replicas | steps/execution | img/s | ratio to 1 replica, 1 step |")
    print("|---|---|---|---|---|")
    for backbone in args.backbones.split(","):
        base = best[(backbone, 1, 1)]
        for replicas, per_execution in SETTINGS:
            speed = best[(backbone, replicas, per_execution)]
            print(f"| {backbone} | {replicas} | {per_execution} | {speed:.1f} | {speed / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

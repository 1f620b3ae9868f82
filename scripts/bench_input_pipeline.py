#!/usr/bin/env python3
"""Benchmark: images/s of the training input pipeline (read, decode, augment, batch 64).

    python scripts/bench_input_pipeline.py [--sizes 192,512] [--images 256] [--batches 12] [--rounds 3]

On the same records, in the same process, it measures:
  ours      the project's train_dataset with the default augmentation (flips, rotation, shear, zoom,
            shift: the notebooks' set), one fused, XLA-compiled bilinear pass per batch
  colour    ours plus colour jitter (brightness/contrast/saturation 0.1, hue 0.02), for its cost
  (a) off   the same pipeline with augmentation switched off
  (b) ref   a straightforward re-implementation of the public notebooks' per-image affine
            augmentation: a 3x3 matrix per image, destination pixel grid, nearest pixel by gather_nd
Variants run interleaved for several rounds; the median of each is reported with the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from core.contract import size_folder_name
from imaging.augment_config import AugmentConfig
from imaging.records import Record, write_split
from training.data.dataset import train_dataset, training_splits
from training.data.demo_data import KINDS, draw_flower, jpeg_bytes

BATCH = 64
COLOUR = AugmentConfig(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)


def make_records(root: Path, size: int, count: int) -> None:
    """Write `count` demo images at `size` px as the train split."""
    rng = np.random.default_rng(size)
    records = (
        Record(jpeg_bytes(draw_flower(KINDS[i % len(KINDS)], rng, size), size), f"{i:06d}", i % len(KINDS))
        for i in range(count)
    )
    write_split(str(root / size_folder_name(size) / "train"), size, records, records_per_file=32)


def reference_transform(image: tf.Tensor, size: int) -> tf.Tensor:
    """The notebooks' augmentation: random affine matrix, then nearest-pixel gather_nd per image."""
    deg = math.pi / 180.0
    rot = 15.0 * tf.random.normal([]) * deg
    shr = 5.0 * tf.random.normal([]) * deg
    zoom_h = 1.0 + tf.random.normal([]) / 10.0
    zoom_w = 1.0 + tf.random.normal([]) / 10.0
    shift_h = 16.0 * tf.random.normal([]) * size / 192.0
    shift_w = 16.0 * tf.random.normal([]) * size / 192.0

    def mat(values):
        return tf.reshape(tf.stack(values), [3, 3])

    one, zero = tf.constant(1.0), tf.constant(0.0)
    rotation = mat([tf.cos(rot), tf.sin(rot), zero, -tf.sin(rot), tf.cos(rot), zero, zero, zero, one])
    shear = mat([one, tf.sin(shr), zero, zero, tf.cos(shr), zero, zero, zero, one])
    zoom = mat([one / zoom_h, zero, zero, zero, one / zoom_w, zero, zero, zero, one])
    shift = mat([one, zero, shift_h, zero, one, shift_w, zero, zero, one])
    m = rotation @ shear @ zoom @ shift

    half = size // 2
    x = tf.repeat(tf.range(half, -half, -1), size)
    y = tf.tile(tf.range(-half, half), [size])
    grid = tf.stack([tf.cast(x, tf.float32), tf.cast(y, tf.float32), tf.ones([size * size])])
    source = tf.cast(tf.round(m @ grid), tf.int32)
    source = tf.clip_by_value(source[:2], -half + 1, half)
    index = tf.stack([half - source[0], half - 1 + source[1]])
    pixels = tf.gather_nd(image, tf.transpose(index))
    return tf.reshape(pixels, [size, size, 3])


def reference_dataset(data_dir: Path, size: int) -> tf.data.Dataset:
    """The notebooks' training pipeline with their per-image augmentation, batch 64."""
    files = sorted(tf.io.gfile.glob(str(data_dir / size_folder_name(size) / "train" / "*.tfrec")))
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "class": tf.io.FixedLenFeature([], tf.int64)}

    def load(raw):
        parsed = tf.io.parse_single_example(raw, spec)
        image = tf.cast(tf.io.decode_jpeg(parsed["image"], channels=3), tf.float32)
        image = tf.image.random_flip_left_right(tf.reshape(image, [size, size, 3]))
        return reference_transform(image, size), tf.one_hot(parsed["class"], len(KINDS))

    options = tf.data.Options()
    options.deterministic = False
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).with_options(options)
    ds = ds.repeat().shuffle(2048).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def images_per_second(ds: tf.data.Dataset, batches: int) -> float:
    """Pull `batches` batches after two warm-up batches; return images per second."""
    it = iter(ds)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)[0].numpy()
    return batches * BATCH / (time.perf_counter() - start)


def run(sizes: list[int], images: int, batches: int, rounds: int) -> dict:
    """Measure every variant at every size; return medians and ratios."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in sizes:
            make_records(root, size, images)
            variants = {
                "ours": lambda s=size: train_dataset(training_splits(str(root), s), s, BATCH, num_classes=len(KINDS),
                                                   augment=AugmentConfig(), seed=0),
                "colour": lambda s=size: train_dataset(training_splits(str(root), s), s, BATCH, num_classes=len(KINDS),
                                                   augment=COLOUR, seed=0),
                "off": lambda s=size: train_dataset(training_splits(str(root), s), s, BATCH, num_classes=len(KINDS),
                                                   augment=AugmentConfig.off(), seed=0),
                "ref": lambda s=size: reference_dataset(root, s),
            }
            samples: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(rounds):
                for name, build in variants.items():
                    samples[name].append(images_per_second(build(), batches))
                    print(f"  {size}px round {r + 1}: {name:6s} {samples[name][-1]:7.1f} img/s", flush=True)
            med = {k: statistics.median(v) for k, v in samples.items()}
            results[size] = {
                "images_per_second": med,
                "ours_vs_ref": med["ours"] / med["ref"],
                "ours_vs_off": med["ours"] / med["off"],
                "colour_vs_ref": med["colour"] / med["ref"],
            }
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="192,512", help="comma-separated image sizes")
    parser.add_argument("--images", type=int, default=256, help="records written per size")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, batch {BATCH}")
    results = run(sizes, args.images, args.batches, args.rounds)
    print("\n| size | ours img/s | ours + colour | (a) aug off | (b) notebook gather_nd "
          "| ours / (b) | ours / (a) | ours + colour / (b) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        ips = r["images_per_second"]
        print(f"| {size} | {ips['ours']:.0f} | {ips['colour']:.0f} | {ips['off']:.0f} | {ips['ref']:.0f} | "
              f"{r['ours_vs_ref']:.2f} | {r['ours_vs_off']:.2f} | {r['colour_vs_ref']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

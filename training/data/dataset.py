"""tf.data pipelines over the competition layout: a fast training stream and ordered evaluation sets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from core.contract import CLASS_FEATURE, ID_FEATURE, IMAGE_FEATURE
from core.errors import ConfigError, DataError, tf_reason
from imaging.augment import AugmentConfig, augment_batch, mix_batch, resize_image
from imaging.records import (
    check_first_records,
    decode_jpeg,
    find_bad_record,
    parse_record,
    records_with_source,
    require,
)
from training.data.layout import choose_file_size, count_records, split_files

AUTOTUNE = tf.data.AUTOTUNE
DROPPED_ROW = -2  # a target table's row index for a record not trained on (training.data.soft_targets)


@dataclass(frozen=True)
class SplitInfo:
    """Where one split lives and what it holds."""

    split: str
    files: tuple[str, ...]
    file_size: int
    count: int
    labelled: bool


# How tf.distribute splits a dataset among workers. With one worker it must be OFF: the default
# (AUTO) rewrites the file-level shuffle even on a single machine with several replicas, so that N
# replicas would train on another order of the images than one replica with the same seed. Sharding
# by file is done by train_dataset itself (then OFF here).
SHARD_POLICIES = {
    "off": tf.data.experimental.AutoShardPolicy.OFF,
    "data": tf.data.experimental.AutoShardPolicy.DATA,
}


def split_info(data_dir: str, split: str, image_size: int, file_size: int | None = None) -> SplitInfo:
    """Locate a split's files (at the chosen record size), check the first record of each, count them."""
    size = choose_file_size(data_dir, image_size, file_size)
    files = split_files(data_dir, size, split)
    labelled = split != "test"
    check_first_records(files, labelled, size)
    return SplitInfo(split, tuple(files), size, count_records(files), labelled)


def record_id(stored: tf.Tensor, source: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """A record's id: the one it stores, else `<file stem>-<index in file>` (core.contract.record_id_fallback)."""
    stem = tf.strings.regex_replace(source, r"^.*/|\.tfrec$", "")
    fallback = tf.strings.join([stem, tf.strings.as_string(index)], "-")
    return tf.where(tf.strings.length(stored) > 0, stored, fallback)


def _parse_and_decode(serialized, source, index, labelled: bool, file_size: int, num_classes: int | None):
    """Parse a record and decode its image; fill a missing id with `<file stem>-<index>` (no ids if index is None)."""
    parsed = parse_record(serialized, source, labelled)
    image = decode_jpeg(parsed[IMAGE_FEATURE], file_size)
    ids = None if index is None else record_id(parsed[ID_FEATURE], source, index)
    label = parsed.get(CLASS_FEATURE)
    if label is not None and num_classes is not None:
        in_range = require(label < num_classes, f"class label out of range (>= {num_classes} classes) in file", source)
        with tf.control_dependencies([in_range]):
            label = tf.identity(label)
    return image, label, ids


def training_splits(data_dir: str, image_size: int, file_size: int | None = None,
                    include_val: bool = False) -> list[SplitInfo]:
    """The splits a run trains on: train, plus val for a final fit on train+val, at one record size."""
    splits = [split_info(data_dir, "train", image_size, file_size)]
    if include_val:
        splits.append(split_info(data_dir, "val", image_size, splits[0].file_size))
    return splits


def _shuffled_records(files: list[str], seed: int, repeat: bool, deterministic: bool, shard: str,
                      worker: tuple[int, int]) -> tf.data.Dataset:
    """(serialized record, file path, index in file) of this worker's files, shuffled by file for the seed, interleaved.

    reshuffle_each_iteration=False: the order is a function of the seed alone, however often the
    dataset is iterated (Keras under a distribution strategy may open it more than once; a reshuffling
    dataset would then train several replicas on another order than one replica). Each epoch gets a
    fresh dataset with its own seed (training.fit.loop.epoch_seed), so epochs still differ.
    """
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    if shard == "file":  # done here: tf.distribute's own file sharding cannot see through the pipeline
        index, count = worker
        if len(files) < count:
            raise ConfigError(f"data.shard = file needs a record file per worker: {len(files)} for {count} workers; "
                              "use data.shard = data")
        file_ds = file_ds.shard(count, index)
    file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
    if repeat:
        file_ds = file_ds.repeat()
    return file_ds.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=8 << 20).enumerate().map(lambda i, r: (r, path, i)),
        cycle_length=min(16, len(files)), num_parallel_calls=AUTOTUNE, deterministic=deterministic,
    )


def train_dataset(
    splits: Sequence[SplitInfo],
    image_size: int,
    batch_size: int,
    *,
    num_classes: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    shuffle_buffer: int = 2048,
    repeat: bool = True,
    deterministic: bool = False,
    shard: str = "off",
    worker: tuple[int, int] = (0, 1),
    targets: tuple[tf.lookup.StaticHashTable, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """Endless, shuffled, augmented batches (images [B,S,S,3] float32 0..255, one-hot labels [B,C]).

    `splits` are located already (`training_splits`). Files are read in parallel and unordered for
    speed; batches have fixed shapes (drop_remainder) as TPUs need. `deterministic=True` keeps the
    order fixed for a given seed (slower), so that a run can be repeated or resumed exactly.
    `shard` is how a distribution strategy splits the batches among workers: 'off' (one worker: every
    replica's share of a global batch is cut from the same batches one replica would see), 'file'
    (each worker reads its own record files: `worker` is this worker's index and the count) or 'data'
    (each worker reads everything and keeps its share of every batch).
    `targets` (a distilled student: training.data.soft_targets) replace the labels: a table from record id to a
    row of the target matrix; records of unlabeled splits are read too, and those the table drops are skipped.
    """
    augment_config = augment if augment is not None else AugmentConfig()
    files = [f for info in splits for f in info.files]
    size = splits[0].file_size
    if any(info.file_size != size or not (info.labelled or targets) for info in splits):
        raise ValueError("training splits must be labelled (unless targets are given) and share one record size")

    ds = _shuffled_records(files, seed, repeat, deterministic, shard, worker)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    if targets is not None:
        ds = _with_targets(ds, *targets, size, deterministic)

    def load(serialized, source, index):
        image, label, _ = _parse_and_decode(serialized, source, None, True, size, num_classes)
        return image, tf.one_hot(label, num_classes, dtype=tf.float32)

    def augment_and_mix(batch, batch_seed):
        images, labels = batch
        s = tf.random.experimental.stateless_split(batch_seed, num=2)
        images = augment_batch(images, s[0], augment_config, image_size)
        return mix_batch(images, labels, s[1], augment_config)

    if targets is None:
        ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    # One seed per batch: augmentation parameters are sampled and applied batch-wise.
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=False).batch(2)))
    ds = ds.map(augment_and_mix, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = SHARD_POLICIES["off" if shard == "file" else shard]
    return ds.with_options(options).prefetch(AUTOTUNE)


def _with_targets(ds: tf.data.Dataset, table: tf.lookup.StaticHashTable, rows: np.ndarray, size: int,
                  deterministic: bool) -> tf.data.Dataset:
    """(serialized, file, index) -> (image, its target row) by the record's id; a dropped id is skipped, and one
    without a row fails naming its file (soft_targets checks every id on the host first)."""
    matrix = tf.constant(rows, tf.float32)

    def look_up(serialized, source, index):
        parsed = parse_record(serialized, source, labelled=False)
        return parsed[IMAGE_FEATURE], table.lookup(record_id(parsed[ID_FEATURE], source, index)), source

    def load(image_bytes, row, source):
        found = require(row >= 0, "record without a teacher row (distil.teacher) in file", source)
        with tf.control_dependencies([found]):
            return decode_jpeg(image_bytes, size), tf.gather(matrix, row)

    ds = ds.map(look_up, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.filter(lambda image_bytes, row, source: row != DROPPED_ROW)
    return ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def eval_dataset(
    info: SplitInfo, image_size: int, batch_size: int, *, num_classes: int | None = None
) -> tf.data.Dataset:
    """Ordered batches of a located split: (images, labels, ids) for train/val, (images, ids) for test."""
    def load(serialized, source, index):
        image, label, ids = _parse_and_decode(serialized, source, index, info.labelled, info.file_size, num_classes)
        image = resize_image(image, image_size)  # float32 0..255
        return (image, label, ids) if info.labelled else (image, ids)

    ds = records_with_source(list(info.files))
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def iterate_checked(ds: tf.data.Dataset, info: SplitInfo) -> Iterator:
    """Iterate a dataset as numpy; a data error is re-raised as DataError naming the file and record."""
    try:
        yield from ds.as_numpy_iterator()
    except tf.errors.OpError as err:
        culprit = find_bad_record(list(info.files), info.labelled, info.file_size)
        if culprit is not None:
            raise culprit from None
        raise DataError(f"reading split {info.split!r} failed: {tf_reason(err)}") from None

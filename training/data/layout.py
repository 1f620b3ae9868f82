"""The competition data layout: `<data>/tfrecords-jpeg-<S>x<S>/{train,val,test}/*.tfrec`.

Works on local folders and on `gs://` paths (everything goes through `tf.io.gfile`).
"""

from __future__ import annotations

import json

import tensorflow as tf

from core.contract import (
    CLASSES_FILE,
    SPLITS,
    choose_size,
    class_name_problem,
    competition_classes,
    count_in_name,
    folder_size,
    join,
    size_folder_name,
)
from core.errors import DataError, tf_reason


def size_folder(data_dir: str, size: int) -> str:
    """Return the folder that holds the records of one image size."""
    return join(str(data_dir), size_folder_name(size))


def available_sizes(data_dir: str) -> list[int]:
    """List the image sizes present under a data folder, ascending."""
    data_dir = str(data_dir)
    if not tf.io.gfile.isdir(data_dir):
        raise DataError(f"data folder not found: {data_dir}")
    sizes = []
    for name in tf.io.gfile.listdir(data_dir):
        size = folder_size(name)
        if size is not None and tf.io.gfile.isdir(join(data_dir, name.rstrip("/"))):  # a size folder is a folder
            sizes.append(size)
    return sorted(sizes)


def choose_file_size(data_dir: str, image_size: int, file_size: int | None = None) -> int:
    """Pick the record size to read: the one asked for, else the smallest >= image_size, else the largest."""
    sizes = available_sizes(data_dir)
    if not sizes:
        raise DataError(
            f"no 'tfrecords-jpeg-<S>x<S>' folder in {data_dir}; expected the competition layout "
            "(make one with `flower demo-data` or `flower import`)"
        )
    if file_size is not None:
        if file_size not in sizes:
            raise DataError(f"no records of size {file_size} in {data_dir}; sizes present: {sizes}")
        return file_size
    return choose_size(sizes, image_size)


def split_files(data_dir: str, size: int, split: str) -> list[str]:
    """Return the sorted `.tfrec` files of one split at one size; raise DataError if there are none."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = join(size_folder(data_dir, size), split)
    if not tf.io.gfile.isdir(folder):
        raise DataError(f"split folder not found: {folder}")
    files = sorted(tf.io.gfile.glob(join(folder, "*.tfrec")))
    if not files:
        raise DataError(f"no .tfrec files for split {split!r} at size {size}: {folder} is empty")
    return files


def count_records(files: list[str]) -> int:
    """Count the records of files: from the `-<count>.tfrec` name, else by reading the file."""
    total = 0
    for path in files:
        stated = count_in_name(path)
        if stated is not None:
            total += stated
            continue
        try:
            total += int(tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1))
        except tf.errors.OpError as err:
            raise DataError(f"cannot read records of {path}: {tf_reason(err)}") from None
    return total


def load_classes(data_dir: str) -> list[str]:
    """Class names in label order: `<data>/classes.json`, else the 104 competition classes."""
    path = join(str(data_dir), CLASSES_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            try:
                names = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path} must hold a non-empty JSON list of class names")
        problem = class_name_problem(names)
        if problem:
            raise DataError(f"{path}: {problem}")
        return [n.strip() for n in names]
    return competition_classes()


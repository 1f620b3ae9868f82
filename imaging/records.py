"""TFRecord format of the competition: write records, parse them in the graph, find a bad one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import tensorflow as tf

from core.contract import (
    CLASS_FEATURE,
    ID_FEATURE,
    IMAGE_FEATURE,
    JPEG_DCT,
    MISSING_CLASS,
    count_in_name,
    join,
    record_id_fallback,
)
from core.errors import DataError, tf_reason


@dataclass(frozen=True)
class Record:
    """One image as stored: encoded JPEG bytes, its id, and its label (None for test)."""

    image: bytes
    id: str
    label: int | None = None


def serialize(record: Record) -> bytes:
    """Encode one record as a tf.train.Example."""
    feature = {
        IMAGE_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.image])),
        ID_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.id.encode()])),
    }
    if record.label is not None:
        feature[CLASS_FEATURE] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record.label)]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_split(
    folder: str, size: int, records: Iterable[Record], records_per_file: int = 256
) -> list[str]:
    """Write records as `NN-<S>x<S>-<count>.tfrec` files into folder, each atomically; return the paths."""
    tf.io.gfile.makedirs(folder)
    written: list[str] = []
    batch: list[bytes] = []

    def flush() -> None:
        name = join(folder, f"{len(written):02d}-{size}x{size}-{len(batch)}.tfrec")
        tmp = name + ".tmp"  # through tf.io.gfile, not core.files: the folder may be gs://, where rename is a copy
        with tf.io.TFRecordWriter(tmp) as writer:
            for item in batch:
                writer.write(item)
        tf.io.gfile.rename(tmp, name, overwrite=True)
        written.append(name)
        batch.clear()

    for record in records:
        batch.append(serialize(record))
        if len(batch) == records_per_file:
            flush()
    if batch:
        flush()
    return written


def require(condition: tf.Tensor, message: str, source: tf.Tensor) -> tf.Operation:
    """A graph assertion whose error message names the problem and the file it came from."""
    return tf.debugging.Assert(condition, [message, source])


def parse_record(serialized: tf.Tensor, source: tf.Tensor, labelled: bool) -> dict[str, tf.Tensor]:
    """Parse one serialized Example in the graph; a missing feature fails with the file's name."""
    spec = {
        IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string, default_value=""),
        ID_FEATURE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if labelled:
        spec[CLASS_FEATURE] = tf.io.FixedLenFeature([], tf.int64, default_value=MISSING_CLASS)
    parsed = tf.io.parse_single_example(serialized, spec)
    checks = [require(tf.strings.length(parsed[IMAGE_FEATURE]) > 0, f"record without an '{IMAGE_FEATURE}' feature "
                      "in file", source)]
    if labelled:
        message = f"record without a '{CLASS_FEATURE}' feature (or a negative one) in file"
        checks.append(require(parsed[CLASS_FEATURE] >= 0, message, source))
    with tf.control_dependencies(checks):
        return {k: tf.identity(v) for k, v in parsed.items()}


def decode_jpeg(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Decode JPEG bytes to uint8 RGB with the static shape [size, size, 3]."""
    return tf.ensure_shape(tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT), [size, size, 3])


def records_with_source(files: list[str]) -> tf.data.Dataset:
    """Yield (serialized, file, index-in-file) over files, in file order."""
    def one_file(path: tf.Tensor) -> tf.data.Dataset:
        ds = tf.data.TFRecordDataset(path, buffer_size=8 << 20).enumerate()
        return ds.map(lambda i, r: (r, path, i))

    return tf.data.Dataset.from_tensor_slices(files).flat_map(one_file)


def iter_records(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (index, serialized) of one file; a framing error names the file and the record index, and so does a
    file that ends before the count its `-<count>.tfrec` name states (cut short at a record boundary)."""
    index = 0
    try:
        for raw in tf.data.TFRecordDataset(path):
            yield index, raw.numpy()
            index += 1
    except tf.errors.OpError as err:
        raise DataError(f"{path}: record {index} is corrupt ({tf_reason(err)})") from None
    stated = count_in_name(path)
    if stated is not None and index < stated:
        raise DataError(f"{path}: holds {index} records, its name states {stated} (the file was cut short)")


@dataclass(frozen=True)
class ExampleFields:
    """The contract's features of one record read on the host: image bytes, label (None: none), id ("": none)."""

    image: bytes
    label: int | None
    id: str
    features: tuple[str, ...]  # every feature the record has, to name in an error


def example_fields(raw: bytes) -> ExampleFields | None:
    """One serialized tf.train.Example's contract features; None when the bytes are no Example."""
    try:
        feature = tf.train.Example.FromString(raw).features.feature
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError type
        return None
    images = feature[IMAGE_FEATURE].bytes_list.value if IMAGE_FEATURE in feature else []
    labels = feature[CLASS_FEATURE].int64_list.value if CLASS_FEATURE in feature else []
    ids = feature[ID_FEATURE].bytes_list.value if ID_FEATURE in feature else []
    return ExampleFields(images[0] if images else b"", int(labels[0]) if labels else None,
                         ids[0].decode("utf-8", "backslashreplace") if ids else "", tuple(sorted(feature)))


def record_labels(files: list[str]) -> dict[str, int | None]:
    """Every record's id (`<file stem>-<index>` for one without, as the pipeline names it) and label (None: none),
    read on the host in file order; DataError naming the file for a damaged record or an id found twice."""
    labels: dict[str, int | None] = {}
    for path in files:
        for index, raw in iter_records(path):
            fields = example_fields(raw)
            if fields is None:
                raise DataError(f"{path}: record {index} is not a tf.train.Example")
            record_id = fields.id or record_id_fallback(path, index)
            if record_id in labels:
                raise DataError(f"{path}: record {index} has the id {record_id!r} of an earlier record: ids must be "
                                "unique to be joined with a teacher's rows")
            labels[record_id] = fields.label
    return labels


def check_record(raw: bytes, path: str, index: int, labelled: bool, size: int | None) -> None:
    """Raise DataError naming file and record if a serialized record is not a valid one."""
    where = f"{path}: record {index}"
    fields = example_fields(raw)
    if fields is None:
        raise DataError(f"{where} is not a tf.train.Example")
    if not fields.image:
        raise DataError(f"{where} has no '{IMAGE_FEATURE}' feature (features present: {list(fields.features)})")
    if labelled and fields.label is None:
        raise DataError(f"{where} has no '{CLASS_FEATURE}' feature (features present: {list(fields.features)})")
    try:
        shape = tf.io.decode_jpeg(fields.image, channels=3).shape
    except tf.errors.OpError as err:
        raise DataError(f"{where}: image is not a valid JPEG ({tf_reason(err)})") from None
    if size is not None and tuple(shape[:2]) != (size, size):
        raise DataError(f"{where}: image is {shape[1]}x{shape[0]}, expected {size}x{size}")


def find_bad_record(files: list[str], labelled: bool, size: int | None) -> DataError | None:
    """Scan files record by record and return the first problem found, naming file and record."""
    try:
        for path in files:
            for index, raw in iter_records(path):
                check_record(raw, path, index, labelled, size)
    except DataError as err:
        return err
    return None


def check_first_records(files: list[str], labelled: bool, size: int | None) -> None:
    """Check the first record of every file (cheap up-front check of features, JPEG and size)."""
    for path in files:
        for index, raw in iter_records(path):
            check_record(raw, path, index, labelled, size)
            break
        else:
            raise DataError(f"{path} holds no records")

"""The data pipeline: layout discovery, record round trip, counts, shapes, and errors on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from core.contract import competition_classes, size_folder_name
from core.errors import ConfigError, DataError
from imaging.augment import AugmentConfig
from imaging.records import Record, serialize, write_split
from tests.conftest import TINY_COUNTS
from training.data.dataset import eval_dataset, iterate_checked, split_info, train_dataset, training_splits
from training.data.layout import (
    available_sizes,
    choose_file_size,
    count_records,
    load_classes,
    split_files,
)


def _jpeg(value: int, size: int = 16) -> bytes:
    """A flat-colour JPEG of the given grey value."""
    return tf.io.encode_jpeg(tf.fill([size, size, 3], tf.constant(value, tf.uint8))).numpy()


def _make_layout(root, split: str, records: list[Record], size: int = 16, per_file: int = 4) -> list[str]:
    """Write records into the competition layout under root and return the file paths."""
    return write_split(str(root / size_folder_name(size) / split), size, records, per_file)


def test_records_round_trip_keeps_ids_labels_and_order(tmp_path):
    records = [Record(_jpeg(10 * i), f"id{i:02d}", i % 3) for i in range(10)]
    files = _make_layout(tmp_path, "val", records)
    assert [f.rsplit("/", 1)[1] for f in files] == ["00-16x16-4.tfrec", "01-16x16-4.tfrec", "02-16x16-2.tfrec"]

    batches = list(eval_dataset(split_info(str(tmp_path), "val", 16), 16, batch_size=3, num_classes=3))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    ids = [i.decode() for b in batches for i in b[2].numpy()]
    assert ids == [r.id for r in records]
    assert labels.tolist() == [r.label for r in records]
    expected = np.stack([tf.io.decode_jpeg(r.image).numpy() for r in records]).astype(np.float32)
    np.testing.assert_array_equal(images, expected)


def test_test_split_yields_images_and_ids_without_labels(tiny_data):
    batches = list(eval_dataset(split_info(str(tiny_data), "test", 32), 32, batch_size=8))
    assert all(len(b) == 2 for b in batches)
    ids = [i.decode() for b in batches for i in b[1].numpy()]
    assert len(ids) == TINY_COUNTS["test"] == len(set(ids))
    answers = (tiny_data / "test_answers.csv").read_text().splitlines()[1:]
    assert sorted(ids) == sorted(line.split(",")[0] for line in answers)


def test_counts_come_from_file_names_or_from_the_records(tmp_path, tiny_data):
    for split, count in TINY_COUNTS.items():
        assert count_records(split_files(str(tiny_data), 32, split)) == count
    files = _make_layout(tmp_path, "train", [Record(_jpeg(1), f"x{i}", 0) for i in range(5)], per_file=5)
    unnamed = tmp_path / "renamed.tfrec"
    shutil.copy(files[0], unnamed)
    assert count_records([str(unnamed)]) == 5


def test_sizes_are_discovered_and_the_closest_larger_size_is_chosen(tiny_data):
    assert available_sizes(str(tiny_data)) == [32, 48]
    assert choose_file_size(str(tiny_data), 40) == 48
    assert choose_file_size(str(tiny_data), 24) == 32
    assert choose_file_size(str(tiny_data), 96) == 48
    assert choose_file_size(str(tiny_data), 96, file_size=32) == 32


def test_training_batches_have_fixed_shapes_dtypes_and_one_hot_labels(tiny_data):
    ds = train_dataset(training_splits(str(tiny_data), 40), 40, batch_size=7, num_classes=6, augment=AugmentConfig(),
                       seed=1)
    assert ds.element_spec[0].shape.as_list() == [7, 40, 40, 3]
    assert ds.element_spec[1].shape.as_list() == [7, 6]
    for images, labels in ds.take(12):  # more than one epoch: the stream repeats
        assert images.dtype == tf.float32 and labels.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
        np.testing.assert_allclose(labels.numpy().sum(axis=1), 1.0)
        assert set(np.unique(labels.numpy())) <= {0.0, 1.0}


def test_the_training_order_depends_on_the_seed_alone_not_on_how_often_it_is_read(tiny_data):
    # A distribution strategy may open the dataset more than once; every opening must give the same
    # batches (and a different seed, i.e. another epoch, other batches).
    def batches(seed: int) -> tf.data.Dataset:
        return train_dataset(training_splits(str(tiny_data), 32), 32, batch_size=8, num_classes=6,
                             augment=AugmentConfig(), seed=seed, deterministic=True)

    ds = batches(5)
    first, second = (np.concatenate([b[0] for b in ds.take(10).as_numpy_iterator()]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, np.concatenate([b[0] for b in batches(5).take(10).as_numpy_iterator()]))
    assert np.abs(first - np.concatenate([b[0] for b in batches(6).take(10).as_numpy_iterator()])).mean() > 1.0


def test_sharding_by_file_gives_each_worker_its_own_files(tiny_data):
    splits = training_splits(str(tiny_data), 32)  # 60 images in 3 files of 20

    def images(worker: tuple[int, int]) -> set[bytes]:
        ds = train_dataset(splits, 32, 4, num_classes=6, augment=AugmentConfig.off(), repeat=False, shard="file",
                           worker=worker)
        return {image.tobytes() for batch, _ in ds.as_numpy_iterator() for image in batch}

    first, second = images((0, 2)), images((1, 2))
    assert not first & second and len(first) + len(second) == TINY_COUNTS["train"]
    assert {len(first), len(second)} == {40, 20}  # two files and one file
    with pytest.raises(ConfigError, match="data.shard = file needs a record file per worker: 3 for 4 workers"):
        train_dataset(splits, 32, 4, num_classes=6, shard="file", worker=(0, 4))


def test_train_plus_val_sees_validation_images(tiny_data):
    def seen(include_val: bool) -> int:
        splits = training_splits(str(tiny_data), 32, include_val=include_val)
        ds = train_dataset(splits, 32, 6, num_classes=6, augment=AugmentConfig.off(), repeat=False)
        return sum(int(images.shape[0]) for images, _ in ds)

    assert seen(False) == TINY_COUNTS["train"]
    assert seen(True) == TINY_COUNTS["train"] + TINY_COUNTS["val"]


def test_evaluation_resizes_to_the_model_size_in_the_pipeline(tiny_data):
    images, labels, ids = next(iter(eval_dataset(split_info(str(tiny_data), "val", 64), 64, batch_size=5)))
    assert images.shape == (5, 64, 64, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int64 and ids.dtype == tf.string


def test_class_names_come_from_classes_json_else_the_competition_list(tmp_path, tiny_data):
    assert load_classes(str(tiny_data))[0] == "red five-petal"
    names = load_classes(str(tmp_path))
    assert len(names) == 104 and names == competition_classes()
    assert names[87] == names[87].strip() and names[90] == names[90].strip()
    (tmp_path / "classes.json").write_text("{broken")
    with pytest.raises(DataError, match="classes.json is not valid JSON"):
        load_classes(str(tmp_path))
    (tmp_path / "classes.json").write_text(json.dumps(["rose", "rose ", "  "]))  # a data set made by another tool
    with pytest.raises(DataError, match="classes.json: class names 'rose' and 'rose ' are one class, 'rose'"):
        load_classes(str(tmp_path))


def test_missing_folders_and_files_are_named(tmp_path, tiny_data):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        available_sizes(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no 'tfrecords-jpeg-<S>x<S>' folder"):
        choose_file_size(str(tmp_path), 32)
    with pytest.raises(DataError, match="no records of size 64 .* sizes present: \\[32, 48\\]"):
        choose_file_size(str(tiny_data), 64, file_size=64)
    (tmp_path / "tfrecords-jpeg-16x16" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="split folder not found: .*16x16/train"):
        split_files(str(tmp_path), 16, "train")
    with pytest.raises(DataError, match="no .tfrec files for split 'val' at size 16"):
        split_files(str(tmp_path), 16, "val")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        split_files(str(tmp_path), 16, "dev")


def test_a_file_without_the_class_feature_is_named(tmp_path):
    files = _make_layout(tmp_path, "train", [Record(_jpeg(5), "a", None), Record(_jpeg(5), "b", None)])
    with pytest.raises(DataError, match=f"{files[0]}: record 0 has no 'class' feature"):
        training_splits(str(tmp_path), 16)


def test_a_corrupt_jpeg_deep_in_a_file_is_named_with_its_record(tmp_path):
    records = [Record(_jpeg(5), f"r{i}", 0) for i in range(6)]
    records[5] = Record(b"\xff\xd8\xff not really a jpeg", "r5", 0)
    files = _make_layout(tmp_path, "val", records, per_file=6)
    info = split_info(str(tmp_path), "val", 16)  # the first record is fine: the cheap check passes
    with pytest.raises(DataError, match=f"{files[0]}: record 5: image is not a valid JPEG") as bad:
        list(iterate_checked(eval_dataset(split_info(str(tmp_path), "val", 16), 16, 2), info))
    assert "{{" not in str(bad.value) and "[Op:" not in str(bad.value)  # TensorFlow's node names left out


def test_a_file_cut_short_at_a_record_boundary_is_named_by_every_reader_of_whole_files(tmp_path):
    from imaging.records import find_bad_record, iter_records

    path = tmp_path / "00-16x16-3.tfrec"  # its name states 3 records; it holds 2, and no read error says so
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(2):
            writer.write(serialize(Record(_jpeg(5), f"r{i}", 0)))
    with pytest.raises(DataError, match="00-16x16-3.tfrec: holds 2 records, its name states 3"):
        list(iter_records(str(path)))
    assert "holds 2 records" in str(find_bad_record([str(path)], True, 16))


def test_tensorflow_errors_are_shown_without_their_graph_node_names():
    from core.errors import tf_reason

    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        tf.io.decode_jpeg(b"\xff\xd8\xff not a jpeg")
    assert "{{function_node" in err.value.message or "[Op:" in err.value.message  # what TensorFlow says
    reason = tf_reason(err.value)
    assert reason and "{{" not in reason and "[Op:" not in reason and "\n" not in reason
    assert tf_reason(ValueError("first line\nsecond")) == "first line" and tf_reason(ValueError("")) == ""


JPEG_FAILED = "jpeg::Uncompress failed. Invalid JPEG data or crop window."
SHORT_READ = "truncated record at 1396' failed with Read less bytes than requested"
MISSING = "/data/{{x}}/a.tfrec; No such file or directory"


@pytest.mark.parametrize("message,reason", [
    ("{{function_node __wrapped__DecodeJpeg_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
     f"{JPEG_FAILED} [Op:DecodeJpeg]", JPEG_FAILED),
    (f"{SHORT_READ} [Op:IteratorGetNext] name: ", SHORT_READ),
    ("Graph execution error:\n\nDetected at node DecodeJpeg defined at (most recent call last):\n"
     f"<stack traces unavailable>\n{JPEG_FAILED}\n\t [[{{{{node DecodeJpeg}}}}]]\n\t [[IteratorGetNext]]"
     " [Op:__inference_f]",
     JPEG_FAILED),  # inside model.fit: the reason is not the first line
    (f"{MISSING} [Op:IteratorGetNext] name: ", MISSING),
    ("/data[Op:x]/a.tfrec; No such file or directory", "/data[Op:x]/a.tfrec; No such file or directory"),  # a path kept
])
def test_the_reason_of_a_tensorflow_error_is_its_telling_line_without_decoration(message, reason):
    from core.errors import tf_reason

    error = tf.errors.InvalidArgumentError(None, None, message)
    assert tf_reason(error) == reason


def test_a_truncated_file_is_named(tmp_path):
    files = _make_layout(tmp_path, "val", [Record(_jpeg(5), f"r{i}", 0) for i in range(4)])
    data = open(files[0], "rb").read()
    open(files[0], "wb").write(data[: len(data) - 40])
    info = split_info(str(tmp_path), "val", 16)
    with pytest.raises(DataError, match=f"{files[0]}: record 3 is corrupt"):
        list(iterate_checked(eval_dataset(split_info(str(tmp_path), "val", 16), 16, 2), info))


def test_a_record_missing_its_class_inside_the_graph_names_the_file(tmp_path):
    records = [Record(_jpeg(5), "a", 0), Record(_jpeg(5), "b", None)]
    files = _make_layout(tmp_path, "val", records)
    ds = eval_dataset(split_info(str(tmp_path), "val", 16), 16, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=files[0]):
        list(ds)


def test_a_label_beyond_the_class_list_is_named(tmp_path):
    files = _make_layout(tmp_path, "val", [Record(_jpeg(5), "a", 7)])
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"out of range.*{files[0]}"):
        list(eval_dataset(split_info(str(tmp_path), "val", 16), 16, 2, num_classes=2))


def test_an_image_of_the_wrong_size_is_named(tmp_path):
    folder = tmp_path / "tfrecords-jpeg-16x16" / "val"
    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "00-16x16-1.tfrec")) as writer:
        writer.write(serialize(Record(_jpeg(5, size=20), "a", 0)))
    with pytest.raises(DataError, match="image is 20x20, expected 16x16"):
        split_info(str(tmp_path), "val", 16)


def test_records_without_ids_get_file_and_index_ids(tmp_path):
    folder = tmp_path / "tfrecords-jpeg-16x16" / "val"
    folder.mkdir(parents=True)
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_jpeg(3)])),
        "class": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    }))
    with tf.io.TFRecordWriter(str(folder / "00-16x16-2.tfrec")) as writer:
        writer.write(example.SerializeToString())
        writer.write(example.SerializeToString())
    _, _, ids = next(iter(eval_dataset(split_info(str(tmp_path), "val", 16), 16, 2)))
    assert [i.decode() for i in ids.numpy()] == ["00-16x16-2-0", "00-16x16-2-1"]

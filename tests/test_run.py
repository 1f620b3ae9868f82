"""A whole tiny training run and what it writes: the run directory's contract, the SavedModel (alone it
reproduces training's evaluation, stores its weights once, treats larger records as photos, is replaced whole
on a second export), the prediction files, class weights of the splits a run trains on, and written files
(atomic weights, a full disk, the umask)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from core.runtimes import saved_model_digest
from tests.conftest import TINY_COUNTS
from training.config import load_config
from training.fit.export import predict_split
from training.models.model import build_classifier


def test_a_run_directory_follows_the_contract(tiny_run):
    member = json.loads((tiny_run / "member.json").read_text())
    for key in ("name", "backbone", "weights", "image_size", "num_classes", "config", "data", "versions",
                "metrics", "timings"):
        assert key in member
    assert member["image_size"] == 32 and member["num_classes"] == 6
    assert member["data"]["counts"] == TINY_COUNTS
    classes = json.loads((tiny_run / "classes.json").read_text())
    with np.load(tiny_run / "predictions" / "val.npz", allow_pickle=False) as val:
        assert val["ids"].dtype.kind == "U" and val["labels"].dtype == np.int64 and val["probs"].dtype == np.float32
        assert val["probs"].shape == (TINY_COUNTS["val"], len(classes))
        assert list(val["ids"]) == sorted(val["ids"])
        np.testing.assert_allclose(val["probs"].sum(1), 1.0, atol=1e-5)
    with np.load(tiny_run / "predictions" / "test.npz", allow_pickle=False) as test:
        assert set(test.files) == {"ids", "probs"} and test["probs"].shape == (TINY_COUNTS["test"], 6)
        assert list(test["ids"]) == sorted(test["ids"])
    history = (tiny_run / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,learning_rate,loss,val_loss,val_accuracy,val_macro_f1,seconds"
    assert len(history) == 3
    for png in ("curves.png", "schedule.png"):
        assert (tiny_run / png).read_bytes()[:4] == b"\x89PNG"
    # export.runtimes = "litert": the pixel model converted, and the record of the SavedModel it was made from
    record = json.loads((tiny_run / "runtimes" / "litert.json").read_text())
    assert record["made_from"] == {"folder": "saved_model", "signature": "serving_pixels",
                                   "sha256": saved_model_digest(tiny_run / "saved_model")}
    assert record["sha256"] == sha256_file(tiny_run / "runtimes" / "model.tflite")
    assert sorted(p.name for p in (tiny_run / "runtimes").iterdir()) == ["litert.json", "model.tflite"]


PARITY_SCRIPT = textwrap.dedent("""
    # Imports nothing of the project: only TensorFlow and numpy.
    import sys, numpy as np, tensorflow as tf
    run, records = sys.argv[1], sys.argv[2:]
    model = tf.saved_model.load(run + "/saved_model")
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "id": tf.io.FixedLenFeature([], tf.string)}
    images, ids = [], []
    for raw in tf.data.TFRecordDataset(records):
        ex = tf.io.parse_single_example(raw, spec)
        images.append(ex["image"]); ids.append(ex["id"].numpy().decode())
    by_bytes = model.signatures["serving_default"](image_bytes=tf.stack(images))["probabilities"].numpy()
    # The contract's JPEG decode: the accurate integer IDCT (core.contract.JPEG_DCT).
    decoded = [tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE") for b in images]
    pixels = tf.stack([tf.image.resize(tf.cast(d, tf.float32), [32, 32]) for d in decoded])
    by_pixels = model.signatures["serving_pixels"](images=pixels)["probabilities"].numpy()
    order = np.argsort(ids)
    np.savez(run + "/parity.npz", ids=np.array(ids)[order], by_bytes=by_bytes[order], by_pixels=by_pixels[order])
""")


def test_the_saved_model_alone_reproduces_training_evaluation(tiny_run, tiny_data, tmp_path):
    # Evaluation inside training, without TTA, on the test images (stored at 32 px in the tiny data).
    from training.data.dataset import split_info

    model = build_classifier("small-cnn", 32, 6)
    model.load_weights(tiny_run / "checkpoints" / "best.weights.h5")
    info = split_info(str(tiny_data), "test", 32)
    ids, _, expected = predict_split(model, info, 32, 32, tta=1)
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tiny_run), *info.files], capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tiny_run / "parity.npz") as parity:
        assert list(parity["ids"]) == list(ids)
        assert np.abs(parity["by_bytes"] - expected).max() < 1e-4
        assert np.abs(parity["by_pixels"] - expected).max() < 1e-4


def test_the_saved_model_stores_its_weights_once(tiny_run):
    member = json.loads((tiny_run / "member.json").read_text())
    assert member["saved_model"]["bytes"] <= 1.1 * member["saved_model"]["weights_bytes"]


def test_the_saved_models_bytes_signature_treats_a_larger_record_as_a_photo(tiny_run, tiny_data):
    # A 48 px image sent to a member trained on 32 px records is a photo: made square at the record size with the
    # import tool's antialiased filter (imaging.geometry), not the pipeline's bilinear resize of a record.
    import tensorflow as tf

    from imaging.geometry import fit_square_tf
    from imaging.records import decode_jpeg, iter_records
    from training.data.dataset import split_info

    member = json.loads((tiny_run / "member.json").read_text())
    assert member["data"]["file_size"] == 32 and member["geometry"]["fit"] == "crop"
    info = split_info(str(tiny_data), "val", 32, file_size=48)  # 48 px records, a 32 px model
    saved = tf.saved_model.load(str(tiny_run / "saved_model"))
    blobs = [tf.train.Example.FromString(raw).features.feature["image"].bytes_list.value[0]
             for path in info.files for _, raw in iter_records(path)]
    got = saved.signatures["serving_default"](image_bytes=tf.constant(blobs))["probabilities"].numpy()
    pixels = [decode_jpeg(b, 48) for b in blobs]
    as_photos = tf.stack([fit_square_tf(p, 32, "crop") for p in pixels])
    expected = saved.signatures["serving_pixels"](images=as_photos)["probabilities"].numpy()
    assert np.abs(got - expected).max() < 1e-5
    # The check can fail: the pipeline's bilinear resize of the same images gives other probabilities.
    bilinear = tf.image.resize(tf.cast(tf.stack(pixels), tf.float32), [32, 32], method="bilinear")
    other = saved.signatures["serving_pixels"](images=bilinear)["probabilities"].numpy()
    assert np.abs(other - expected).max() > 1e-4


def test_class_weights_count_every_split_the_run_trains_on(tmp_path):
    import io as _io

    from PIL import Image

    from imaging.records import Record, write_split
    from training.fit.loop import class_counts, inverse_frequency_weights, prepare_run

    def jpeg(value):
        buffer = _io.BytesIO()
        Image.new("RGB", (16, 16), (value, value, value)).save(buffer, format="JPEG")
        return buffer.getvalue()

    layout = {"train": [0] * 6 + [1] * 2, "val": [1] * 4, "test": [None] * 2}
    for split, labels in layout.items():
        records = [Record(jpeg(10 * i), f"{split}{i}", label) for i, label in enumerate(labels)]
        write_split(str(tmp_path / "tfrecords-jpeg-16x16" / split), 16, records, 4)
    (tmp_path / "classes.json").write_text('["a", "b"]')
    settings = {"data.dir": str(tmp_path), "data.image_size": 16, "data.batch_size": 4, "train.class_weights": True,
                "output": str(tmp_path / "never-written")}
    alone = prepare_run(load_config(None, settings), log=lambda _: None)
    np.testing.assert_allclose(alone.class_weights, [8 / 12, 8 / 4])
    uniform, labels = np.full((2, 2), 0.5, np.float32), np.eye(2, dtype=np.float32)
    np.testing.assert_allclose(alone.loss(labels, uniform), np.log(2) * np.array([8 / 12, 8 / 4]), rtol=1e-5)
    both = prepare_run(load_config(None, {**settings, "data.train_on_val": True}), log=lambda _: None)
    assert [i.split for i in both.train_splits] == ["train", "val"] and both.steps == 3
    np.testing.assert_array_equal(class_counts(both.train_splits, 2), [6, 6])
    np.testing.assert_allclose(both.class_weights, [1.0, 1.0])
    # A class the splits never show counts 0 and weighs 0; a class seen once weighs n / C.
    np.testing.assert_array_equal(class_counts(alone.train_splits, 3), [6, 2, 0])
    np.testing.assert_allclose(inverse_frequency_weights(np.array([6, 1, 0])), [7 / 18, 7 / 3, 0.0])
    np.testing.assert_allclose(inverse_frequency_weights(np.array([2, 2, 0])), [2 / 3, 2 / 3, 0.0])
    assert not (tmp_path / "never-written").exists()


def test_prediction_files_hold_the_contracts_arrays_and_load_without_pickle(tmp_path):
    from training.fit.export import folder_bytes, weights_bytes, write_predictions

    ids, probs = np.array(["b7", "a1"]), np.array([[0.25, 0.75], [0.5, 0.5]])
    # ids as tf.data yields them (bytes) and 32-bit labels still become the contract's unicode ids and int64 labels
    path = write_predictions(tmp_path / "predictions" / "val.npz", [b"b7", b"a1"], probs, np.array([1, 0], np.int32))
    test = write_predictions(tmp_path / "predictions" / "test.npz", ids, probs)
    with np.load(path, allow_pickle=False) as saved:
        assert saved["ids"].dtype.kind == "U" and list(saved["ids"]) == ["b7", "a1"]
        assert saved["probs"].dtype == np.float32 and saved["labels"].dtype == np.int64
        np.testing.assert_array_equal(saved["labels"], [1, 0])
        np.testing.assert_allclose(saved["probs"], probs)
    with np.load(test, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["ids", "probs"]  # a test split has no labels
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["test.npz", "val.npz"]
    assert folder_bytes(tmp_path) == path.stat().st_size + test.stat().st_size
    model = build_classifier("small-cnn", 32, 3)
    assert weights_bytes(model) == sum(int(np.prod(w.shape)) * 4 for w in model.weights)


def test_a_second_export_replaces_the_saved_model_whole_and_leaves_nothing_beside_it(tmp_path):
    import keras
    import tensorflow as tf

    from training.fit.export import export_saved_model

    path = tmp_path / "saved_model"
    (tmp_path / ".saved_model.staging-0123456789abcdef").mkdir()  # left by an export that was killed
    (tmp_path / ".saved_model.staging-0123456789abcdef" / "junk").write_text("half-written")
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), tf.float32)
    answers = []
    for seed in (1, 2):  # a rerun (or a refit) exports over the first SavedModel
        keras.utils.set_random_seed(seed)
        model = build_classifier("small-cnn", 32, 3)
        export_saved_model(model, 32, path)
        answers.append(model(images, training=False).numpy())
        saved = tf.saved_model.load(str(path))
        loaded = saved.signatures["serving_pixels"](images=images)["probabilities"]
        np.testing.assert_allclose(loaded.numpy(), answers[-1], atol=1e-6)
        if seed == 1:  # no record size given: a photo of the model's size is read as it is, bytes or pixels
            square = tf.cast(tf.cast(images[:1], tf.uint8), tf.float32)
            png = tf.io.encode_png(tf.cast(square[0], tf.uint8))
            by_bytes = saved.signatures["serving_default"](image_bytes=png[None])
            np.testing.assert_allclose(by_bytes["probabilities"].numpy(), model(square, training=False).numpy(),
                                       atol=1e-5)
        assert not (path / "junk").exists()  # the killed export's half-written folder was cleared, not reused
        if seed == 1:  # an export killed just after its swap leaves the model before it beside the new one
            (tmp_path / ".saved_model.old-0123456789abcdef" / "variables").mkdir(parents=True)
            (tmp_path / ".saved_model.old-0123456789abcdef" / "variables" / "junk").write_text("the model before")
    assert np.abs(answers[0] - answers[1]).max() > 1e-4  # the second export really replaced the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]


def test_weights_written_on_a_full_disk_leave_the_previous_file_and_no_partial_one(tmp_path):
    import errno

    from training.fit.checkpoints import save_weights_atomic

    model = build_classifier("small-cnn", 16, 3)
    target = tmp_path / "best.weights.h5"
    save_weights_atomic(model, target)
    before = target.read_bytes()

    class FullDisk:
        weights: list = []

        def save_weights(self, path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError, match="No space left"):
        save_weights_atomic(FullDisk(), target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.weights.h5"]


def test_a_disk_too_full_for_the_weights_is_refused_before_h5py_writes(tmp_path, monkeypatch):
    # h5py crashes the whole process (segfault) when the disk fills in the middle of a weights file.
    import collections
    import shutil

    from training.fit.checkpoints import save_weights_atomic

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 200_000))
    with pytest.raises(OSError, match="No space left on device: writing weights needs about .* 200,000 free"):
        save_weights_atomic(build_classifier("small-cnn", 16, 3), tmp_path / "best.weights.h5")
    assert list(tmp_path.iterdir()) == []


def test_weights_are_saved_through_a_temporary_name(tmp_path):
    from training.fit.checkpoints import save_weights_atomic

    model = build_classifier("small-cnn", 16, 3)
    path = tmp_path / "deep" / "best.weights.h5"
    save_weights_atomic(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.weights.h5"]  # no temporary file left
    loaded = build_classifier("small-cnn", 16, 3)
    loaded.load_weights(path)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_written_files_honour_the_umask_like_a_plain_open(tmp_path):
    from core.files import write_text_atomic

    old = os.umask(0o022)
    try:
        assert (write_text_atomic(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (write_text_atomic(tmp_path / "b.json", "{}").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)

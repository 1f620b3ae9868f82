"""Training: registry, schedules, metrics, config, a whole tiny run, resume after a kill, export, TTA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from tests.conftest import REPO, TINY_COUNTS
from training.config import ScheduleConfig, load_config
from training.fit.evaluation import classification_scores
from training.fit.export import TTA_AUGMENT, predict_split
from training.fit.schedules import learning_rate
from training.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, get_backbone, list_backbones
from training.models.model import build_classifier, parameter_counts

TINY_RUN = [
    "--set", "data.image_size=32", "--set", "data.batch_size=16", "--set", "train.epochs=2",
    "--set", "train.eval_batch_size=32", "--set", "predict.tta=2", "--set", "data.deterministic=true",
]


KILLED_RUN = textwrap.dedent("""
    # Train with the given overrides and SIGKILL this process right after epoch N's checkpoint.
    import os, signal, sys
    from training.config import load_config
    from training.config_values import parse_assignments
    from training.fit.loop import train_member
    kill_after, overrides = int(sys.argv[1]), sys.argv[2:]
    config = load_config(None, parse_assignments([a for a in overrides if a != "--set"]))
    train_member(config, after_epoch=lambda n: os.kill(os.getpid(), signal.SIGKILL) if n == kill_after else None)
""")


def _train(data: Path, out: Path, *extra: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """Run the train command in a fresh process (as a user would), or one killed after an epoch."""
    overrides = ["--set", f"data.dir={data}", "--set", f"output={out}", "--set", "name=tiny", *TINY_RUN, *extra]
    command = [sys.executable, "-m", "flower", "train", *overrides]
    if kill_after is not None:
        command = [sys.executable, "-c", KILLED_RUN, str(kill_after), *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A whole two-epoch run of the small CNN at 32 px on the tiny demo data."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = _train(tiny_data, out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


# --- registry ---------------------------------------------------------------------------------

SMALL_BUILDS = ["small-cnn", "efficientnet-b0", "efficientnetv2-b0", "densenet121", "resnet50v2"]


@pytest.mark.parametrize("name", SMALL_BUILDS)
def test_registered_backbones_build_small_and_classify(name):
    model = build_classifier(name, 32, 5, dropout=0.1)
    probs = model.predict_on_batch(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    assert probs.shape == (2, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_the_registry_lists_every_family():
    names = list_backbones()
    for expected in ("efficientnet-b0", "efficientnet-b7", "efficientnetv2-s", "densenet201", "xception",
                     "resnet50v2", "inceptionresnetv2", "small-cnn"):
        assert expected in names
    assert list_backbones("efficientnet-b*") == [f"efficientnet-b{i}" for i in range(8)]
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'; known:"):
        get_backbone("resnet9")


@pytest.mark.parametrize("name,mode", [("efficientnet-b0", "torch"), ("densenet121", "torch"),
                                       ("xception", "tf"), ("resnet50v2", "tf"), ("small-cnn", "unit")])
def test_each_backbone_carries_its_own_preprocessing(name, mode):
    assert get_backbone(name).preprocessing == mode
    size = 75 if name == "xception" else 32
    features = build_backbone(name, size)
    last_pre = {"torch": "imagenet_normalize", "tf": "scale_to_pm1", "unit": "scale_to_unit"}[mode]
    pre = keras.Model(features.input, features.get_layer(last_pre).output)
    pixels = np.zeros((1, size, size, 3), np.float32)
    pixels[0, 0, 0] = [255.0, 127.5, 0.0]
    value = np.asarray(pre(pixels))[0, 0, 0]
    expected = {
        "torch": (np.array([1.0, 0.5, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD,
        "tf": np.array([1.0, 0.0, -1.0]),
        "unit": np.array([1.0, 0.5, 0.0]),
    }[mode]
    np.testing.assert_allclose(value, expected, atol=1e-5)


def test_efficientnetv2_rescales_inside_the_keras_model():
    assert get_backbone("efficientnetv2-b0").preprocessing == "builtin"
    features = build_backbone("efficientnetv2-b0", 32)
    assert any("rescaling" in layer.name for layer in features.layers[-1].layers[:5])


def test_trainable_parts_and_frozen_batch_norm():
    whole = parameter_counts(build_classifier("efficientnet-b0", 32, 5, trainable="all"))
    head = parameter_counts(build_classifier("efficientnet-b0", 32, 5, trainable="head"))
    last = parameter_counts(build_classifier("efficientnet-b0", 32, 5, trainable="last:3"))
    assert head["trainable"] == 1280 * 5 + 5
    assert head["trainable"] < last["trainable"] < whole["trainable"]
    assert whole["trainable"] + whole["frozen"] == head["trainable"] + head["frozen"]
    model = build_classifier("efficientnet-b0", 32, 5, trainable="head")
    core = model.layers[1].layers[-1]
    bn = [layer for layer in core.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    x = np.random.default_rng(1).normal(size=(4, *bn.input.shape[1:])).astype(np.float32)
    np.testing.assert_allclose(bn(x, training=True), bn(x, training=False), atol=1e-5)  # inference mode
    with pytest.raises(ValueError, match="trainable must be 'all', 'head' or 'last:N'"):
        build_classifier("small-cnn", 32, 5, trainable="some")


def test_asking_for_downloaded_weights_offline_says_how_to_pass_a_file(monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    from training.models.backbones import WeightsUnavailable

    with pytest.raises(WeightsUnavailable, match="local file: --set model.weights="):
        build_classifier("efficientnet-b0", 32, 5, weights="noisy-student")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_classifier("efficientnet-b0", 32, 5, weights="/nowhere/b0.h5")


def test_a_local_weights_file_is_loaded(tmp_path):
    source = build_backbone("small-cnn", 32).layers[-1]
    path = tmp_path / "cnn.weights.h5"
    source.save_weights(path)
    model = build_classifier("small-cnn", 32, 3, weights=str(path))
    np.testing.assert_array_equal(model.layers[1].layers[-1].weights[0].numpy(), source.weights[0].numpy())


# --- schedules, metrics, config ----------------------------------------------------------------

def test_rampup_sustain_decay_values():
    config = ScheduleConfig(kind="rampup", start=1e-5, max=5e-5, min=1e-5, rampup_epochs=5, sustain_epochs=2,
                            decay=0.8)
    values = [learning_rate(config, e, 12, replicas=8) for e in range(10)]
    assert values[0] == pytest.approx(1e-5)
    assert values[5] == values[6] == pytest.approx(4e-4)  # max scaled by 8 replicas
    assert values[2] == pytest.approx(1e-5 + (4e-4 - 1e-5) * 2 / 5)
    assert values[8] == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.8**1)


def test_cosine_and_constant_values():
    config = ScheduleConfig(kind="cosine", start=0.0, max=1.0, min=0.0, warmup_epochs=2)
    values = [learning_rate(config, e, 10) for e in range(10)]
    assert values[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert values[6] == pytest.approx(0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert learning_rate(ScheduleConfig(kind="constant", max=0.3), 7, 10, 2) == pytest.approx(0.6)


def test_macro_f1_over_the_whole_split_matches_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 500)
    probs = rng.dirichlet(np.ones(7), 500)
    scores = classification_scores(labels, probs)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert scores["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())


def test_config_overrides_and_errors_name_the_option(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[data]\nimage_size = 48\n[augment]\nrotation = 3\n')
    config = load_config(path, {"train.epochs": 3, "augment.cutmix_prob": 0.5})
    assert (config.data.image_size, config.train.epochs, config.augment.rotation, config.augment.cutmix_prob) == (
        48, 3, 3.0, 0.5)
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['train.epoch'\\]"):
        load_config(path, {"train.epoch": 3})
    with pytest.raises(ValueError, match="train.epochs: expected int, got '3'"):
        load_config(path, {"train.epochs": "3"})
    with pytest.raises(ValueError, match="schedule.kind must be"):
        load_config(None, {"schedule.kind": "linear"})
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_help_explains_every_option():
    result = subprocess.run([sys.executable, "-m", "flower", "train", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0
    for option in ("image_size", "batch_size", "backbone", "trainable", "rampup_epochs", "label_smoothing",
                   "mixed_precision", "tta", "cutmix_prob", "fill_mode"):
        assert option in result.stdout
    assert "per replica" in result.stdout and "imagenet | noisy-student | none" in result.stdout


# --- a whole run --------------------------------------------------------------------------------

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


def _weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a Keras .weights.h5 file by its path inside the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_a_killed_run_resumes_exactly_where_it_stopped(tiny_data, tiny_run, tmp_path):
    out = tmp_path / "killed"
    first = _train(tiny_data, out, kill_after=1)
    assert first.returncode == -9  # SIGKILL right after epoch 1's checkpoint
    assert json.loads((out / "checkpoints" / "epoch-0001" / "state.json").read_text())["epoch"] == 1
    assert not (out / "member.json").exists()
    second = _train(tiny_data, out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch 1" in second.stdout
    assert "epoch 1/2:" not in second.stdout and "epoch 2/2:" in second.stdout
    epochs = [line.split(",")[0] for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]
    # The resumed run is the uninterrupted one: same weights, optimizer state, history and predictions.
    resumed = _weights(out / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    whole = _weights(tiny_run / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert resumed.keys() == whole.keys() and len(resumed) > 4
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    assert any("optimizer" in name for name in whole)  # the weights file holds the optimizer's moments too
    losses = [[row.split(",")[2:6] for row in (run / "history.csv").read_text().splitlines()[1:]]
              for run in (out, tiny_run)]
    assert losses[0] == losses[1]
    for split in ("val", "test"):
        with np.load(out / "predictions" / f"{split}.npz") as a, \
                np.load(tiny_run / "predictions" / f"{split}.npz") as b:
            np.testing.assert_array_equal(a["probs"], b["probs"])


NAN_RUN = textwrap.dedent("""
    # The train command with a loss that turns NaN at epoch 2 (as a too-high learning rate would).
    import sys
    import tensorflow as tf
    import training.fit.loop as fit
    from flower.commands.train import main
    made = fit.make_loss
    def make_loss(config, weights):
        loss = made(config, weights)
        step = tf.Variable(0.0)
        def poisoned(y, p):
            step.assign_add(1.0)
            return loss(y, p) * tf.where(step > 3.0, float("nan"), 1.0)  # 3 steps per epoch
        return poisoned
    fit.make_loss = make_loss
    sys.exit(main(sys.argv[1:]))
""")


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_epoch(tiny_data, tmp_path):
    out = tmp_path / "nan"
    result = subprocess.run([sys.executable, "-c", NAN_RUN, "--set", f"data.dir={tiny_data}", "--set", f"output={out}",
                             *TINY_RUN], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: epoch 2: the training loss is nan: stopping before this epoch is saved (the checkpoint of " \
           "epoch 1 stands)" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.weights.h5", "epoch-0001"]
    assert not (out / "member.json").exists() and not (out / "saved_model").exists()
    assert not (out / "predictions").exists()


def test_a_truncated_training_file_is_named_not_a_graph_error(data_with_a_cut_record, tmp_path):
    data, train_file = data_with_a_cut_record
    result = _train(data, tmp_path / "out")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {train_file}: record 19 is corrupt" in result.stderr and "Traceback" not in result.stderr


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


def test_written_files_honour_the_umask_like_a_plain_open(tmp_path):
    from core.files import write_text_atomic

    old = os.umask(0o022)
    try:
        assert (write_text_atomic(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (write_text_atomic(tmp_path / "b.json", "{}").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_bad_data_fails_with_a_clear_message(tmp_path):
    result = _train(tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 2
    assert "error: data folder not found" in result.stderr and "Traceback" not in result.stderr


# --- test-time augmentation ------------------------------------------------------------------

class RecordingModel:
    """Stands in for a Keras model: records the batches it is asked to predict."""

    def __init__(self):
        self.batches = []

    def predict(self, dataset, verbose=0):
        outputs = []
        for images in dataset.as_numpy_iterator():
            self.batches.append(images)
            # A deliberately non-symmetric score, so flipped inputs change the output.
            score = images[:, :, : images.shape[2] // 2].mean(axis=(1, 2, 3))
            outputs.append(np.stack([score, 255.0 - score], axis=1) / 255.0)
        return np.concatenate(outputs)


def test_tta_feeds_really_augmented_images_and_changes_predictions(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    plain, tta = RecordingModel(), RecordingModel()
    _, _, p1 = predict_split(plain, info, 32, 24, tta=1)
    _, _, p3 = predict_split(tta, info, 32, 24, tta=3)
    assert len(tta.batches) == 3 * len(plain.batches)
    passes = len(plain.batches)
    original, first_aug, second_aug = tta.batches[0], tta.batches[passes], tta.batches[2 * passes]
    assert np.abs(first_aug - original).mean() > 1.0 and np.abs(second_aug - first_aug).mean() > 1.0
    assert np.abs(p3 - p1).max() > 1e-3
    assert TTA_AUGMENT.erase_prob == 0 and not TTA_AUGMENT.mixes_batches


def test_tta_is_reproducible(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    a = predict_split(RecordingModel(), info, 32, 24, tta=3)[2]
    b = predict_split(RecordingModel(), info, 32, 24, tta=3)[2]
    np.testing.assert_array_equal(a, b)


class BrokenModel(RecordingModel):
    """A RecordingModel whose answer is damaged: NaN in one row, or one row too few."""

    def __init__(self, damage: str):
        super().__init__()
        self.damage = damage

    def predict(self, dataset, verbose=0):
        probs = super().predict(dataset, verbose)
        if self.damage == "nan":
            probs[1, 0] = np.nan
            return probs
        return probs[:-1]


def test_predict_split_pads_every_batch_and_returns_each_image_once_in_id_order(tiny_data):
    import tensorflow as tf

    from imaging.records import decode_jpeg, iter_records
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    model = RecordingModel()
    ids, labels, probs = predict_split(model, info, 32, 7, tta=1)  # batches of 7: the last one is short
    assert labels.dtype == np.int64 and probs.dtype == np.float32
    assert all(batch.shape[0] == 7 for batch in model.batches)  # one shape: padded to the batch size
    assert len(ids) == info.count == len(probs) == len(labels) and list(ids) == sorted(ids)
    assert len(set(ids)) == len(ids)
    # Each row belongs to its own image: the model's score of that image, renormalised.
    by_id = {}
    for path in info.files:
        for _, raw in iter_records(path):
            feature = tf.train.Example.FromString(raw).features.feature
            pixels = decode_jpeg(feature["image"].bytes_list.value[0], 32).numpy().astype(np.float32)
            by_id[feature["id"].bytes_list.value[0].decode()] = pixels[:, :16].mean() / 255.0
    np.testing.assert_allclose(probs[:, 0], [by_id[i] for i in ids], atol=1e-5)


@pytest.mark.parametrize("damage,error,text", [
    ("nan", ValueError, "predictions for split 'val' are not finite .*: nothing is written from them"),
    ("short", RuntimeError, "the model returned {n} predictions for the {m} images of split 'val'")])
def test_predict_split_refuses_a_damaged_answer(tiny_data, damage, error, text):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    padded = -(-info.count // 7) * 7  # every batch is padded to 7 rows
    with pytest.raises(error, match=text.format(n=padded - 1, m=info.count)):
        predict_split(BrokenModel(damage), info, 32, 7, tta=1)


class UnnormalisedModel(RecordingModel):
    """Rows that do not sum to 1 (twice a distribution), as a float16 model's may not."""

    def predict(self, dataset, verbose=0):
        return 2.0 * super().predict(dataset, verbose)


def test_predict_split_defaults_normalises_rows_and_reads_unlabelled_splits(tiny_data):
    from training.data.dataset import split_info

    info = split_info(str(tiny_data), "val", 32)
    model = RecordingModel()
    ids, labels, probs = predict_split(model, info, 32, 7)  # default: one pass
    assert len(model.batches) == -(-info.count // 7) and probs.dtype == np.float32
    np.testing.assert_allclose(predict_split(UnnormalisedModel(), info, 32, 7)[2], probs, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # The TTA passes' default seed is 1.
    np.testing.assert_array_equal(predict_split(RecordingModel(), info, 32, 7, tta=2)[2],
                                  predict_split(RecordingModel(), info, 32, 7, tta=2, seed=1)[2])
    assert np.abs(predict_split(RecordingModel(), info, 32, 7, tta=2, seed=2)[2]
                  - predict_split(RecordingModel(), info, 32, 7, tta=2)[2]).max() > 1e-6
    test = split_info(str(tiny_data), "test", 32)
    test_ids, test_labels, test_probs = predict_split(RecordingModel(), test, 32, 7)
    assert test_labels is None and len(test_ids) == test.count == len(test_probs)
    # With the number of classes given, a label out of range is named, not predicted on.
    with pytest.raises(Exception, match="class label out of range"):
        predict_split(RecordingModel(), info, 32, 7, num_classes=1)


# --- losses --------------------------------------------------------------------------------------

def test_focal_loss_discounts_easy_examples_and_class_weights_scale_the_loss():
    from training.config import RunConfig, TrainConfig
    from training.fit.loop import make_loss

    y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    easy = np.array([[0.95, 0.05], [0.1, 0.9]], np.float32)
    cce = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.0)), None)
    focal = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=2.0, label_smoothing=0.0)), None)
    assert np.asarray(cce(y, easy)).shape == (2,)  # one value per example: Keras averages and scales per replica
    np.testing.assert_allclose(cce(y, easy), [-np.log(0.95), -np.log(0.9)], rtol=1e-5)
    assert np.all(np.asarray(focal(y, easy)) < 0.1 * np.asarray(cce(y, easy)))
    weighted = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.0)), np.array([3.0, 1.0]))
    np.testing.assert_allclose(weighted(y, easy), [3 * -np.log(0.95), -np.log(0.9)], rtol=1e-5)
    # Label smoothing 0.2 over 2 classes aims at 0.9 / 0.1; focal loss is (1 - p)^gamma times cross-entropy.
    smooth = make_loss(RunConfig(train=TrainConfig(loss="cce", label_smoothing=0.2)), None)
    np.testing.assert_allclose(smooth(y, easy), [-(0.9 * np.log(0.95) + 0.1 * np.log(0.05)),
                                                 -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))], rtol=1e-5)
    gamma_1 = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=1.0, label_smoothing=0.0)), None)
    focal_values = np.asarray(gamma_1(y, easy))
    assert focal_values.shape == (2,)  # per example, like the cross-entropy
    np.testing.assert_allclose(focal_values, 0.25 * np.array([0.05 * -np.log(0.95), 0.1 * -np.log(0.9)]), rtol=1e-4)
    smooth_focal = make_loss(RunConfig(train=TrainConfig(loss="focal", focal_gamma=1.0, label_smoothing=0.2)), None)
    assert not np.allclose(smooth_focal(y, easy), focal_values)


REPLICA_STEP = textwrap.dedent("""
    # One SGD step of the small CNN's head (backbone frozen: batch norm in inference mode) on one global
    # batch of 16, under FLOWER_CPU_REPLICAS replicas, for each loss option; weights and loss to a file.
    import os, sys, numpy as np
    import keras, tensorflow as tf
    from training.config import RunConfig, TrainConfig
    from training.fit.loop import make_loss
    from training.models.model import build_classifier
    from training.fit.strategy import detect_strategy
    strategy, _ = detect_strategy(lambda _: None)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    options = {"cce": (TrainConfig(label_smoothing=0.0), None), "smoothing": (TrainConfig(label_smoothing=0.2), None),
               "focal": (TrainConfig(loss="focal", label_smoothing=0.0), None),
               "class_weights": (TrainConfig(label_smoothing=0.0), np.array([0.5, 1.0, 3.0]))}
    out = {"replicas": strategy.num_replicas_in_sync}
    for name, (train, weights) in options.items():
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = build_classifier("small-cnn", 16, 3, dropout=0.0, trainable="head")
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=make_loss(RunConfig(train=train), weights))
        before = model.get_layer("probabilities").kernel.numpy()
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
        out[name + "_loss"] = history.history["loss"][0]
        out[name + "_step"] = model.get_layer("probabilities").kernel.numpy() - before
    np.savez(sys.argv[1], **out)
""")


def test_one_step_on_two_and_four_replicas_equals_one_replica_for_every_loss(tmp_path):
    results = {}
    for replicas in (1, 2, 4):
        path = tmp_path / f"r{replicas}.npz"
        run = subprocess.run([sys.executable, "-c", REPLICA_STEP, str(path)], cwd=REPO, capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLOWER_CPU_REPLICAS": str(replicas)})
        assert run.returncode == 0, run.stderr[-2000:]
        results[replicas] = dict(np.load(path))
        assert int(results[replicas]["replicas"]) == replicas
    for name in ("cce", "smoothing", "focal", "class_weights"):
        step = results[1][name + "_step"]
        assert np.abs(step).max() > 1e-3  # the step moved the weights
        for replicas in (2, 4):
            np.testing.assert_allclose(results[replicas][name + "_step"], step, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} on {replicas} replicas")
            assert float(results[replicas][name + "_loss"]) == pytest.approx(float(results[1][name + "_loss"]),
                                                                             rel=1e-5)


# The whole trainer with the same global batch (16) and learning rate however the work is split: the
# per-replica batch is 16 / N and schedule.max is divided by N (the schedule scales it back up). Batch
# norm frozen and no dropout: those two are per-replica by design. Augmentation with MixUp, focal loss
# and class weights stay on: the pipeline augments the global batch before it is split, so every
# replica gets its own transforms. Several eval batches, uneven among 2 or 4 replicas, short last ones.
EQUIVALENT_RUN = ["--set", "model.batch_norm=frozen", "--set", "model.dropout=0", "--set", "train.loss=focal",
                  "--set", "train.class_weights=true", "--set", "augment.mixup_prob=0.5",
                  "--set", "schedule.kind=constant", "--set", "train.eval_batch_size=7", "--set", "data.shard=data"]


def _split_command(data: Path, out: Path, replicas: int, *extra: str, killed_after: int | None = None) -> list[str]:
    """The train command of EQUIVALENT_RUN for one of `replicas` equal shares of the global batch."""
    overrides = ["--set", f"data.dir={data}", "--set", f"output={out}", *TINY_RUN, *EQUIVALENT_RUN,
                 "--set", f"data.batch_size={16 // replicas}", "--set", f"schedule.max={4e-3 / replicas}", *extra]
    if killed_after is not None:
        return [sys.executable, "-c", KILLED_RUN, str(killed_after), *overrides]
    return [sys.executable, "-m", "flower", "train", *overrides]


@pytest.fixture(scope="module")
def one_replica_run(tiny_data, tmp_path_factory) -> Path:
    """EQUIVALENT_RUN on one replica: what several replicas or workers must reproduce."""
    out = tmp_path_factory.mktemp("one_replica") / "run"
    result = subprocess.run(_split_command(tiny_data, out, 1), cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    history = _history(out)
    assert abs(history[1][1] - history[0][1]) > 1e-3  # it trained: the loss moved between the epochs
    return out


def _history(run: Path) -> list[list[float]]:
    """Learning rate, loss, val loss, val accuracy and val macro F1 of each epoch."""
    return [[float(v) for v in row.split(",")[1:6]] for row in (run / "history.csv").read_text().splitlines()[1:]]


def _assert_same_training(run: Path, reference: Path, what: str) -> None:
    """The same history, final weights and val/test predictions (with TTA) as the reference run."""
    np.testing.assert_allclose(_history(run), _history(reference), rtol=2e-4, atol=1e-5, err_msg=what)
    weights = _weights(run / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    expected = _weights(reference / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert weights.keys() == expected.keys()
    for name in expected:
        if "optimizer" not in name:
            np.testing.assert_allclose(weights[name], expected[name], rtol=1e-3, atol=1e-5, err_msg=f"{name}: {what}")
    for split in ("val", "test"):
        with np.load(run / "predictions" / f"{split}.npz") as a, \
                np.load(reference / "predictions" / f"{split}.npz") as b:
            np.testing.assert_array_equal(a["ids"], b["ids"])
            np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-4, err_msg=f"{split}: {what}")


@pytest.mark.parametrize("replicas", [2, 4])
def test_two_epochs_on_several_replicas_equal_one_replica(tiny_data, one_replica_run, tmp_path, replicas):
    out = tmp_path / "run"
    result = subprocess.run(_split_command(tiny_data, out, replicas), cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                              "FLOWER_CPU_REPLICAS": str(replicas)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{replicas} replica(s)" in result.stdout and "global batch 16," in result.stdout
    _assert_same_training(out, one_replica_run, f"{replicas} replicas")


def _free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_workers(data: Path, out: Path, logs: Path, scratch: Path, killed: int | None = None,
                   extra: tuple[str, ...] = ()) -> list:
    """Two worker processes of one multi-worker run (TF_CONFIG on 127.0.0.1); worker `killed` dies after epoch 1;
    worker 1 gets the `extra` options too."""
    ports = _free_ports(2)
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}}
        log = open(logs / f"worker{index}.log", "w")  # noqa: SIM115 (closed when the process is reaped)
        command = _split_command(data, out, 2, *(extra if index == 1 else ()),
                                 killed_after=1 if index == killed else None)
        workers.append((subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={
            **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch)}),
            log))
    return workers


def _wait(workers: list, timeout: float) -> list[int]:
    """Exit codes of the workers; all are killed if they outlast `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    codes = []
    for process, log in workers:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other, _ in workers:
                other.kill()
            codes.append(process.wait())
        log.close()
    return codes


def test_two_worker_processes_train_like_one_and_resume_after_a_kill(tiny_data, one_replica_run, tmp_path):
    # Two MultiWorkerMirroredStrategy workers on 127.0.0.1, one replica each, data sharded by data.
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    logs.mkdir()
    scratch.mkdir()
    out = tmp_path / "run"
    codes = _wait(_start_workers(tiny_data, out, logs, scratch), 420)
    assert codes == [0, 0], (logs / "worker0.log").read_text()[-3000:] + (logs / "worker1.log").read_text()[-3000:]
    chief, other = ((logs / f"worker{i}.log").read_text() for i in range(2))
    assert "Strategy (multi-worker), 2 replica(s)" in chief
    assert "data sharding: by data over 2 workers" in chief and "global batch 16," in chief
    assert "worker 1 (not the chief): writes go to" in other and "worker 0 (not the chief)" not in chief
    assert [p for p in scratch.iterdir() if p.name.startswith("flower-")] == []  # the other worker removed its folder
    _assert_same_training(out, one_replica_run, "two workers")
    reference = sorted(p.relative_to(one_replica_run) for p in one_replica_run.rglob("*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == reference  # the chief wrote one run directory

    # Worker 1 is killed right after epoch 1; the chief, stuck at the next collective step, is killed too.
    resumed = tmp_path / "resumed"
    workers = _start_workers(tiny_data, resumed, logs, scratch, killed=1)
    assert workers[1][0].wait(timeout=420) == -9
    state = resumed / "checkpoints" / "epoch-0001" / "state.json"
    import time

    deadline = time.monotonic() + 60
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state.exists(), (logs / "worker0.log").read_text()[-3000:]
    workers[0][0].kill()
    _wait(workers, 60)
    assert not (resumed / "member.json").exists()
    assert _wait(_start_workers(tiny_data, resumed, logs, scratch), 420) == [0, 0], \
        (logs / "worker0.log").read_text()[-3000:]
    for index in range(2):
        text = (logs / f"worker{index}.log").read_text()
        assert "resuming after epoch 1" in text and "epoch 1/2:" not in text and "epoch 2/2:" in text
    _assert_same_training(resumed, one_replica_run, "two workers, resumed after a kill")
    assert [p for p in scratch.iterdir() if p.name.startswith("flower-")] == []  # cleared what the killed one left


def test_workers_started_with_different_configs_refuse_together(tiny_data, tmp_path):
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    logs.mkdir()
    scratch.mkdir()
    workers = _start_workers(tiny_data, tmp_path / "run", logs, scratch, extra=("--set", "train.seed=1"))
    assert _wait(workers, 300) == [2, 2]  # both stop, neither hangs nor trains
    for index in range(2):
        text = (logs / f"worker{index}.log").read_text()
        assert "error: the workers disagree on the config" in text and "epoch 1/2:" not in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_replica_setting_is_named(monkeypatch):
    from training.fit.strategy import cpu_replicas_requested

    for value in ("two", "-1", "0", "100"):
        monkeypatch.setenv("FLOWER_CPU_REPLICAS", value)
        with pytest.raises(ValueError, match="FLOWER_CPU_REPLICAS must be a whole number from 1 to 64"):
            cpu_replicas_requested()
    monkeypatch.setenv("FLOWER_CPU_REPLICAS", "3")
    assert cpu_replicas_requested() == 3


def test_mixed_precision_auto_follows_the_device_and_is_logged():
    from training.fit.strategy import set_precision

    cases = [("auto", "tpu", [], "mixed_bfloat16"), ("auto", "gpu", [(8, 0)], "mixed_bfloat16"),
             ("auto", "gpu", [(9, 0), (7, 5)], "mixed_float16"),  # the oldest GPU decides
             ("auto", "multi-worker", [(8, 6)], "mixed_bfloat16"), ("auto", "cpu", [], "float32"),
             ("auto", "multi-worker", [], "float32"), ("float16", "gpu", [(8, 0)], "mixed_float16"),
             ("bfloat16", "cpu", [], "float32"), ("off", "tpu", [], "float32")]
    try:
        for setting, kind, capabilities, expected in cases:
            lines = []
            assert set_precision(setting, kind, lines.append, capabilities) == expected, (setting, kind, capabilities)
            assert keras.mixed_precision.global_policy().name == expected
            assert lines[-1].startswith(f"precision policy: {expected} (")
        lines = []
        set_precision("auto", "gpu", lines.append, [(7, 0)])
        assert "compute capability 7.0 < 8.0: float16 with loss scaling" in lines[-1]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_data_sharding_among_workers_is_by_file_when_the_shares_are_even_else_by_data_with_a_warning():
    from training.fit.strategy import shard_policy

    lines = []
    assert shard_policy("auto", 1, [20], lines.append) == "off" and lines == []  # one worker: nothing to split
    assert shard_policy("auto", 2, [20, 20, 20, 19], lines.append) == "file" and "warning" not in " ".join(lines)
    assert lines[-1] == "data sharding: by file over 2 workers (4 training record files)"
    lines.clear()
    assert shard_policy("auto", 4, [20, 20, 20], lines.append) == "data"
    assert lines[0].startswith("warning: 3 training record file(s) for 4 workers, too few")
    lines.clear()
    assert shard_policy("auto", 2, [20, 20, 20], lines.append) == "data"  # 40 records for one worker, 20 for the other
    assert lines[0].startswith("warning: the workers' shares of the training files would hold 20 to 40 records")
    lines.clear()
    assert shard_policy("file", 2, [20, 20, 20], lines.append) == "file"
    assert lines[0].startswith("warning: data.shard=file gives the workers 20 to 40 records each")
    assert shard_policy("data", 2, [8] * 8, lines.append) == "data"
    with pytest.raises(ValueError, match="data.shard=file needs at least one record file per worker: 1 file"):
        shard_policy("file", 2, [20], lines.append)


def test_a_resume_on_another_precision_is_refused_and_on_another_replica_count_warned():
    from dataclasses import replace
    from types import SimpleNamespace

    from training.fit.checkpoints import EpochState
    from training.fit.loop import check_resumed_setup

    lines = []
    state = EpochState(epoch=2, best_f1=0.5, history=[], precision="mixed_float16", replicas=8)
    with pytest.raises(ValueError, match="trained with precision policy mixed_float16 and this device picks float32.*"
                                         "train.mixed_precision=float16"):
        check_resumed_setup(replace(state), SimpleNamespace(policy="float32", replicas=8), lines.append)
    resumed = replace(state)
    check_resumed_setup(resumed, SimpleNamespace(policy="mixed_float16", replicas=2), lines.append)
    assert lines == ["warning: the checkpoint was trained on 8 replica(s), this run has 2: the global batch, the "
                     "steps per epoch and the learning rate scale change from here on"]
    assert resumed.replicas == 2  # what the next checkpoint records
    same = replace(state)
    check_resumed_setup(same, SimpleNamespace(policy="mixed_float16", replicas=8), lines.append)
    assert len(lines) == 1 and same == state  # the same precision and replica count: nothing to say
    with pytest.raises(ValueError, match="trained with precision policy float32 and this device picks mixed_bfloat16: "
                                         "the optimizer state would not load; resume with --set "
                                         "train.mixed_precision=off$"):
        check_resumed_setup(replace(state, precision="float32", replicas=1),
                            SimpleNamespace(policy="mixed_bfloat16", replicas=1), lines.append)
    fresh = EpochState.fresh("float32", 1)  # a run with no checkpoint: its own setup, nothing to say
    check_resumed_setup(fresh, SimpleNamespace(policy="float32", replicas=1), lines.append)
    assert len(lines) == 1 and fresh == EpochState.fresh("float32", 1)


def test_the_chief_is_named_by_tf_config(monkeypatch):
    from training.fit.strategy import this_task, worker_count, worker_index

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert this_task() == (True, "chief") and worker_count() == 1
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for task, expected in [({"type": "worker", "index": 0}, True), ({"type": "worker", "index": 1}, False)]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert this_task()[0] is expected and worker_count() == 2 and worker_index() == task["index"]
    with_chief = {**cluster, "chief": ["127.0.0.1:3"], "evaluator": ["127.0.0.1:4"], "ps": ["127.0.0.1:5"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    assert this_task() == (False, "worker 0") and worker_count() == 3 and worker_index() == 1  # evaluator, ps: no
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    assert this_task() == (True, "chief 0") and worker_index() == 0
    for task in ({"type": "ps", "index": 0}, {"type": "worker", "index": 2}, {"type": "worker", "index": True},
                 {"type": "worker", "index": -1}, {"type": "worker"}, "worker"):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        with pytest.raises(ValueError, match="TF_CONFIG 'task' must name type 'chief' or 'worker' and an index"):
            this_task()
    for bad in ('{"cluster": ["127.0.0.1:1"]}', '{"cluster": {"worker": "127.0.0.1:1"}}', "not json", "[]"):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ValueError, match='TF_CONFIG must be a JSON object whose "cluster" maps task types'):
            worker_count()


def test_an_output_that_is_not_a_local_folder_is_refused():
    with pytest.raises(ValueError, match="output must be a local folder .* got 'gs://bucket/run'"):
        load_config(None, {"output": "gs://bucket/run"})


def test_a_checkpoint_of_another_model_is_refused_with_advice(tiny_data, tiny_run, tmp_path):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(tiny_run / "checkpoints", out / "checkpoints")
    result = _train(tiny_data, out, "--set", "model.backbone=efficientnet-b0")
    assert result.returncode == 2
    assert "model.backbone: 'small-cnn' -> 'efficientnet-b0'" in result.stderr
    (out / "checkpoints" / "epoch-0002" / "config.json").unlink()  # a checkpoint that does not say its config
    result = _train(tiny_data, out, "--set", "model.backbone=efficientnet-b0")
    assert result.returncode == 2
    assert "does not fit this model" in result.stderr and f"remove {out / 'checkpoints'}" in result.stderr


def test_a_checkpoint_restores_weights_optimizer_state_and_the_epoch(tmp_path):
    from training.fit.checkpoints import EpochState
    from training.fit.loop import load_checkpoint, save_checkpoint

    def model_and_optimizer(seed):
        keras.utils.set_random_seed(seed)
        model = build_classifier("small-cnn", 16, 3, dropout=0.0)
        optimizer = keras.optimizers.AdamW(learning_rate=1e-2)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        return model, optimizer

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    trained, optimizer = model_and_optimizer(1)
    trained.fit(x, y, epochs=2, batch_size=4, verbose=0)
    row = {"epoch": 1, "learning_rate": 0.01, "loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5, "val_macro_f1": 0.5,
           "seconds": 1.0}
    saved = EpochState(epoch=2, best_f1=0.5, history=[row], precision="float32", replicas=1)
    save_checkpoint(tmp_path, trained, optimizer, saved, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]
    fresh, fresh_optimizer = model_and_optimizer(2)
    logs = []
    state = load_checkpoint(tmp_path, fresh, fresh_optimizer, logs.append)
    assert state == saved
    assert logs == ["resuming after epoch 2 (best validation macro F1 so far 0.5000)"]
    for a, b in zip(trained.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(fresh_optimizer.iterations.numpy()) == 4
    for a, b in zip(optimizer.variables, fresh_optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # One more step from the restored state equals one more step of the original.
    trained.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    fresh.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(trained.weights, fresh.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    assert load_checkpoint(tmp_path / "none", fresh, fresh_optimizer, logs.append) is None


def test_every_epoch_sees_its_own_data_and_dropout_seeds():
    from training.fit.loop import epoch_seed, reseed_layers

    seeds = {epoch_seed(0, e) for e in range(50)} | {epoch_seed(1, e) for e in range(50)}
    assert len(seeds) == 100 and epoch_seed(3, 7) == epoch_seed(3, 7)
    model = build_classifier("small-cnn", 16, 3, dropout=0.5)
    x = np.full((1, 16, 16, 3), 100.0, np.float32)

    def masks():
        return [model(x, training=True).numpy() for _ in range(2)]

    reseed_layers(model, 5)
    first = masks()
    reseed_layers(model, 5)
    again = masks()
    reseed_layers(model, 6)
    other = masks()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first, other)


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


def _epoch_state(epoch: int):
    from training.fit.checkpoints import EpochState

    return EpochState(epoch=epoch, best_f1=epoch / 10, history=[], precision="float32", replicas=1)


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_epoch_whole(tmp_path, monkeypatch):
    import training.fit.checkpoints as checkpoints

    keras.utils.set_random_seed(0)
    model = build_classifier("small-cnn", 16, 3, dropout=0.0)
    optimizer = keras.optimizers.AdamW(1e-3)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(1), {})
    first = _weights(tmp_path / "epoch-0001" / "weights.weights.h5")
    model.get_layer("probabilities").bias.assign([9.0, 9.0, 9.0])

    def killed(path, text):  # the process dies while writing epoch 2's state.json
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoints, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(2), {})
    monkeypatch.undo()
    assert checkpoints.latest_checkpoint(tmp_path).name == "epoch-0001"
    fresh = build_classifier("small-cnn", 16, 3, dropout=0.0)
    fresh_optimizer = keras.optimizers.AdamW(1e-3)
    fresh.compile(optimizer=fresh_optimizer, loss="categorical_crossentropy")
    state = checkpoints.load_checkpoint(tmp_path, fresh, fresh_optimizer, log=lambda _: None)
    assert state.epoch == 1
    restored = {v.path: v.numpy() for v in fresh.weights}
    assert not np.allclose(restored["probabilities/bias"], 9.0)  # epoch 1's weights, not the half-written epoch 2
    for name, value in first.items():
        if name.endswith("bias") and "probabilities" in name:
            np.testing.assert_array_equal(value, restored["probabilities/bias"])
    checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(2), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]  # the leftover .tmp folder is gone


def test_resuming_with_another_config_is_refused_before_anything_is_written(tiny_data, tiny_run, tmp_path):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(tiny_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = _train(tiny_data, out, "--set", "data.image_size=48", "--set", "model.dropout=0.5")
    assert result.returncode == 2
    assert "data.image_size: 32 -> 48" in result.stderr and "model.dropout: 0.2 -> 0.5" in result.stderr
    assert "remove" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    longer = _train(tiny_data, out, "--set", "train.epochs=3", "--set", "predict.tta=1")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resuming after epoch 2" in longer.stdout and "epoch 3/3:" in longer.stdout


@pytest.mark.parametrize("overrides,message", [
    ({"train.steps_per_epoch": -1}, "train.steps_per_epoch must be between 0 and"),
    ({"train.eval_batch_size": 0}, "train.eval_batch_size must be between 1 and"),
    ({"data.shuffle_buffer": -3}, "data.shuffle_buffer must be between 1 and"),
    ({"data.image_size": 100000}, "data.image_size must be between 8 and 2048"),
    ({"predict.tta": 1000000}, "predict.tta must be between 1 and 64"),
    ({"schedule.max": -1.0}, "schedule.max must be between 0.0 and"),
    ({"schedule.decay": 0.0}, "schedule.decay must be in \\(0, 1\\]"),
    ({"augment.rotation": float("nan")}, "augment.rotation: expected a finite number, got nan"),
    ({"augment.rotation": float("inf")}, "augment.rotation: expected a finite number, got inf"),
    ({"augment": 3, "augment.rotation": 1}, "'augment' is a single value here"),
    ({"name": 2024}, "quote text that looks like a number"),
    ({"data.dir": " "}, "data.dir must name the data folder"),
    ({"augment.zoom": 1e30}, "augment.zoom must be <= 1, got 1e\\+30"),  # trained a NaN model before
    ({"augment.rotation": 1000.0}, "augment.rotation must be <= 180"),
    ({"augment.mixup_alpha": 1e9}, "augment.mixup_alpha must be <= 100"),
    ({"augment.shift_reference_size": 0}, "augment.shift_reference_size must be between 1 and"),
    ({"augment.erase_area": 5}, "augment.erase_area"),
    ({"train.seed": -1}, "train.seed must be between 0 and"),
    ({"predict.tta_seed": -2}, "predict.tta_seed must be between 0 and"),
])
def test_out_of_range_and_odd_options_are_named_before_anything_runs(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_member_is_named_after_its_run_folder_unless_named():
    assert load_config(None, {"output": "/tmp/runs/effnet-b0-224"}).member_name == "effnet-b0-224"
    assert load_config(None, {"output": "/tmp/runs/x", "name": "given"}).member_name == "given"
    assert load_config(None, {}).run_dir == Path("runs/member")


def test_config_changes_name_every_option_that_matters_and_ignore_the_safe_ones(tmp_path):
    from training.fit.checkpoints import check_resumable, config_changes, latest_checkpoint

    base = load_config(None, {"output": str(tmp_path / "run")}).to_dict()
    changed = load_config(None, {"output": str(tmp_path / "elsewhere"), "name": "renamed", "train.epochs": 20,
                                 "train.eval_batch_size": 8, "predict.tta": 4, "predict.tta_seed": 3}).to_dict()
    assert config_changes(base, changed) == []  # only options that are safe to change on a resume
    other = load_config(None, {"data.image_size": 96, "augment.erase_area": [0.1, 0.3],
                               "schedule.max": 0.01}).to_dict()
    assert config_changes(base, other) == ["augment.erase_area: (0.02, 0.2) -> (0.1, 0.3)",
                                           "data.image_size: 64 -> 96", "schedule.max: 0.001 -> 0.01"]
    assert config_changes({"a": {"b": [1, 2]}}, {"a": {"b": (1, 2)}}) == []  # JSON lists equal tuples
    assert config_changes({"a": {"b": 1}}, {"a": {"c": 1}}) == ["a.b: 1 -> None", "a.c: None -> 1"]
    folder = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(folder) is None
    check_resumable(folder, other)  # nothing to resume: nothing to refuse
    for epoch in (1, 3, 2):
        (folder / f"epoch-{epoch:04d}").mkdir(parents=True)
        (folder / f"epoch-{epoch:04d}" / "state.json").write_text("{}")
    (folder / "epoch-0009").mkdir()  # no state.json: a half-written folder never counts
    (folder / ".epoch-0010.tmp").mkdir()
    assert latest_checkpoint(folder).name == "epoch-0003"
    (folder / "epoch-0003" / "config.json").write_text(json.dumps(base))
    check_resumable(folder, changed)
    with pytest.raises(ValueError, match="another config \\(data.image_size: 64 -> 96\\).*remove .*checkpoints"):
        check_resumable(folder, load_config(None, {"data.image_size": 96}).to_dict())
    (folder / "epoch-0003" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        check_resumable(folder, base)


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


def test_steps_per_execution_trains_exactly_like_single_steps(tiny_data, tmp_path):
    from training.fit.loop import prepare_run

    runs = {}
    for per_execution in (1, 3):
        out = tmp_path / f"spe{per_execution}"
        result = _train(tiny_data, out, "--set", f"train.steps_per_execution={per_execution}",
                        "--set", "predict.tta=1", "--set", "train.epochs=2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{per_execution} per execution" in result.stdout
        runs[per_execution] = _weights(out / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert runs[1].keys() == runs[3].keys()
    for name in runs[1]:
        np.testing.assert_allclose(runs[3][name], runs[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    # ... and the model really runs 3 steps per execution (capped at the steps of an epoch).
    settings = {"data.dir": str(tiny_data), "data.image_size": 32, "data.batch_size": 16,
                "train.steps_per_execution": 3, "output": str(tmp_path / "never-written")}
    assert prepare_run(load_config(None, settings), log=lambda _: None).model.steps_per_execution == 3
    settings["train.steps_per_execution"] = 99
    assert prepare_run(load_config(None, settings), log=lambda _: None).model.steps_per_execution == 3


def test_the_time_budget_stops_after_the_last_epoch_that_fits_and_the_run_goes_on_when_rerun(tiny_data, tmp_path):
    out = tmp_path / "budget"
    # A budget of a fraction of a second: the first epoch (nothing measured yet) runs, the second cannot fit.
    first = _train(tiny_data, out, "--set", "train.time_budget_minutes=0.001", "--set", "train.epochs=3",
                   "--set", "predict.tta=1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopping after epoch 1 of 3" in first.stdout
    member = json.loads((out / "member.json").read_text())
    assert member["epochs_trained"] == 1
    assert member["stopped"] == {"reason": "time_budget", "epochs_trained": 1, "epochs": 3, "budget_minutes": 0.001}
    assert (out / "predictions" / "test.npz").is_file() and (out / "saved_model").is_dir()
    second = _train(tiny_data, out, "--set", "train.epochs=3", "--set", "predict.tta=1")  # no budget this time
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch 1" in second.stdout
    member = json.loads((out / "member.json").read_text())
    assert member["epochs_trained"] == 3 and member["stopped"] is None


def test_a_refit_trains_on_train_and_val_for_the_best_epoch_count_and_blends_on_the_originals_rows(
        tiny_data, tiny_run, tmp_path):
    import shutil

    from ensemble.members import load_member_predictions

    original = tmp_path / "tiny"
    shutil.copytree(tiny_run, original)
    history = [line.split(",") for line in (original / "history.csv").read_text().splitlines()[1:]]
    best = max(history, key=lambda row: float(row[5]))[0]
    result = subprocess.run([sys.executable, "-m", "flower", "train", "--refit-of", str(original),
                             "--set", "predict.tta=1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    refit = tmp_path / "tiny-refit"
    member = json.loads((refit / "member.json").read_text())
    assert member["name"] == "tiny-refit" and member["validation_from"] == "../tiny"
    assert member["config"]["data"]["train_on_val"] is True and member["config"]["train"]["epochs"] == int(best)
    assert "fitting on train+val" in result.stdout and "exporting the last epoch's weights" in result.stdout
    loaded, own = load_member_predictions(refit), load_member_predictions(original)
    np.testing.assert_array_equal(loaded.val_probs, own.val_probs)
    assert not np.array_equal(loaded.test_probs, own.test_probs)
    refused = subprocess.run([sys.executable, "-m", "flower", "train", "--refit-of", str(refit)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "refit a run trained on train only" in refused.stderr


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
        loaded = tf.saved_model.load(str(path)).signatures["serving_pixels"](images=images)["probabilities"]
        np.testing.assert_allclose(loaded.numpy(), answers[-1], atol=1e-6)
        assert not (path / "junk").exists()  # the killed export's half-written folder was cleared, not reused
        if seed == 1:  # an export killed just after its swap leaves the model before it beside the new one
            (tmp_path / ".saved_model.old-0123456789abcdef" / "variables").mkdir(parents=True)
            (tmp_path / ".saved_model.old-0123456789abcdef" / "variables" / "junk").write_text("the model before")
    assert np.abs(answers[0] - answers[1]).max() > 1e-4  # the second export really replaced the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]

"""The backbones registry: every family listed and built small, each one's own preprocessing, trainable
parts and frozen batch norm, and weights files (offline downloads refused with advice, a local file loaded)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, get_backbone, list_backbones
from training.models.model import build_classifier, parameter_counts

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

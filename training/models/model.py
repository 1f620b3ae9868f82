"""A classifier = backbone (preprocessing inside) + head (global pooling, dropout, float32 softmax)."""

from __future__ import annotations

import re

import keras

from core.errors import ConfigError
from training.models.backbones import build_backbone


def build_classifier(
    backbone: str, image_size: int, num_classes: int, *, weights: str | None = None, dropout: float = 0.2,
    trainable: str = "all", batch_norm: str = "train",
) -> keras.Model:
    """Build the model: [B,S,S,3] RGB 0..255 -> class probabilities [B,C] (float32 even under mixed precision)."""
    features = build_backbone(backbone, image_size, weights)
    inputs = keras.Input((image_size, image_size, 3), name="images", dtype="float32")
    x = features(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"{backbone.replace('-', '_')}_classifier")
    set_trainable(features, trainable, batch_norm)
    return model


def features_of(model: keras.Model) -> keras.Model:
    """The backbone (feature extractor) inside a classifier built by build_classifier."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"{model.name} holds {len(nested)} nested models, expected one backbone")
    return nested[0]


def _block_of(layer_name: str) -> str:
    """Group key of a layer: 'block6a' of 'block6a_expand_conv', 'conv5_block3' of 'conv5_block3_1_conv'."""
    match = re.match(r"^([a-z]+\d+_block\d+|[a-z]*block\d+[a-z]?|[a-z]+\d*)", layer_name)
    return match.group(1) if match else layer_name


def backbone_blocks(features: keras.Model) -> list[list[keras.layers.Layer]]:
    """The backbone's layers with weights, grouped into consecutive blocks by layer name."""
    blocks: list[list[keras.layers.Layer]] = []
    last_key = None
    for layer in features.layers:
        if isinstance(layer, keras.Model):
            inner = backbone_blocks(layer)
            blocks.extend(inner)
            last_key = None
            continue
        if not layer.weights:
            continue
        key = _block_of(layer.name)
        if key != last_key:
            blocks.append([])
            last_key = key
        blocks[-1].append(layer)
    return blocks


def set_trainable(features: keras.Model, trainable: str, batch_norm: str = "train") -> None:
    """Train 'all', only the 'head', or the head and the 'last:N' backbone blocks.

    Frozen batch-norm layers run in inference mode (Keras 3 does that for trainable=False). With
    batch_norm='frozen' every backbone batch norm stays frozen, also in the blocks that train: the usual
    advice when fine-tuning pretrained weights with small batches.
    """
    _set_trainable_blocks(features, trainable)
    if batch_norm == "frozen":
        for layer in _layers_of(features):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    elif batch_norm != "train":
        raise ConfigError(f"model.batch_norm must be 'train' or 'frozen', got {batch_norm!r}")


def _layers_of(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer inside a model, nested models flattened."""
    out = []
    for layer in model.layers:
        out.extend(_layers_of(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def _set_trainable_blocks(features: keras.Model, trainable: str) -> None:
    """The trainable flags of the backbone's blocks for 'all', 'head' or 'last:N'."""
    if trainable == "all":
        features.trainable = True
        return
    if trainable == "head":
        features.trainable = False
        return
    match = re.fullmatch(r"last:(\d+)", trainable)
    if not match:
        raise ConfigError(f"model.trainable must be 'all', 'head' or 'last:N', got {trainable!r}")
    blocks = backbone_blocks(features)
    keep = int(match.group(1))
    if keep > len(blocks):
        raise ConfigError(f"model.trainable={trainable!r} but the backbone has only {len(blocks)} blocks")
    features.trainable = True  # sets every nested layer trainable; then freeze all but the last `keep` blocks
    for block in blocks[: len(blocks) - keep]:
        for layer in block:
            layer.trainable = False


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Trainable and frozen parameter counts."""
    trainable = sum(int(v.numpy().size) for v in model.trainable_weights)
    total = sum(int(v.numpy().size) for v in model.weights)
    return {"trainable": trainable, "frozen": total - trainable}

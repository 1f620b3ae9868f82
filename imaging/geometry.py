"""How a photo becomes a model's square input: the same geometry at import, in the service and in the SavedModel.

The import tool makes each training image from a photo by a centre crop to a square (`crop`), black bars
to a square (`pad`) or a plain stretch (`stretch`), downscaled with an antialiased Lanczos filter (PIL's
LANCZOS). A run records which (`member.json` "geometry", from the data set's `import_report.json` or the
`data.fit` option), and the service and the SavedModel's `serving_default` signature apply the same fit
with TensorFlow's antialiased Lanczos-3 resize: a 4000 x 3000 phone photo reaches the model as its
imported copy would, not squashed and aliased.

The fit modes, the filter and a run's geometry entry are the contract's (core.members); this module is the
TensorFlow half, and imports TensorFlow only inside `fit_square_tf`.
"""

from __future__ import annotations

from typing import Any

from core.members import FILTER, FIT_MODES


def fit_square_tf(image: Any, size: int, fit: str, record_size: int = 0) -> Any:
    """An image [H, W, 3] (uint8 or float 0..255) as float32 [size, size, 3]: cropped, padded or stretched to a
    square and resized with antialiased Lanczos-3, as the import tool makes training images; graph-safe.

    With a `record_size` other than `size` (a model trained on records of another size), the square is made at
    the record size and then resized bilinearly to `size`, as the training pipeline resizes its records."""
    import tensorflow as tf

    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    if record_size and record_size != size:  # the training pipeline's resize of a record (augment.resize_image)
        square = fit_square_tf(image, record_size, fit)
        return tf.ensure_shape(tf.image.resize(square, [size, size], method="bilinear"), [size, size, 3])
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if fit == "crop":
        return _centre_crop(image, size)
    if fit == "pad":  # the longer side becomes `size`, the shorter keeps the aspect ratio (rounded as PIL does)
        longer = tf.cast(tf.maximum(height, width), tf.float64)
        scaled = tf.cast(tf.round(tf.cast(shape[:2], tf.float64) * size / longer), tf.int32)
        target = tf.maximum(scaled, 1)
    else:
        target = tf.stack([size, size])
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], target))
    image = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, target, method=FILTER, antialias=True))
    if fit == "pad":
        top = tf.cast(tf.round(tf.cast(size - target[0], tf.float64) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(size - target[1], tf.float64) / 2), tf.int32)
        image = tf.pad(image, [[top, size - target[0] - top], [left, size - target[1] - left], [0, 0]])
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 255.0), [size, size, 3])


def _centre_crop(image: Any, size: int) -> Any:
    """The centred square of side min(H, W), resized to size x size in one antialiased Lanczos-3 pass.

    As PIL's ImageOps.fit: the square may start half-way into a pixel ((W - H) / 2 for a wide photo), and the
    filter reads the pixels just outside it; a whole-pixel crop first would shift the result by half a pixel.
    """
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    side = tf.reduce_min(shape)
    scale = size / side
    start = (shape - side) / 2  # (top, left), possibly half a pixel
    same = tf.reduce_all(tf.equal(shape, float(size)))
    squared = tf.cond(same, lambda: image[tf.newaxis], lambda: tf.raw_ops.ScaleAndTranslate(
        images=image[tf.newaxis], size=tf.constant([size, size]), scale=tf.stack([scale, scale]),
        translation=-start * scale, kernel_type=FILTER, antialias=True))
    return tf.ensure_shape(tf.clip_by_value(squared[0], 0.0, 255.0), [size, size, 3])

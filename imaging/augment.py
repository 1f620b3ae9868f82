"""Graph-only, seedable image augmentation (runs inside tf.data and on TPU hosts; no py_function).

Work is done per batch. Small per-image parameters are sampled from one seed: flips, rotation,
shear, zoom and shift composed into ONE affine map per image (which also resizes to the model
size), a 3x3 colour matrix with contrast and brightness, an erase box. Then one XLA-compiled pass
does all pixel work: a single bilinear resampling (four gathers on the decoded uint8 pixels),
the colour map and the erasing, fused into one loop. CutMix and MixUp follow, with soft labels.
Set `jit_compile=False` to run the same graph without XLA.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from imaging.augment_config import AugmentConfig

# ITU-R BT.601 luma and the YIQ basis used to rotate hue with one linear map.
LUMA = (0.299, 0.587, 0.114)
RGB_TO_YIQ = ((0.299, 0.596, 0.211), (0.587, -0.274, -0.523), (0.114, -0.322, 0.312))
YIQ_TO_RGB = ((1.0, 1.0, 1.0), (0.956, -0.272, -1.106), (0.621, -0.647, 1.703))


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize to [size, size] bilinearly (half-pixel centres): the evaluation path's only resampling."""
    if image.shape[-3] == size and image.shape[-2] == size:
        return tf.cast(image, tf.float32)
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear")


def _seeds(seed: tf.Tensor, count: int) -> tf.Tensor:
    """Split one stateless seed into `count` independent seeds."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=count)


# ---------------------------------------------------------------------------------------------
# Parameter sampling: small [B, ...] tensors, computed in the graph from one seed per batch.


def sample_affine(
    seed: tf.Tensor, batch: int | tf.Tensor, config: AugmentConfig, in_size: int, out_size: int
) -> tf.Tensor:
    """Per-image affine maps [B, 2, 3] from output pixel (x, y, 1) to input pixel coordinates."""
    s = _seeds(seed, 2)
    n = tf.random.stateless_normal([6, batch], s[0])
    flips = tf.random.stateless_uniform([2, batch], s[1]) < 0.5
    deg = math.pi / 180.0
    angle, shear = config.rotation * deg * n[0], config.shear * deg * n[1]
    fx = tf.where(flips[0] & config.flip_left_right, -1.0, 1.0)
    fy = tf.where(flips[1] & config.flip_up_down, -1.0, 1.0)
    zoom_x = (1.0 + config.zoom * n[2]) * fx
    zoom_y = (1.0 + config.zoom * n[3]) * fy
    shift = config.shift * out_size / config.shift_reference_size
    tx, ty = shift * n[4], shift * n[5]
    # Forward map on centred coordinates: q = k R(angle) Shear(shear) Zoom Flip p + t, k = out/in.
    cos, sin, ssh, csh = tf.cos(angle), tf.sin(angle), tf.sin(shear), tf.cos(shear)
    k = out_size / in_size
    f00, f01 = k * cos * zoom_x, k * (-cos * ssh - sin * csh) * zoom_y
    f10, f11 = k * sin * zoom_x, k * (-sin * ssh + cos * csh) * zoom_y
    det = f00 * f11 - f01 * f10
    i00, i01, i10, i11 = f11 / det, -f01 / det, -f10 / det, f00 / det
    c_in, c_out = (in_size - 1) / 2.0, (out_size - 1) / 2.0
    ox, oy = c_out + tx, c_out + ty
    row0 = tf.stack([i00, i01, c_in - i00 * ox - i01 * oy], axis=-1)
    row1 = tf.stack([i10, i11, c_in - i10 * ox - i11 * oy], axis=-1)
    return tf.stack([row0, row1], axis=1)


def resize_affine(batch: int | tf.Tensor, in_size: int, out_size: int) -> tf.Tensor:
    """The affine maps [B, 2, 3] that only resize (same sampling grid as `resize_image`)."""
    r = in_size / out_size
    b = 0.5 * r - 0.5
    return tf.tile(tf.constant([[[r, 0.0, b], [0.0, r, b]]], tf.float32), [batch, 1, 1])


def sample_colour(
    seed: tf.Tensor, batch: int | tf.Tensor, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-image colour maps [B, 3, 3] (hue and saturation), contrast factors [B] and brightness [B]."""
    u = tf.random.stateless_uniform([4, batch], seed, -1.0, 1.0)
    brightness = config.brightness * 255.0 * u[0]
    contrast = 1.0 + config.contrast * u[1]
    saturation = 1.0 + config.saturation * u[2]
    hue = config.hue * 2.0 * math.pi * u[3]
    cos, sin = tf.cos(hue), tf.sin(hue)
    zero, one = tf.zeros_like(hue), tf.ones_like(hue)
    # Row-vector convention (pixel @ matrix): RGB -> YIQ, rotate I/Q by the hue angle, back to RGB.
    rotate_iq = tf.reshape(tf.stack([one, zero, zero, zero, cos, sin, zero, -sin, cos], -1), [-1, 3, 3])
    hue_map = tf.constant(RGB_TO_YIQ) @ rotate_iq @ tf.constant(YIQ_TO_RGB)
    luma = tf.constant(LUMA, shape=[1, 3, 1]) @ tf.ones([1, 1, 3])
    sat = saturation[:, None, None]
    return hue_map @ (sat * tf.eye(3)[None] + (1.0 - sat) * luma), contrast, brightness


def sample_erase(seed: tf.Tensor, batch: int | tf.Tensor, config: AugmentConfig, size: int) -> tf.Tensor:
    """Per-image erase boxes [B, 4] (top, left, height, width) in pixels; height 0 where not erased."""
    u = tf.random.stateless_uniform([5, batch], seed)
    lo, hi = config.erase_area
    area = (lo + (hi - lo) * u[1]) * size * size
    aspect = tf.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[2])
    height = tf.minimum(tf.round(tf.sqrt(area * aspect)), float(size))
    width = tf.minimum(tf.round(tf.sqrt(area / aspect)), float(size))
    top = tf.floor(u[3] * (size - height + 1))
    left = tf.floor(u[4] * (size - width + 1))
    height = tf.where(u[0] < config.erase_prob, height, 0.0)
    return tf.stack([top, left, height, width], axis=-1)


# ---------------------------------------------------------------------------------------------
# Pixel work: one bilinear gather pass plus colour and erasing, compiled by XLA into one loop.


def _fold_index(index: tf.Tensor, size: int, fill_mode: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Map integer sample positions into [0, size) by the fill mode; also return an in-bounds mask."""
    inside = (index >= 0) & (index < size)
    if fill_mode == "wrap":
        index = tf.math.floormod(index, size)
    elif fill_mode == "reflect":
        index = tf.math.floormod(index, 2 * size)
        index = tf.where(index >= size, 2 * size - 1 - index, index)
    else:  # nearest, and constant (masked below)
        index = tf.clip_by_value(index, 0, size - 1)
    return index, inside


def _box_mask(size: int, boxes: tf.Tensor) -> tf.Tensor:
    """A [B, size, size, 1] float mask that is 1 inside each image's box (top, left, height, width)."""
    grid = tf.range(size, dtype=tf.float32)
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    rows = (grid >= top) & (grid < top + height)
    cols = (grid >= left) & (grid < left + width)
    return tf.cast(rows[:, :, None] & cols[:, None, :], tf.float32)[..., None]


def _resample(images: tf.Tensor, affine: tf.Tensor, out_size: int, fill_mode: str) -> tf.Tensor:
    """Bilinear resampling of [B, H, W, 3] (any dtype) at affine-mapped output pixels -> float32.

    Coordinates are written as broadcast multiply-adds rather than a matmul so that XLA fuses the
    whole pass (coordinates, four gathers, interpolation) into one loop; that halves its cost.
    """
    batch, in_size = tf.shape(images)[0], images.shape[1]
    grid = tf.range(out_size, dtype=tf.float32)
    gx, gy = grid[None, None, :], grid[None, :, None]
    a = affine[:, :, :, None, None]  # [B, 2, 3, 1, 1]
    x = a[:, 0, 0] * gx + a[:, 0, 1] * gy + a[:, 0, 2]  # [B, out, out] input coordinates
    y = a[:, 1, 0] * gx + a[:, 1, 1] * gy + a[:, 1, 2]
    if fill_mode == "nearest":  # clamping first makes the edge pixels extend outwards
        x = tf.clip_by_value(x, 0.0, in_size - 1.0)
        y = tf.clip_by_value(y, 0.0, in_size - 1.0)
    x_floor, y_floor = tf.floor(x), tf.floor(y)
    wx, wy = (x - x_floor)[..., None], (y - y_floor)[..., None]
    x0, x0_in = _fold_index(tf.cast(x_floor, tf.int32), in_size, fill_mode)
    x1, x1_in = _fold_index(tf.cast(x_floor, tf.int32) + 1, in_size, fill_mode)
    y0, y0_in = _fold_index(tf.cast(y_floor, tf.int32), in_size, fill_mode)
    y1, y1_in = _fold_index(tf.cast(y_floor, tf.int32) + 1, in_size, fill_mode)
    flat = tf.reshape(images, [batch, -1, 3])

    def pick(row, col, valid):
        index = tf.reshape(row * in_size + col, [batch, -1])
        pixels = tf.reshape(tf.gather(flat, index, batch_dims=1), [batch, out_size, out_size, 3])
        pixels = tf.cast(pixels, tf.float32)
        if fill_mode == "constant":
            pixels *= tf.cast(valid, tf.float32)[..., None]
        return pixels

    top_left, top_right = pick(y0, x0, y0_in & x0_in), pick(y0, x1, y0_in & x1_in)
    bottom_left, bottom_right = pick(y1, x0, y1_in & x0_in), pick(y1, x1, y1_in & x1_in)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    return top + (bottom - top) * wy


def _recolour(images, source, colour_map, contrast, brightness) -> tf.Tensor:
    """Apply per-image affine colour maps: contrast about the source image's mean, hue/saturation, brightness.

    """
    mean = tf.reduce_mean(tf.cast(source, tf.float32), axis=[1, 2])  # [B, 3]
    c = contrast[:, None]
    matrix = c[..., None] * colour_map  # [B, 3, 3]
    offset = tf.einsum("bc,bcd->bd", (1.0 - c) * mean, colour_map) + brightness[:, None]  # [B, 3]
    out = tf.einsum("bhwc,bcd->bhwd", images, matrix) + offset[:, None, None]
    return tf.clip_by_value(out, 0.0, 255.0)


def _erase(images: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor, shared: bool = False) -> tf.Tensor:
    """Replace each image's box with uniform noise (with `shared`, the same noise in every image)."""
    mask = _box_mask(images.shape[1], boxes)
    shape = tf.concat([[1], tf.shape(images)[1:]], 0) if shared else tf.shape(images)
    noise = tf.random.stateless_uniform(shape, seed, 0.0, 255.0, alg="philox")
    return images + (noise - images) * mask


def _apply(images, affine, colour_map, contrast, brightness, erase_boxes, erase_seed, *, config, out_size,
           shared=False):
    """All pixel work of one batch (the function XLA compiles)."""
    out = _resample(images, affine, out_size, config.fill_mode if config.enabled else "nearest")
    if config.enabled and config.colour:
        out = _recolour(out, images, colour_map, contrast, brightness)
    if config.enabled and config.erase_prob > 0:
        out = _erase(out, erase_boxes, erase_seed, shared)
    return out


_COMPILED: dict = {}


def _compiled_apply(config: AugmentConfig, out_size: int, shared: bool = False):
    """The XLA-compiled pixel pass for one config, output size and sharing of draws (cached)."""
    key = (config, out_size, shared)
    if key not in _COMPILED:
        _COMPILED[key] = tf.function(
            functools.partial(_apply, config=config, out_size=out_size, shared=shared), jit_compile=config.jit_compile
        )
    return _COMPILED[key]


def augment_batch(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, out_size: int,
                  shared: bool = False) -> tf.Tensor:
    """Augment a batch [B, S, S, 3] (uint8 or float 0..255) into float32 [B, out_size, out_size, 3] in 0..255.

    Each image gets its own draw of the parameters; with `shared`, every image gets the one draw a batch of one
    would (the service's TTA passes: an image's answer must not depend on the batch it arrived in).
    """
    in_size = images.shape[1]
    if not config.enabled:
        return resize_image(images, out_size)
    batch = tf.shape(images)[0]
    draws = 1 if shared else batch
    s = _seeds(seed, 4)
    if config.geometric:
        affine = sample_affine(s[0], draws, config, in_size, out_size)
    elif in_size == out_size and not (config.colour or config.erase_prob > 0):
        return tf.cast(images, tf.float32)
    else:
        affine = resize_affine(draws, in_size, out_size)
    parameters = (affine, *sample_colour(s[1], draws, config), sample_erase(s[2], draws, config, out_size))
    if shared:
        parameters = tuple(tf.repeat(p, batch, axis=0) for p in parameters)
    return _compiled_apply(config, out_size, shared)(images, *parameters, s[3])


def augment_image(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, out_size: int) -> tf.Tensor:
    """Augment one image [S, S, 3] into float32 [out_size, out_size, 3] (a batch of one)."""
    return augment_batch(image[None], seed, config, out_size)[0]


def _beta(seed: tf.Tensor, alpha: float, count: tf.Tensor) -> tf.Tensor:
    """Sample Beta(alpha, alpha) statelessly as a ratio of two gammas."""
    s = _seeds(seed, 2)
    a = tf.random.stateless_gamma([count], s[0], alpha)
    b = tf.random.stateless_gamma([count], s[1], alpha)
    return a / (a + b)


def _mix_pixels(images, labels, boxes, mix_weight):
    """Blend each image with its neighbour (MixUp weight), then paste the neighbour's box (CutMix)."""
    partner_images = tf.roll(images, shift=1, axis=0)
    partner_labels = tf.roll(labels, shift=1, axis=0)
    box = _box_mask(images.shape[1], boxes)
    w = mix_weight[:, None, None, None]
    mixed = images + (partner_images - images) * w
    mixed = mixed + (partner_images - mixed) * box
    share = tf.where(mix_weight > 0, mix_weight, tf.reduce_mean(box, axis=[1, 2, 3]))[:, None]
    return mixed, labels * (1.0 - share) + partner_labels * share


_mix_pixels_compiled = tf.function(_mix_pixels, jit_compile=True)


def mix_batch(
    images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix / MixUp each image with its neighbour in the batch; labels become soft and sum to 1."""
    if not config.mixes_batches:
        return images, labels
    batch, size = tf.shape(images)[0], images.shape[1]
    s = _seeds(seed, 4)
    mode = tf.random.stateless_uniform([batch], s[0])
    use_cutmix = mode < config.cutmix_prob
    use_mixup = (mode >= config.cutmix_prob) & (mode < config.cutmix_prob + config.mixup_prob)
    # CutMix: a box covering about (1 - lam) of the image comes from the partner.
    lam = _beta(s[1], config.cutmix_alpha, batch)
    side = float(size) * tf.sqrt(1.0 - lam)
    centre = tf.random.stateless_uniform([2, batch], s[2], 0.0, float(size))
    top = tf.clip_by_value(tf.round(centre[0] - side / 2), 0.0, float(size))
    left = tf.clip_by_value(tf.round(centre[1] - side / 2), 0.0, float(size))
    bottom = tf.clip_by_value(tf.round(centre[0] + side / 2), 0.0, float(size))
    right = tf.clip_by_value(tf.round(centre[1] + side / 2), 0.0, float(size))
    height = tf.where(use_cutmix, bottom - top, 0.0)
    boxes = tf.stack([top, left, height, right - left], axis=-1)
    # MixUp: a convex combination with weight (1 - lam) on the partner.
    mix_weight = tf.where(use_mixup, 1.0 - _beta(s[3], config.mixup_alpha, batch), 0.0)
    mixer = _mix_pixels_compiled if config.jit_compile else _mix_pixels
    return mixer(tf.cast(images, tf.float32), labels, boxes, mix_weight)


# Test-time augmentation (offline predictions and the service's --tta): flips and a mild affine transform,
# no colour, no erasing.
TTA_AUGMENT = AugmentConfig(rotation=5.0, shear=2.0, zoom=0.05, shift=6.0)

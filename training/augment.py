"""Graph-only, seedable image augmentation (runs inside tf.data and on TPU hosts; no py_function).

Per image: flips, rotation, shear, zoom and shift are composed into ONE projective matrix and
applied in a single bilinear resampling pass that also resizes to the model size. Colour jitter is
one 3x3 matrix plus an offset applied to the (smaller) output image. Random erasing follows.
Per batch: CutMix and MixUp with soft labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

FILL_MODES = ("nearest", "reflect", "wrap", "constant")
# ITU-R BT.601 luma and the YIQ basis used to rotate hue with one linear map.
LUMA = (0.299, 0.587, 0.114)
RGB_TO_YIQ = ((0.299, 0.596, 0.211), (0.587, -0.274, -0.523), (0.114, -0.322, 0.312))
YIQ_TO_RGB = ((1.0, 1.0, 1.0), (0.956, -0.272, -1.106), (0.621, -0.647, 1.703))


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation knob; a magnitude of 0 or a probability of 0 switches that transform off.

    Defaults follow the public flower notebooks: rotation 15*N(0,1) degrees, shear 5*N(0,1) degrees,
    zoom 1+N(0,1)/10 per axis, shift 16*N(0,1) px at 192 px (scaled with the output size).
    """

    enabled: bool = True
    flip_left_right: bool = True
    flip_up_down: bool = False
    rotation: float = 15.0
    shear: float = 5.0
    zoom: float = 0.1
    shift: float = 16.0
    shift_reference_size: int = 192
    fill_mode: str = "nearest"
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    erase_prob: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.2)
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    mixup_prob: float = 0.0
    mixup_alpha: float = 0.2

    def __post_init__(self) -> None:
        for name in ("rotation", "shear", "zoom", "shift", "brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("erase_prob", "cutmix_prob", "mixup_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cutmix_prob + self.mixup_prob > 1.0:
            raise ValueError(
                f"augment.cutmix_prob + augment.mixup_prob must be <= 1, got {self.cutmix_prob + self.mixup_prob}"
            )
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"augment.erase_area must be (low, high) with 0 < low <= high < 1, got {self.erase_area}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"augment.fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.brightness > 1 or self.contrast > 1 or self.saturation > 1 or self.hue > 0.5:
            raise ValueError("augment.brightness/contrast/saturation must be <= 1 and augment.hue <= 0.5")
        if self.mixup_alpha <= 0 or self.cutmix_alpha <= 0:
            raise ValueError("augment.mixup_alpha and augment.cutmix_alpha must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Build from a mapping (a TOML table); unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "erase_area" in values:
            values["erase_area"] = tuple(values["erase_area"])
        return cls(**values)

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config with augmentation switched off (only the resize to the model size remains)."""
        return cls(enabled=False)

    @property
    def geometric(self) -> bool:
        """Whether any flip or affine transform is on."""
        return self.flip_left_right or self.flip_up_down or any(
            (self.rotation, self.shear, self.zoom, self.shift)
        )

    @property
    def colour(self) -> bool:
        """Whether any colour jitter is on."""
        return any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def mixes_batches(self) -> bool:
        """Whether CutMix or MixUp is on."""
        return self.enabled and (self.cutmix_prob > 0 or self.mixup_prob > 0)


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize to [size, size] bilinearly (half-pixel centres): the evaluation path's only resampling."""
    if image.shape[-3] == size and image.shape[-2] == size:
        return image
    return tf.image.resize(image, [size, size], method="bilinear")


def _seeds(seed: tf.Tensor, count: int) -> tf.Tensor:
    """Split one stateless seed into `count` independent seeds."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=count)


def affine_transform(seed: tf.Tensor, config: AugmentConfig, in_size: int, out_size: int) -> tf.Tensor:
    """Return the 8-float projective transform (output pixel -> input pixel) of one random augmentation."""
    s = _seeds(seed, 3)
    n = tf.random.stateless_normal([6], s[0])
    flips = tf.random.stateless_uniform([2], s[1]) < 0.5
    deg = math.pi / 180.0
    angle = config.rotation * deg * n[0]
    shear = config.shear * deg * n[1]
    zoom_x = 1.0 + config.zoom * n[2]
    zoom_y = 1.0 + config.zoom * n[3]
    shift_scale = config.shift * out_size / config.shift_reference_size
    tx, ty = shift_scale * n[4], shift_scale * n[5]
    fx = tf.where(flips[0] & config.flip_left_right, -1.0, 1.0)
    fy = tf.where(flips[1] & config.flip_up_down, -1.0, 1.0)

    # Forward map on centred coordinates: q = R(angle) Shear(shear) Zoom Flip p + t.
    cos, sin = tf.cos(angle), tf.sin(angle)
    rot = tf.reshape(tf.stack([cos, -sin, sin, cos]), [2, 2])
    shr = tf.reshape(tf.stack([1.0, -tf.sin(shear), 0.0, tf.cos(shear)]), [2, 2])
    scale = tf.reshape(tf.stack([zoom_x * fx, 0.0, 0.0, zoom_y * fy]), [2, 2])
    forward = rot @ shr @ scale * (out_size / in_size)
    inverse = tf.linalg.inv(forward)
    c_in, c_out = (in_size - 1) / 2.0, (out_size - 1) / 2.0
    offset = c_in - inverse @ tf.reshape(tf.stack([c_out + tx, c_out + ty]), [2, 1])
    return tf.stack([inverse[0, 0], inverse[0, 1], offset[0, 0], inverse[1, 0], inverse[1, 1], offset[1, 0], 0.0, 0.0])


def resize_transform(in_size: int, out_size: int) -> tf.Tensor:
    """The transform that only resizes (same sampling grid as `resize_image`)."""
    r = in_size / out_size
    b = 0.5 * r - 0.5
    return tf.constant([r, 0.0, b, 0.0, r, b, 0.0, 0.0], tf.float32)


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor, out_size: int, fill_mode: str) -> tf.Tensor:
    """Resample a batch [B, H, W, 3] with per-image transforms [B, 8] in one bilinear pass."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.constant([out_size, out_size], tf.int32),
        fill_value=tf.constant(0.0, tf.float32),
        interpolation="BILINEAR",
        fill_mode=fill_mode.upper(),
    )


def colour_jitter(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Brightness, contrast, saturation and hue as one affine colour map, clipped to 0..255."""
    u = tf.random.stateless_uniform([4], seed, -1.0, 1.0)
    brightness = config.brightness * 255.0 * u[0]
    contrast = 1.0 + config.contrast * u[1]
    saturation = 1.0 + config.saturation * u[2]
    hue = config.hue * 2.0 * math.pi * u[3]
    cos, sin = tf.cos(hue), tf.sin(hue)
    # Row-vector convention (pixel @ matrix): RGB -> YIQ, rotate I/Q, back to RGB.
    rotate_iq = tf.reshape(tf.stack([1.0, 0.0, 0.0, 0.0, cos, sin, 0.0, -sin, cos]), [3, 3])
    hue_map = tf.constant(RGB_TO_YIQ) @ rotate_iq @ tf.constant(YIQ_TO_RGB)
    luma = tf.constant(LUMA, shape=[3, 1])
    sat_map = saturation * tf.eye(3) + (1.0 - saturation) * luma @ tf.ones([1, 3])
    colour_map = hue_map @ sat_map
    mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)  # [1, 1, 3]
    flat = tf.reshape(image, [-1, 3]) @ (contrast * colour_map)
    bias = (1.0 - contrast) * tf.reshape(mean, [1, 3]) @ colour_map + brightness
    return tf.clip_by_value(tf.reshape(flat + bias, tf.shape(image)), 0.0, 255.0)


def _box_mask(size: int, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """A [..., size, size, 1] float mask that is 1 inside the box(es) and 0 outside."""
    grid = tf.range(size, dtype=tf.float32)
    rows = (grid >= top[..., None]) & (grid < (top + height)[..., None])
    cols = (grid >= left[..., None]) & (grid < (left + width)[..., None])
    return tf.cast(rows[..., :, None] & cols[..., None, :], tf.float32)[..., None]


def random_erase(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """With probability erase_prob, replace a random rectangle (area in erase_area) with noise."""
    size = image.shape[0]
    s = _seeds(seed, 2)
    u = tf.random.stateless_uniform([5], s[0])
    lo, hi = config.erase_area
    area = (lo + (hi - lo) * u[1]) * size * size
    aspect = tf.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[2])
    height = tf.minimum(tf.sqrt(area * aspect), float(size))
    width = tf.minimum(tf.sqrt(area / aspect), float(size))
    top = tf.floor(u[3] * (size - height + 1))
    left = tf.floor(u[4] * (size - width + 1))

    def erase() -> tf.Tensor:
        mask = _box_mask(size, top, left, height, width)
        noise = tf.random.stateless_uniform(tf.shape(image), s[1], 0.0, 255.0)
        return image * (1.0 - mask) + noise * mask

    return tf.cond(u[0] < config.erase_prob, erase, lambda: image)


def augment_image(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, out_size: int) -> tf.Tensor:
    """Augment one float32 RGB image [S, S, 3] (0..255) into [out_size, out_size, 3] (0..255)."""
    in_size = image.shape[0]
    if not config.enabled:
        return resize_image(image, out_size)
    s = _seeds(seed, 3)
    if config.geometric:
        transform = affine_transform(s[0], config, in_size, out_size)
        image = apply_transforms(image[None], transform[None], out_size, config.fill_mode)[0]
    else:
        image = resize_image(image, out_size)
    if config.colour:
        image = colour_jitter(image, s[1], config)
    if config.erase_prob > 0:
        image = random_erase(image, s[2], config)
    return image


def _beta(seed: tf.Tensor, alpha: float, count: int) -> tf.Tensor:
    """Sample Beta(alpha, alpha) statelessly as a ratio of two gammas."""
    s = _seeds(seed, 2)
    a = tf.random.stateless_gamma([count], s[0], alpha)
    b = tf.random.stateless_gamma([count], s[1], alpha)
    return a / (a + b)


def mix_batch(
    images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix / MixUp each image with its neighbour in the batch; labels become soft and sum to 1."""
    if not config.mixes_batches:
        return images, labels
    batch, size = tf.shape(images)[0], images.shape[1]
    s = _seeds(seed, 4)
    partner_images = tf.roll(images, shift=1, axis=0)
    partner_labels = tf.roll(labels, shift=1, axis=0)
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
    box = _box_mask(size, top, left, bottom - top, right - left)
    box = box * tf.cast(use_cutmix, tf.float32)[:, None, None, None]
    box_share = tf.reduce_mean(box, axis=[1, 2, 3])

    # MixUp: a convex combination with weight lam_mix on the image itself.
    lam_mix = _beta(s[3], config.mixup_alpha, batch)
    partner_share = tf.where(use_mixup, 1.0 - lam_mix, box_share)
    mix_weight = tf.where(use_mixup, 1.0 - lam_mix, 0.0)[:, None, None, None]
    mixed = images * (1.0 - mix_weight) + partner_images * mix_weight
    mixed = mixed * (1.0 - box) + partner_images * box
    share = partner_share[:, None]
    return mixed, labels * (1.0 - share) + partner_labels * share

"""Decode uploaded images once into RGB uint8 arrays, safely.

JPEG, PNG, GIF (first frame), BMP and WebP. Grayscale, palette, CMYK, 16-bit and alpha images become RGB
and EXIF orientation is applied by `core.photos.to_rgb`, exactly as in the import tool. A plain RGB
or grayscale JPEG with no rotation is decoded by TensorFlow's decoder with the IDCT training and the
SavedModel use (`core.contract.JPEG_DCT`), whose pixels are PIL's: the service, the import tool and
training see the same pixels.

Huge images (more than `downscale_pixels`, e.g. a 6000 x 6000 photo or a tiny PNG of one colour) are
reduced to no less than twice the largest member's input size (KEEP): a JPEG while it decodes (1/2, 1/4
or 1/8 scale), other formats right after decoding. `decoded_pixels` says from the header alone how many pixels decoding
will produce, for the service's pixel budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.errors import tf_reason
from core.photos import PhotoError, open_photo, to_rgb

DRAFTABLE = {"JPEG", "MPO"}  # formats whose decoder can scale down while decoding (PIL's Image.draft)
EXIF_ORIENTATION = 0x0112
# A reduced image keeps at least this many times the largest member's input size on each side, so that the
# antialiased resize to the input (imaging.geometry) does the final filtering, as at import: DCT scaling
# straight down to the input size moved a phone photo's pixels by 1.4 grey levels, to twice it by 0.3.
KEEP = 2


@dataclass
class ImageError(Exception):
    """A client's image cannot be used; `kind` is a stable error code, `message` says why."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open the image (its header only) and check its format and size (core.photos.open_photo, the one opener);
    raise ImageError on anything unusable."""
    try:
        return open_photo(data, max_pixels)
    except PhotoError as err:
        raise ImageError(err.code, err.message) from None


def _reduction(width: int, height: int, target: int, downscale_pixels: int) -> int:
    """By how much a width x height image may shrink and still be at least target x target: 1 when it should not
    (reduction disabled, the image has no more than `downscale_pixels`, or it is under twice the target)."""
    if target < 1 or downscale_pixels < 1 or width * height <= downscale_pixels:
        return 1
    return max(1, min(width, height) // target)


def _plan(image: Image.Image, target: int, downscale_pixels: int) -> int:
    """Set up a JPEG's DCT scaling when the image is to be reduced; returns the pixels the decoder will produce."""
    width, height = image.size
    if image.format in DRAFTABLE and _reduction(width, height, target, downscale_pixels) >= 2:
        image.draft(image.mode, (target, target))  # a scale of 1/2, 1/4 or 1/8, each side still >= target
    return image.size[0] * image.size[1]


def decoded_pixels(data: bytes, max_pixels: int, target: int = 0, downscale_pixels: int = 0) -> int:
    """How many pixels `decode_image` with the same arguments decodes at most (reads the header only)."""
    return _plan(_open(data, max_pixels), target * KEEP, downscale_pixels)


def decode_image(data: bytes, max_pixels: int, target: int = 0, downscale_pixels: int = 0) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array [H, W, 3]; raise ImageError on anything unusable.

    An image of more than `downscale_pixels` pixels and at least 2 KEEP `target` on each side is reduced to
    no less than KEEP `target` on each side: a JPEG by DCT scaling while it decodes, other formats by averaging
    boxes of pixels right after (the full-size image is released at once). Other images (and all of them
    when `target` is 0) decode at full size; a plain RGB or grayscale JPEG then by TensorFlow's decoder.
    """
    image = _open(data, max_pixels)
    target *= KEEP
    width, height = image.size
    reduce = _reduction(width, height, target, downscale_pixels) >= 2
    if not reduce and image.format == "JPEG" and image.mode in ("RGB", "L") and _orientation(image) in (0, 1):
        return _decode_jpeg_like_training(data)
    try:
        _plan(image, target, downscale_pixels)
        image.load()
        if reduce and image.mode in ("RGB", "L") and min(image.size) // target >= 2:
            image = image.reduce(min(image.size) // target)  # before the RGB copies; the full size is freed here
        rgb = to_rgb(image)
        del image
        factor = min(rgb.size) // target if reduce else 1  # what is left to reduce (alpha, palette, 16-bit modes)
        if factor >= 2:
            rgb = rgb.reduce(factor)  # the full-size image is freed when this rebinding drops the last reference
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError("corrupt", f"the image is truncated or corrupt ({err})") from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (0 when absent)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 0))
    except Exception:  # a broken EXIF block: treat as no rotation
        return 0


def _decode_jpeg_like_training(data: bytes) -> np.ndarray:
    """TensorFlow's JPEG decoder with the training pipeline's IDCT (the same pixels as PIL's, the import tool's)."""
    import tensorflow as tf

    from core.contract import JPEG_DCT

    try:
        return tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT).numpy()
    except tf.errors.InvalidArgumentError as err:
        raise ImageError("corrupt", f"the JPEG is truncated or corrupt ({tf_reason(err)})") from None


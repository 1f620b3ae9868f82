"""Decode uploaded images once into RGB uint8 arrays, safely.

JPEG, PNG, GIF (first frame), BMP and WebP. Grayscale, palette, CMYK, 16-bit and alpha images become RGB
and EXIF orientation is applied by `training.pixels.to_rgb`, exactly as in the import tool. A plain RGB
or grayscale JPEG with no rotation is decoded by TensorFlow's decoder, exactly as training and the
SavedModel do, so the service sees the same pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.pixels import to_rgb

FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"}
EXIF_ORIENTATION = 0x0112


@dataclass
class ImageError(Exception):
    """A client's image cannot be used; `kind` is a stable error code, `message` says why."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array [H, W, 3]; raise ImageError on anything unusable."""
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):
            raise ImageError("not_an_image", "the data is not an image in a supported format "
                                             "(JPEG, PNG, GIF, BMP, WebP)") from None
        raise ImageError("too_many_pixels", f"the image is too large to decode safely ({err})") from None
    except (OSError, ValueError) as err:
        raise ImageError("corrupt", f"the image header cannot be read ({err})") from None
    if fmt not in FORMATS:
        raise ImageError("unsupported_format", f"image format {fmt} is not supported; use JPEG, PNG, GIF, BMP or WebP")
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"the image has {width}x{height} = {width * height} pixels, more than the "
                                            f"limit of {max_pixels}")
    if fmt == "JPEG" and image.mode in ("RGB", "L") and _orientation(image) in (0, 1):
        return _decode_jpeg_like_training(data)
    try:
        image.load()
        return np.asarray(to_rgb(image), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError("corrupt", f"the image is truncated or corrupt ({err})") from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (0 when absent)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 0))
    except Exception:  # a broken EXIF block: treat as no rotation
        return 0


def _decode_jpeg_like_training(data: bytes) -> np.ndarray:
    """TensorFlow's JPEG decoder, as in the training pipeline and the SavedModel signature."""
    import tensorflow as tf

    try:
        return tf.io.decode_jpeg(data, channels=3).numpy()
    except tf.errors.InvalidArgumentError as err:
        raise ImageError("corrupt", f"the JPEG is truncated or corrupt ({err.message.splitlines()[0]})") from None


"""Turn any decoded PIL image into RGB the same way everywhere (import tool and service); PIL and numpy only.

EXIF orientation is applied; alpha (RGBA, LA, PA, a palette with a transparent colour) is composited on
white; 16-bit and 32-bit integer images are read as 16-bit values and scaled by 255/65535, so a 16-bit
file's full range maps to 0..255 (no stretch by the image's own maximum); grayscale, palette and CMYK
images are converted by PIL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as it is displayed, in RGB mode: oriented, 16-bit scaled to 8, alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = sixteen_bit_to_8_bit(image)
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def sixteen_bit_to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer, read as 16-bit) grayscale image as mode "L": value * 255 / 65535, rounded."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8))

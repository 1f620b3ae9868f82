"""The import's photos as squares: opened (core.photos), fitted to a square, encoded as the records hold them."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from core.files import sha256_file
from core.members import FIT_MODES
from core.names import shown
from core.photos import PhotoError, load_rgb
from training.data.importer.report import ImportReport
from training.data.importer.sources import rel
from training.data.near_duplicates import (
    perceptual_hash,
)

NOT_A_PHOTO = "not an image"  # a file named like a photo that no decoder opens


def fit_square(image: Image.Image, size: int, fit: str) -> Image.Image:
    """Make a size x size image: centre crop, stretch, or pad (black bars) to a square first."""
    if fit == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    if fit == "pad":
        width, height = image.size
        if min(width, height) * size * 2 <= max(width, height):  # PIL would scale the short side to 0 px: all black
            middle = round((size - 1) / 2)  # keep a one-pixel strip, centred as imaging.geometry does
            strip, corner = ((size, 1), (0, middle)) if width > height else ((1, size), (middle, 0))
            image = image if image.mode in ("RGB", "L") else image.convert("RGB")  # a palette is not pasted along
            out = Image.new(image.mode, (size, size), 0)
            out.paste(image.resize(strip, Image.Resampling.LANCZOS), corner)
            return out
        return ImageOps.pad(image, (size, size), Image.Resampling.LANCZOS, color=(0, 0, 0))
    if fit == "stretch":
        return image.resize((size, size), Image.Resampling.LANCZOS)
    raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")


def read_squares(src: Path, files: list[Path], size: int, fit: str, report: ImportReport, progress: bool,
                  near: bool = True) -> tuple[dict[int, Image.Image], dict[int, tuple[str, int]]]:
    """Open every file as an RGB square of the largest size, with its (sha256 of the file, perceptual hash of the
    square as stored or 0); unreadable files and images over report.max_pixels (never decoded) go to the report."""
    images: dict[int, Image.Image] = {}
    prints: dict[int, tuple[str, int]] = {}
    for i, path in enumerate(files):
        try:
            square = fit_square(load_rgb(path, report.max_pixels), size, fit)  # keep only the largest square
            # The hash of what the records hold (the JPEG of this square), as `flower overlap DATA:split` sees it.
            stored = perceptual_hash(load_rgb(encode(square, size), None)) if near else 0
            prints[i] = (sha256_file(path), stored)
            images[i] = square
        except (PhotoError, OSError) as err:
            reason = _skip_reason(err, report.max_pixels)
            report.skipped.append({"path": rel(src, path), "reason": reason})
            if progress:
                print(f"  skipped {rel(src, path)}: {reason}", flush=True)
        if progress and ((i + 1) % 500 == 0 or i + 1 == len(files)):
            print(f"  read {i + 1}/{len(files)} files", flush=True)
    return images, prints


def _skip_reason(err: PhotoError | OSError, max_pixels: int) -> str:
    """Why a file was skipped, as the import report says it."""
    code = getattr(err, "code", "")
    if code == "too_many_pixels":
        return f"{err} (--max-pixels {max_pixels}); not decoded (a decompression bomb?)"
    if code in ("not_an_image", "unsupported_format"):
        return NOT_A_PHOTO if code == "not_an_image" else shown(str(err))
    return f"unreadable image ({shown(str(err))})"


def encode(square: Image.Image, size: int) -> bytes:
    """Resize a square image to `size` and encode it as JPEG (quality 95, colour at full resolution: 4:2:0 chroma
    subsampling alone moved a 64 px flower photo's pixels by 2.2 grey levels on average, 4:4:4 by 1.7)."""
    buffer = io.BytesIO()
    fit_square(square, size, "stretch").save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()

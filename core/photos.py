"""Photos, one meaning everywhere: the one opener, RGB as displayed, and what "a folder of photos" holds.

PIL and numpy only. `open_photo` checks a photo from its header (format, pixel count) before anything is
decoded; `load_rgb` decodes it as it is displayed; `walk_photos` lists a folder's photos by the one rule
(`is_photo_name`). The import tool, `flower overlap`, `flower predict` and the service all read photos here.


EXIF orientation is applied; alpha (RGBA, LA, PA, a palette with a transparent colour) is composited on
white; 16-bit and 32-bit integer images are read as 16-bit values and scaled by 255/65535, so a 16-bit
file's full range maps to 0..255 (no stretch by the image's own maximum); grayscale, palette and CMYK
images are converted by PIL.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ConfigError, FlowerError, Kind
from core.names import shown

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


# --- the one photo opener -----------------------------------------------------------------------------------

PHOTO_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO")  # MPO: a JPEG with extra frames (phone cameras)
FORMATS_SHOWN = "JPEG, PNG, GIF, BMP, WebP"
DEFAULT_MAX_PIXELS = 40_000_000  # width x height of the largest image decoded (a 40 MP photo; bombs are larger)


class PhotoError(FlowerError):
    """A photo that cannot be used; `code` is a stable word clients match on, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, Kind.TOO_LARGE if code == "too_many_pixels" else Kind.INVALID, code)
        self.message = message


class TooManyPixels(PhotoError, ValueError):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""

    def __init__(self, message: str) -> None:
        super().__init__("too_many_pixels", message)


def check_max_pixels(value: int, name: str = "max_pixels") -> int:
    """A valid pixel limit: a whole number >= 1 (ConfigError naming the option)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def open_photo(source: bytes | str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a photo's header and check it: one of PHOTO_FORMATS and at most max_pixels pixels (None: no limit
    of ours). Nothing is decoded yet, so a small file that unpacks to gigabytes costs nothing; PIL's own
    bomb limit (about 89 M pixels) refuses an image whatever max_pixels says. PhotoError on anything unusable."""
    if isinstance(source, bytes) and not source:
        raise PhotoError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits are checked below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise PhotoError("not_an_image", f"the data is not an image in a supported format ({FORMATS_SHOWN})") from None
    except Image.DecompressionBombError as err:
        raise TooManyPixels(f"the image is too large to decode safely ({err})") from None
    except (OSError, ValueError) as err:
        raise PhotoError("corrupt", f"the image header cannot be read ({err})") from None
    problem = _header_problem(fmt, width * height, f"{width}x{height}", max_pixels)
    if problem is not None:
        image.close()
        raise problem
    return image


def _header_problem(fmt: str | None, pixels: int, size: str, max_pixels: int | None) -> PhotoError | None:
    """What is wrong with a photo from its header: its format, then our limit, then PIL's own bomb limit."""
    if fmt not in PHOTO_FORMATS:
        return PhotoError("unsupported_format", f"image format {fmt} is not supported; use JPEG, PNG, GIF, BMP or WebP")
    if max_pixels is not None and pixels > max_pixels:
        return TooManyPixels(f"the image has {size} = {pixels} pixels, more than the limit of {max_pixels}")
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        return TooManyPixels(f"the image is too large to decode safely (Image size ({pixels} pixels) exceeds limit of "
                             f"{Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack.)")
    return None


def load_rgb(source: bytes | str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a photo (file or bytes) as RGB, as it is displayed: checked by open_photo, then decoded whole and
    made RGB by to_rgb (EXIF orientation applied, alpha composited on white). PhotoError on anything unusable."""
    with open_photo(source, max_pixels) as image:
        try:
            image.load()
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError) as err:
            raise PhotoError("corrupt", f"the image is truncated or corrupt ({err})") from None


# --- the one folder walker: what "a folder of photos" means -------------------------------------------------

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
NOT_A_PHOTO_NAME = f"not named like a photo ({', '.join(PHOTO_EXTENSIONS)}): not read"
HIDDEN_NAME = "a hidden name (it starts with '.'): not read"


def is_photo_name(name: str) -> bool:
    """The one rule for a file in a folder: it is a photo when its name ends in a photo extension (any case)."""
    return os.path.splitext(name)[1].lower() in PHOTO_EXTENSIONS


@dataclass(frozen=True)
class Problem:
    """A photo (or folder) found but not readable: a stable code and what is wrong."""

    path: Path
    code: str  # broken_link (also a link to itself), link_loop (a link to a folder that holds it), unreadable
    detail: str
    label: str = ""  # what kind of problem, in words: "broken link", "link loop"

    @property
    def reason(self) -> str:
        """The detail with what kind of problem it is in front ("broken link: its target ... does not exist")."""
        return f"{self.label}: {self.detail}" if self.label else self.detail


@dataclass
class FolderWalk:
    """A folder's photos in name order, and what the walk left out."""

    photos: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # files not named like photos
    hidden: list[Path] = field(default_factory=list)  # names starting with '.' (not descended into), left out


def walk_photos(root: str | Path) -> FolderWalk:
    """Every photo under a folder, recursively in name order, following links to files and folders.

    A photo is a non-hidden file named like one (is_photo_name); other files go to `others` (NOT_A_PHOTO_NAME
    says why), names starting with '.' go to `hidden`. A broken link or a link loop (whatever its name),
    a pipe or device named like a photo, and a folder that cannot be listed, are problems with their reason."""
    walk = FolderWalk()
    _walk(Path(root), (Path(os.path.realpath(root)),), walk)
    return walk


def _walk(folder: Path, chain: tuple[Path, ...], walk: FolderWalk) -> None:
    """Add one folder's entries to walk, descending into sub-folders in name order."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        walk.problems.append(Problem(folder, "unreadable", f"the folder cannot be read ({err.strerror or err})"))
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            walk.hidden.append(path)
            continue
        try:
            mode = os.stat(entry.path).st_mode  # follows links
        except OSError as err:  # a broken link or a link loop, whatever its name
            walk.problems.append(entry_problem(entry, err))
            continue
        if stat.S_ISDIR(mode):
            real = Path(os.path.realpath(entry.path))
            if any(inside == real or inside.is_relative_to(real) for inside in chain):
                walk.problems.append(Problem(path, "link_loop", f"a link to {shown(str(real))}, a folder that holds "
                                                                "it; not followed", "link loop"))
            else:
                _walk(path, (*chain, real), walk)
        elif not is_photo_name(entry.name):
            walk.others.append(path)
        elif stat.S_ISREG(mode):
            walk.photos.append(path)
        else:
            walk.problems.append(Problem(path, "unreadable", "not a regular file (a pipe, device or socket): not read"))


def entry_problem(entry: os.DirEntry | Path, err: OSError) -> Problem:
    """Why a folder entry cannot be opened: a broken link, a link loop, or the system's reason."""
    path = Path(entry.path) if isinstance(entry, os.DirEntry) else entry
    if path.is_symlink() and err.errno == errno.ELOOP:
        return Problem(path, "broken_link", "the link leads back to itself", "link loop")
    if path.is_symlink() and err.errno == errno.ENOENT:
        return Problem(path, "broken_link", f"its target {shown(os.readlink(path))} does not exist", "broken link")
    return Problem(path, "unreadable", f"cannot be read ({err.strerror or err})")

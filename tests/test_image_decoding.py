"""The service's image decoding on its own: the refusals' exact texts, decompression bombs named by their header,
and where reduction starts (the pixel threshold, the DCT scale of a JPEG, a disabled target)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.images import ImageError, decode_image, decoded_pixels


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (PIL reads only the header when it opens it)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    return bytes(data)


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * 7 + height)
    pixels = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width, height)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _encoded(fmt: str, size: tuple[int, int] = (100, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_refusals_say_exactly_what_is_wrong():
    for blob, limit, kind, message in (
        (b"", 10**7, "empty", "the image is empty (0 bytes)"),
        (b"plain text", 10**7, "not_an_image",
         "the data is not an image in a supported format (JPEG, PNG, GIF, BMP, WebP)"),
        (_encoded("PNG")[:20], 10**7, "corrupt", "the image header cannot be read (Truncated File Read)"),
        (_encoded("TIFF"), 10**7, "unsupported_format",
         "image format TIFF is not supported; use JPEG, PNG, GIF, BMP or WebP"),
        (_encoded("PNG"), 4999, "too_many_pixels", "the image has 100x50 = 5000 pixels, more than the limit of 4999"),
    ):
        with pytest.raises(ImageError) as refused:
            decode_image(blob, limit)
        assert (refused.value.kind, refused.value.message, str(refused.value)) == (kind, message, message)
    assert decode_image(_encoded("PNG"), 5000).shape == (50, 100, 3)  # exactly the limit: decoded
    with pytest.raises(ImageError, match="more than the limit of 4999"):  # the header count keeps the limit too
        decoded_pixels(_encoded("PNG"), 4999)
    assert decoded_pixels(_encoded("PNG"), 5000) == 5000


def test_a_png_cut_short_after_its_header_is_named_corrupt():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(buffer, format="PNG")
    with pytest.raises(ImageError) as refused:
        decode_image(buffer.getvalue()[:2000], 10_000_000)
    assert refused.value.kind == "corrupt"  # the exact code clients match on
    message = refused.value.message
    assert message.startswith("the image is truncated or corrupt (") and message.endswith(")") and len(message) > 40


@pytest.mark.parametrize("width,height", [(10_000, 10_000), (20_000, 20_000)])  # PIL's warning, then its error
def test_a_decompression_bomb_is_refused_from_its_header_whatever_the_pixel_limit(width, height):
    blob = _png_claiming(width, height)
    for call in (lambda: decode_image(blob, 10**12), lambda: decoded_pixels(blob, 10**12)):
        with pytest.raises(ImageError) as refused:
            call()
        assert refused.value.kind == "too_many_pixels"  # not "too_many_pixels" in another case or spelling
        expected = f"the image is too large to decode safely (Image size ({width * height} pixels) exceeds limit of"
        assert refused.value.message.startswith(expected)


def test_reduction_starts_above_the_pixel_threshold_and_can_be_set_to_one_pixel():
    blob = _jpeg(1000, 400)  # 400 000 pixels; a 48 px input keeps at least 96 px a side
    assert decode_image(blob, 10**8, 48, 400_000).shape == (400, 1000, 3)  # exactly at the threshold: kept
    assert decode_image(blob, 10**8, 48, 399_999).shape == (100, 250, 3)  # one pixel over: 1/4 while decoding
    assert decode_image(blob, 10**8, 48, 1).shape == (100, 250, 3)  # --downscale-pixels 1: every image
    assert decode_image(blob, 10**8, 0, 1).shape == (400, 1000, 3)  # no target: nothing to reduce to


def test_reduction_is_off_unless_both_a_target_and_a_pixel_threshold_are_given():
    blob = _jpeg(1000, 400)
    for call in (lambda **kw: decode_image(blob, 10**8, **kw).shape[:2],
                 lambda **kw: decoded_pixels(blob, 10**8, **kw)):
        full = call()
        assert full in ((400, 1000), 400 * 1000)
        assert call(target=48) == full and call(downscale_pixels=1) == full  # the other one left at its default
        assert call(target=48, downscale_pixels=1) != full


def test_a_jpeg_twice_the_kept_size_is_scaled_while_decoding_not_after():
    blob = _jpeg(1000, 200)  # short side 200 = 2 x 96 (twice the 48 px input): a 1/2 DCT scale
    assert decoded_pixels(blob, 10**8, 48, 100_000) == 500 * 100  # the decoder's own output, not 1000 x 200
    assert decode_image(blob, 10**8, 48, 100_000).shape == (100, 500, 3)
    assert decoded_pixels(_jpeg(1000, 191), 10**8, 48, 100_000) == 1000 * 191  # under twice: full size


def test_a_large_image_with_alpha_is_composited_on_white_before_it_is_reduced():
    # Opaque red and fully transparent (stored black) columns in turn: on white, each 2 x 2 box is half red, half white.
    pixels = np.zeros((200, 400, 4), np.uint8)
    pixels[:, ::2] = [255, 0, 0, 255]
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    reduced = decode_image(buffer.getvalue(), 10**8, 48, 50_000)  # 80 000 pixels; short side 200 = 2 x 96
    assert reduced.shape == (100, 200, 3)
    np.testing.assert_allclose(reduced.reshape(-1, 3).mean(0), [255, 127.5, 127.5], atol=1)
    assert np.ptp(reduced[..., 1]) <= 1
    palette = io.BytesIO()
    Image.fromarray(pixels[..., :3]).convert("P").save(palette, format="PNG")  # converted to RGB, then reduced
    reduced = decode_image(palette.getvalue(), 10**8, 48, 50_000)
    assert reduced.shape == (100, 200, 3)
    np.testing.assert_allclose(reduced.reshape(-1, 3).mean(0), [127.5, 0, 0], atol=2)


def test_a_mirrored_jpeg_is_decoded_as_the_viewer_shows_it():
    image = Image.new("RGB", (32, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 16))  # red on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 2  # orientation 2: mirrored left to right
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    decoded = decode_image(buffer.getvalue(), 10**8)
    assert decoded.shape == (16, 32, 3)
    assert decoded[8, 28, 0] > 200 and decoded[8, 2, 2] > 200  # red on the right, blue on the left

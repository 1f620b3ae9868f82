"""The one inference path: encoded images (or an RGB pixel tensor) -> one result per image.

Every protocol is a thin adapter over it, as KServe's endpoints call one `DataPlane.infer`: the REST route
(/v1/predict), the TF-Serving and Open Inference routes, and `flower predict` (service/scoring.py) turn their
requests into `InferencePath.infer` (encoded images) or `InferencePath.infer_pixels` (a decoded tensor), and
the results into their answers. The path owns what comes between: decoding (service.images), the pixel
budgets (service.limits), batching (the version's batcher, or a direct call offline) and the finite check.
Each result is a `Prediction` or the `ImageError` that kept that image from one.

With `strict=True` (protocols with no per-image errors) the first bad image raises its ImageError, named
("instance 2: ..."), before any later work; otherwise a bad image fails only its own result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.images import ImageError, decode_image, decoded_pixels
from service.limits import PixelBudget, check_request_pixels

logger = logging.getLogger(__name__)
INLINE_DECODE_BYTES = 48 * 1024  # about a 300 px JPEG: well under a millisecond to decode
INLINE_DECODE_PIXELS = 120_000  # ... and no more pixels than that (a tiny PNG may hold 40 M pixels)
NON_FINITE = "the model's output for this image is not finite (NaN or infinity), so there is no answer for it"
LOGGED = "; the server log names the request"

Outputs = list[tuple[np.ndarray, np.ndarray]]  # (blended [C], members [M, C]) per image
Predict = Callable[[list[np.ndarray]], Awaitable[Outputs]]


@dataclass(frozen=True)
class Prediction:
    """One image's answer: blended probabilities [C] and each member's probabilities [M, C]."""

    blended: np.ndarray
    members: np.ndarray


Result = Prediction | ImageError


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image of a request: its name (in messages and the log) and how to read its bytes, again."""

    name: str
    read: Callable[[], Awaitable[bytes]]  # the bytes, or raises the ImageError that makes them unusable

    @classmethod
    def of(cls, name: str, data: bytes | ImageError) -> EncodedImage:
        """An image whose bytes (or the reason there are none) are in memory already."""

        async def read() -> bytes:
            if isinstance(data, ImageError):
                raise data
            return data

        return cls(name, read)


def decode_base64(text: str) -> bytes:
    """Standard base64 as clients send it: line-wrapped or not, padded or not (whitespace removed and the padding
    restored, then decoded strictly); ValueError for anything else."""
    text = "".join(text.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not valid base64{_base64_hint(text)}") from None


def _base64_hint(text: str) -> str:
    """What a client most likely sent instead of standard base64, as a clause ('' when nothing is recognised)."""
    if text[:5].lower() == "data:":
        return ": a data URI (send only the text after 'base64,')"
    if "-" in text or "_" in text:
        return ": '-' or '_' of URL-safe base64 (send standard base64, with '+' and '/')"
    return ""


def encoded_blobs(blobs: list[bytes | ImageError], max_bytes: int, what: str) -> list[EncodedImage]:
    """Images sent whole in a JSON body, named '<what> <i>'; one over `max_bytes` is refused as too_large (a route
    may have found that already, from its base64 length: `encoded_limit`)."""
    return [EncodedImage.of(f"{what} {i}", blob if isinstance(blob, ImageError) or len(blob) <= max_bytes else
                            ImageError("too_large", f"larger than {max_bytes} bytes")) for i, blob in enumerate(blobs)]


def encoded_limit(max_bytes: int) -> int:
    """The longest base64 text of an image of at most `max_bytes` bytes: longer text is too_large undecoded."""
    return 4 * -(-max_bytes // 3)


def base64_image(text: str, max_bytes: int) -> bytes | ImageError:
    """An image sent as base64 text (`decode_base64`); text too long for `max_bytes` is too_large, undecoded (line
    breaks of wrapped text are not counted; text over twice the limit is refused before they are looked for)."""
    limit = encoded_limit(max_bytes)
    if len(text) > 2 * limit + 2 or len(compact := "".join(text.split())) > limit:
        return ImageError("too_large", f"larger than {max_bytes} bytes")
    return decode_base64(compact)


def batch_function(predictor: Any) -> Callable[[list[np.ndarray]], Outputs]:
    """The batch function of a version: decoded images -> (blended probs, members' probs) per image."""

    def run_batch(images: list[np.ndarray]) -> Outputs:
        blended, members = predictor.predict(images)
        return [(blended[i], members[:, i]) for i in range(len(images))]

    return run_batch


def direct(predictor: Any) -> Predict:
    """The version's batch function called at once, without a batcher (offline scoring)."""
    run_batch = batch_function(predictor)

    async def predict(images: list[np.ndarray]) -> Outputs:
        return run_batch(images)

    return predict


def is_finite(blended: np.ndarray, members: np.ndarray) -> bool:
    """Whether an image's blended and member probabilities are all finite (no NaN, no infinity)."""
    return bool(np.isfinite(blended).all() and np.isfinite(members).all())


@dataclass(frozen=True)
class InferencePath:
    """Decode, budget, batch and check images for one model version (see the module's docstring).

    `predict` is the version's batcher (`submit_many`) or `direct(predictor)`; `target` its largest member's
    input size. Without `budget` and `max_request_pixels` (offline) no pixel limit applies but `max_pixels`.
    With `logged`, each non-finite output is logged and its error says so.
    """

    predict: Predict
    max_pixels: int
    target: int
    downscale_pixels: int
    max_request_pixels: int | None = None
    budget: PixelBudget | None = None
    logged: bool = False

    async def infer(self, images: list[EncodedImage], strict: bool = False) -> list[Result]:
        """One result per encoded image, in order: sizes and budgets checked from the headers, then decoded."""
        measured = [await self._measure(image, strict) for image in images]
        pixels = sum(p for p in measured if not isinstance(p, ImageError))
        with self._hold(pixels):
            decoded = [await self._decode(image, size, strict) for image, size in zip(images, measured, strict=True)]
            return await self._predict(decoded, [image.name for image in images])

    async def infer_pixels(self, images: np.ndarray, what: str = "image") -> list[Result]:
        """One result per image of an RGB tensor [N, H, W, 3] (decoded by its protocol), in order."""
        pixels = int(np.prod(images.shape[:3])) * 4  # float32: 12 bytes a pixel, 4 times a decoded image's 3
        with self._hold(pixels):
            return await self._predict(list(images), [f"{what} {i}" for i in range(len(images))])

    @contextlib.contextmanager
    def _hold(self, pixels: int) -> Iterator[None]:
        """Check one request's pixels and hold them in the server's budget while it is served."""
        if self.max_request_pixels is not None:
            check_request_pixels(pixels, self.max_request_pixels)
        with self.budget.hold(pixels) if self.budget is not None else contextlib.nullcontext():
            yield

    async def _measure(self, image: EncodedImage, strict: bool) -> int | ImageError:
        """The pixels an image decodes to, from its header alone (or why it cannot be used)."""
        try:
            return decoded_pixels(await image.read(), self.max_pixels, self.target, self.downscale_pixels)
        except ImageError as err:
            return _failed(image.name, err, strict)

    async def _decode(self, image: EncodedImage, size: int | ImageError, strict: bool) -> np.ndarray | ImageError:
        """An image's RGB pixels; a large one is decoded off the event loop."""
        if isinstance(size, ImageError):
            return size
        try:
            data = await image.read()
            args = (data, self.max_pixels, self.target, self.downscale_pixels)
            if len(data) <= INLINE_DECODE_BYTES and size <= INLINE_DECODE_PIXELS:  # faster than a thread hand-off
                return decode_image(*args)
            return await asyncio.get_running_loop().run_in_executor(None, decode_image, *args)
        except ImageError as err:
            return _failed(image.name, err, strict)

    async def _predict(self, inputs: list[np.ndarray | ImageError], names: list[str]) -> list[Result]:
        """Predict the decoded images together; an output that is not finite becomes its image's error."""
        good = [i for i, value in enumerate(inputs) if not isinstance(value, ImageError)]
        outputs = await self.predict([inputs[i] for i in good]) if good else []
        results: list[Result] = list(inputs)
        for i, (blended, members) in zip(good, outputs, strict=True):
            results[i] = Prediction(blended, members)
            if not is_finite(blended, members):
                if self.logged:
                    logger.warning("the model's output is not finite for image %d (%r) of a request", i, names[i])
                results[i] = ImageError("non_finite_output", NON_FINITE + (LOGGED if self.logged else ""))
        return results


def _failed(name: str, err: ImageError, strict: bool) -> ImageError:
    """A bad image's error, to keep as its result; raised, naming the image, when the request is strict."""
    if strict:
        raise ImageError(err.kind, f"{name}: {err.message}") from None
    return err

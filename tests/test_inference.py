"""The one inference path (service/inference.py): one result per image, whatever the protocol in front of it."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ClientError
from service.images import ImageError
from service.inference import NON_FINITE, EncodedImage, InferencePath, Prediction, base64_image, encoded_blobs
from service.limits import PixelBudget

CLASSES = 3


def _png(grey: int, side: int = 8) -> bytes:
    """A one-colour PNG (decoded by PIL: no TensorFlow needed)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (grey, grey, grey)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeModel:
    """Answers by an image's top-left value: NaN blended for 0, a NaN member for 1, else one class; records calls."""

    def __init__(self, budget: PixelBudget | None = None) -> None:
        self.calls: list[int] = []
        self.budget, self.held = budget, None

    async def predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        self.calls.append(len(images))
        self.held = self.budget.used if self.budget is not None else None
        outputs = []
        for image in images:
            value = int(image[0, 0, 0])
            blended = np.full(CLASSES, np.nan) if value == 0 else np.eye(CLASSES)[value % CLASSES]
            members = np.array([blended, np.full(CLASSES, np.nan) if value == 1 else blended])
            outputs.append((blended, members))
        return outputs


def _path(model: FakeModel, **limits) -> InferencePath:
    return InferencePath(model.predict, max_pixels=10_000, target=0, downscale_pixels=0, **limits)


def test_each_image_gets_its_own_result_in_order_and_only_the_good_ones_reach_the_model():
    model = FakeModel()
    images = [EncodedImage.of("good", _png(200)), EncodedImage.of("text", b"not an image"),
              EncodedImage.of("big", ImageError("too_large", "over the limit")), EncodedImage.of("nan", _png(0)),
              EncodedImage.of("huge", _png(200, side=101))]
    results = asyncio.run(_path(model).infer(images))
    assert len(results) == len(images) and model.calls == [2]  # the good one and the NaN one, in one call
    assert isinstance(results[0], Prediction) and results[0].blended.argmax() == 200 % CLASSES
    assert [r.kind for r in results[1:]] == ["not_an_image", "too_large", "non_finite_output", "too_many_pixels"]
    assert results[3].message == NON_FINITE  # not logged: nothing says the log names it


def test_a_member_output_that_is_not_finite_fails_the_image_even_when_the_blend_is():
    results = asyncio.run(_path(FakeModel(), logged=True).infer([EncodedImage.of("m", _png(1))]))
    assert results[0].kind == "non_finite_output" and results[0].message.endswith("the server log names the request")


def test_a_strict_request_fails_at_its_first_bad_image_named_and_never_reaches_the_model():
    model = FakeModel()
    images = encoded_blobs([_png(200), b"not an image", b"x" * 100], max_bytes=99, what="instance")
    with pytest.raises(ImageError) as caught:
        asyncio.run(_path(model).infer(images, strict=True))
    assert caught.value.kind == "not_an_image" and caught.value.message.startswith("instance 1: ")
    assert model.calls == []
    with pytest.raises(ImageError, match="^instance 0: larger than 99 bytes$"):
        asyncio.run(_path(model).infer(encoded_blobs([b"x" * 100], 99, "instance"), strict=True))


def test_the_pixels_are_held_in_the_budget_while_predicting_and_released_after():
    budget = PixelBudget(1_000)
    model = FakeModel(budget)
    asyncio.run(_path(model, max_request_pixels=1_000, budget=budget).infer(
        [EncodedImage.of("a", _png(200)), EncodedImage.of("b", _png(100))]))
    assert model.held == 2 * 64 and budget.used == 0
    with pytest.raises(ClientError) as caught:
        asyncio.run(_path(model, max_request_pixels=100, budget=budget).infer(
            [EncodedImage.of("a", _png(200)), EncodedImage.of("b", _png(100))]))
    assert caught.value.status == 413 and model.calls == [2]


def test_a_pixel_tensor_takes_the_same_path_at_four_times_the_pixels():
    budget = PixelBudget(10_000)
    model = FakeModel(budget)
    tensor = np.stack([np.full((4, 4, 3), v, np.float32) for v in (200, 0)])
    results = asyncio.run(_path(model, max_request_pixels=10_000, budget=budget).infer_pixels(tensor))
    assert model.held == 2 * 16 * 4 and budget.used == 0
    assert isinstance(results[0], Prediction) and results[1].kind == "non_finite_output"


def test_base64_at_the_image_limit_is_decoded_wrapped_or_not_and_a_byte_more_is_too_large_undecoded():
    blob = bytes(range(256)) * 4 + b"xy"  # 1026 bytes: its base64 ends in padding
    text = base64.b64encode(blob).decode()
    wrapped = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    for given in (text, text.rstrip("="), wrapped):
        assert base64_image(given, max_bytes=len(blob)) == blob
    over = base64_image(base64.b64encode(blob + b"z").decode(), max_bytes=len(blob))
    assert isinstance(over, ImageError) and over.kind == "too_large"
    assert isinstance(base64_image("A" * 10_000_000, max_bytes=len(blob)), ImageError)  # never split or decoded
    with pytest.raises(ValueError, match="not valid base64"):
        base64_image("QUFBQ", max_bytes=len(blob))

"""A served member's inputs without a SavedModel: the square each decoded image becomes, and the votes of a batch
(every image its own row, TTA passes averaged), with a stand-in model whose output follows every pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ensemble.spec import BlendSpec
from imaging.augment import TTA_AUGMENT, augment_batch
from imaging.geometry import fit_square_tf
from service.predictor import SERVE_TTA_SEED, EnsemblePredictor, MemberModel

SIZE = 12


class PixelModel:
    """A stand-in pixel signature: softmax of each image's channel means (any change of any pixel shows)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __call__(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        self.batches.append(images.numpy())
        weights = tf.constant(np.linspace(0.5, 1.5, SIZE * SIZE * 3).reshape(1, SIZE, SIZE, 3), tf.float32)
        return {"probabilities": tf.nn.softmax(tf.reduce_mean(images * weights, [1, 2]) / 20.0)}


def _member(fit: str = "crop", record_size: int = 0) -> MemberModel:
    return MemberModel("m", Path("."), SIZE, predict_pixels=PixelModel(), fit=fit, record_size=record_size)


def _image(height: int, width: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """Random pixels; float32 ones are fractional (a float image must not be rounded on its way)."""
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    return rng.integers(0, 256, (height, width, 3)).astype(dtype)


@pytest.mark.parametrize("fit", ["crop", "stretch", "pad"])
def test_a_decoded_image_becomes_the_members_square_by_its_fit_and_record_size(fit):
    member = _member(fit)
    # Wide, tall, smaller than the input, one side the input's (not a square: not the shortcut), fractional floats.
    for image in (_image(17, 30, 1), _image(30, 17, 2), _image(5, 7, 3), _image(SIZE, 30, 12), _image(30, SIZE, 13),
                  _image(17, 30, 4, np.float32)):
        square = member.square(image)
        assert square.dtype == np.float32 and square.shape == (SIZE, SIZE, 3)
        np.testing.assert_allclose(square, fit_square_tf(image, SIZE, fit).numpy(), atol=1e-3)
    exact = _image(SIZE, SIZE, 5)
    np.testing.assert_array_equal(member.square(exact), exact.astype(np.float32))  # already its input: as it is
    # A member trained on 20 px records: even a 12 px image goes through the record's square and its resize.
    on_records = _member(fit, record_size=20)
    for image in (_image(17, 30, 6), exact):
        np.testing.assert_allclose(on_records.square(image), fit_square_tf(image, SIZE, fit, 20).numpy(), atol=1e-3)
    assert np.abs(on_records.square(exact) - exact).mean() > 1  # the record road changes the pixels
    np.testing.assert_array_equal(_member(fit, record_size=SIZE).square(exact), exact.astype(np.float32))


def test_each_image_gets_its_own_row_and_tta_averages_the_plain_and_seeded_passes():
    # Pass k applies the one draw of seed (1 + k, 0) to every image: an image's answer never depends on what the
    # dynamic batcher put beside it (each image's own draw by its batch position did: 0.01-0.03 apart).
    member = _member()
    images = [_image(17, 30, 7), _image(SIZE, SIZE, 8), _image(40, 25, 9)]
    plain = member.probabilities(images)
    assert plain.dtype == np.float32 and plain.shape == (3, 3)
    singles = np.concatenate([member.probabilities([image]) for image in images])
    np.testing.assert_allclose(plain, singles, atol=1e-6)  # each row is its own image's
    assert np.abs(plain[0] - plain[1]).max() > 1e-3
    batch = tf.constant(np.stack([member.square(image) for image in images]))
    model = member.predict_pixels
    passes = [model(batch)["probabilities"].numpy()]
    assert SERVE_TTA_SEED == 1  # answers stay the same from one version of the service to the next
    for k in (1, 2, 3):
        one_draw = [augment_batch(square[None], tf.constant([1 + k, 0], tf.int64), TTA_AUGMENT, SIZE)[0]
                    for square in batch]  # each image as a batch of one
        passes.append(model(tf.stack(one_draw))["probabilities"].numpy())
    np.testing.assert_allclose(plain, passes[0], atol=1e-6)  # no augmented pass unless TTA is asked for
    model.batches.clear()
    with_tta = member.probabilities(images, tta=4)
    assert len(model.batches) == 4  # the plain pass and three augmented ones
    np.testing.assert_array_equal(model.batches[0], batch.numpy())
    np.testing.assert_allclose(with_tta, np.mean(passes, axis=0), atol=1e-6)
    assert np.abs(with_tta - plain).max() > 1e-4
    np.testing.assert_allclose(member.probabilities(images, tta=4), with_tta, atol=1e-7)  # the same every time
    alone = np.concatenate([member.probabilities([image], tta=4) for image in images])
    np.testing.assert_allclose(with_tta, alone, atol=1e-6)  # batched or alone, in any position
    np.testing.assert_allclose(member.probabilities(images[::-1], tta=4), with_tta[::-1], atol=1e-6)


@pytest.mark.parametrize("concurrent", [False, True])
def test_the_predictor_blends_the_members_votes_image_by_image(concurrent):
    members = [_member("crop"), _member("pad"), _member("stretch")]
    blend = BlendSpec("weighted", weights=(0.5, 0.3, 0.2))
    for i, m in enumerate(members):
        m.name = f"m{i + 1}"
    timings: list[tuple[str, float]] = []
    predictor = EnsemblePredictor(["a", "b", "c"], members, blend, concurrent_members=concurrent, tta=2,
                                  on_member=lambda name, seconds: timings.append((name, seconds)))
    images = [_image(17, 30, 10), _image(30, 17, 11)]
    blended, votes = predictor.predict(images)
    assert votes.shape == (3, 2, 3) and blended.shape == (2, 3) and blended.dtype == np.float32
    for m, member in enumerate(members):
        np.testing.assert_allclose(votes[m], member.probabilities(images, tta=2), atol=1e-6)  # the predictor's TTA
    np.testing.assert_allclose(blended, np.tensordot([0.5, 0.3, 0.2], votes, axes=1), atol=1e-6)
    assert sorted(name for name, _ in timings) == ["m1", "m2", "m3"]
    assert all(0 < seconds < 60 for _, seconds in timings), timings  # each member's own time


def test_squares_and_tta_passes_compile_once_whatever_the_image_shapes_and_batch_sizes():
    member = _member()
    for height, width in ((17, 30), (40, 25), (33, 33), (SIZE + 1, SIZE)):
        member.square(_image(height, width, height))
    assert member._square["uint8"].experimental_get_tracing_count() == 1  # one trace serves every image shape
    for count in (1, 2, 3):
        member.probabilities([_image(20, 30, k) for k in range(count)], tta=2)
    assert member._augment.experimental_get_tracing_count() == 1  # and one every batch size

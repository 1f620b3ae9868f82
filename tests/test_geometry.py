"""imaging/geometry.py on its own: where a run's fit mode comes from, and TensorFlow's square against the import
tool's (PIL) square on small odd-sized images of every shape, eagerly and in a graph of unknown shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from core.members import DEFAULT_FIT, FILTER, FIT_MODES, data_fit, geometry_record, member_from_document
from imaging.geometry import fit_square_tf
from training.data.importer.squares import fit_square

# (height, width) for a 16 px square: wide and tall, one side already 16 (not a square: it is resized all the same),
# thin strips (padded to a line of one pixel, not lost), bars of an odd total (11 px: 5.5 rounds to 6 as PIL does), one
# smaller than the square with an odd difference (its crop starts half-way into a pixel) and a square of another size.
SHAPES = [(23, 37), (41, 18), (16, 27), (27, 16), (1, 60), (32, 1), (32, 10), (30, 7), (9, 12), (29, 29)]


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colours with crisp blocks: the filter and the placement both show in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([128 + 90 * np.sin(6 * x + c) * np.cos(5 * y - c) for c in range(3)], -1)
    for _ in range(4):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[top:top + max(1, height // 4), left:left + max(1, width // 4)] = rng.integers(0, 256, 3)
    return image.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("fit", FIT_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_tensorflow_square_is_the_import_tools_square(fit, shape):
    image = _picture(*shape)
    got = fit_square_tf(tf.constant(image), 16, fit)
    assert got.dtype == tf.float32 and got.shape == (16, 16, 3)
    expected = np.asarray(fit_square(Image.fromarray(image), 16, fit), np.float32)
    difference = np.abs(got.numpy() - expected)
    assert difference.mean() < 0.5 and np.percentile(difference, 99) < 2, (difference.mean(), difference.max())
    if fit == "pad":  # the bars: exactly the same rows and columns are black
        np.testing.assert_array_equal(got.numpy().max(axis=(1, 2)) == 0, expected.max(axis=(1, 2)) == 0)
        np.testing.assert_array_equal(got.numpy().max(axis=(0, 2)) == 0, expected.max(axis=(0, 2)) == 0)


@pytest.mark.parametrize("fit", FIT_MODES)
def test_fine_detail_is_filtered_away_not_aliased(fit):
    # One white column in three, shrunk about 4x: the antialiased filter gives an even grey (as PIL does); without
    # antialiasing the lines alias into stripes of 0..255.
    lines = np.repeat(((np.arange(77) % 3 == 0) * 255).astype(np.uint8)[None, :, None], 61, axis=0).repeat(3, axis=2)
    got = fit_square_tf(tf.constant(lines), 16, fit).numpy()
    expected = np.asarray(fit_square(Image.fromarray(lines), 16, fit), np.float32)
    assert np.abs(got - expected).max() < 6
    content = got[expected.max(axis=(1, 2)) > 0]  # the rows that are not a pad's bars
    assert np.abs(content - 85).max() < 20, (content.min(), content.max())


@pytest.mark.parametrize("fit", FIT_MODES)
def test_the_square_is_graph_safe_for_images_of_unknown_shape(fit):
    squared = tf.function(lambda image: fit_square_tf(image, 16, fit),
                          input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    for shape in SHAPES:
        image = tf.constant(_picture(*shape, seed=1))
        np.testing.assert_allclose(squared(image).numpy(), fit_square_tf(image, 16, fit).numpy(), atol=1e-3)


@pytest.mark.parametrize("fit", FIT_MODES)
def test_an_image_already_the_squares_size_is_kept_as_it_is(fit):
    image = _picture(16, 16, seed=2)
    np.testing.assert_array_equal(fit_square_tf(tf.constant(image), 16, fit).numpy(), image.astype(np.float32))
    floats = tf.constant(image.astype(np.float32) + 0.25)  # float input is taken as it is, not rounded
    np.testing.assert_array_equal(fit_square_tf(floats, 16, fit).numpy(), floats.numpy())


@pytest.mark.parametrize("fit", FIT_MODES)
def test_a_record_size_makes_the_square_there_then_resizes_it_bilinearly(fit):
    image = tf.constant(_picture(23, 37, seed=3))
    at_record = fit_square_tf(image, 24, fit)
    expected = tf.image.resize(at_record, [16, 16], method="bilinear").numpy()
    np.testing.assert_allclose(fit_square_tf(image, 16, fit, record_size=24).numpy(), expected, atol=1e-4)
    direct = fit_square_tf(image, 16, fit).numpy()
    assert np.abs(direct - expected).mean() > 0.5  # the two roads differ: the test can tell them apart
    np.testing.assert_array_equal(fit_square_tf(image, 16, fit, record_size=16).numpy(), direct)


def test_values_stay_within_the_pixel_range():
    # Lanczos overshoots at hard edges; the square is clipped to 0..255 as the import tool's 8-bit image is.
    checker = np.kron(np.indices((6, 6)).sum(0) % 2, np.ones((5, 7))).astype(np.uint8)[..., None] * np.uint8(255)
    image = np.repeat(checker, 3, axis=2)
    for fit in FIT_MODES:
        for size in (16, 50):
            square = fit_square_tf(tf.constant(image), size, fit).numpy()
            assert square.min() >= 0.0 and square.max() <= 255.0, (fit, size)
            assert square.max() == 255.0 and square.min() == 0.0, (fit, size)


def test_a_padded_panorama_keeps_a_one_pixel_line_at_import_and_in_tensorflow():
    # Thinner than 1:32 at 16 px, PIL's ImageOps.pad scaled the short side to 0 px: an all-black training image.
    for shape, line in (((1, 60), np.s_[8, :]), ((32, 1), np.s_[:, 8]), ((2, 64), np.s_[8, :])):
        image = np.full(shape + (3,), 200, np.uint8)
        imported = np.asarray(fit_square(Image.fromarray(image), 16, "pad"), np.float32)
        served = fit_square_tf(tf.constant(image), 16, "pad").numpy()
        for square in (imported, served):
            np.testing.assert_allclose(square[line], 200, atol=1)
            assert (square > 0).sum() == 16 * 3, shape  # that line only
    palette = Image.new("RGB", (40, 1), (200, 30, 90)).convert("P")  # PIL pastes no palette along
    as_rgb = np.asarray(fit_square(palette.convert("RGB"), 8, "pad")).astype(int)
    np.testing.assert_allclose(np.asarray(fit_square(palette, 8, "pad")), as_rgb, atol=1)
    assert as_rgb[4].min() > 20  # the line, in colour


def test_an_unknown_fit_mode_is_refused_by_name():
    for call in (lambda: fit_square_tf(tf.zeros([4, 4, 3]), 4, "squash"), lambda: geometry_record("squash", "x")):
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == "fit must be one of ('crop', 'stretch', 'pad'), got 'squash'"


def test_a_runs_fit_comes_from_the_option_else_the_import_report_else_the_default(tmp_path):
    assert DEFAULT_FIT == "crop" and FILTER == "lanczos3"
    assert data_fit(str(tmp_path), "pad") == {"fit": "pad", "filter": "lanczos3", "from": "data.fit"}
    assert data_fit(str(tmp_path)) == {"fit": "crop", "filter": "lanczos3", "from": "default"}  # no report
    report = tmp_path / "import_report.json"
    report.write_text(json.dumps({"fit": "stretch", "sizes": [16]}))
    assert data_fit(str(tmp_path)) == {"fit": "stretch", "filter": "lanczos3", "from": str(report)}
    assert data_fit(str(tmp_path), "crop")["fit"] == "crop"  # the option wins over the report
    assert data_fit("gs://bucket/flowers")["from"] == "default"  # a bucket: no report is read
    report.write_text(json.dumps({"sizes": [16]}))  # imported before the fit mode was recorded
    assert data_fit(str(tmp_path)) == {"fit": "crop", "filter": "lanczos3", "from": "default"}
    for text, message in (('{"fit": "squash"}', "'fit' is 'squash', not one of"),
                          ("{broken", "cannot be read for its 'fit'"), ("[1, 2]", "cannot be read for its 'fit'")):
        report.write_text(text)
        with pytest.raises(ValueError, match=message) as refused:
            data_fit(str(tmp_path))
        assert str(refused.value).startswith(str(report))


def member_geometry(document: dict, where: str) -> tuple[str, int]:
    """The geometry core.members reads from a member.json document at `where`."""
    return member_from_document(document, Path(where)).geometry()


def test_a_member_says_its_fit_and_record_size_or_gets_the_defaults():
    assert member_geometry({"geometry": {"fit": "pad"}, "data": {"file_size": 192}}, "m") == ("pad", 192)
    assert member_geometry({}, "m") == ("crop", 0)  # an older member: crop, no record size
    assert member_geometry({"data": "odd"}, "m") == ("crop", 0)
    assert member_geometry({"data": {"file_size": 0}}, "m") == ("crop", 0)
    assert member_geometry({"data": {}}, "m") == ("crop", 0)  # no record size: none between photo and input
    for member, message in (
        ({"geometry": "crop"}, "m/member.json: 'geometry' must be an object whose 'fit' is one of"),
        ({"geometry": {"fit": "squash"}}, "'fit' is one of \\('crop', 'stretch', 'pad'\\), got \\{'fit': 'squash'\\}"),
        ({"data": {"file_size": True}}, "m/member.json: 'data'.'file_size' must be a record size in pixels, got True"),
        ({"data": {"file_size": -1}}, "got -1"),
        ({"data": {"file_size": "192"}}, "got '192'"),
    ):
        with pytest.raises(ValueError, match=message):
            member_geometry(member, "m/member.json")

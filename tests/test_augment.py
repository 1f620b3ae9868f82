"""Augmentation invariants: shapes, value range, identity when off, seeding, graph mode, soft labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from flower.commands.augment_grid import main as show_augment_main
from imaging.augment import AugmentConfig, augment_batch, augment_image, mix_batch, resize_image

NO_GEOMETRY = dict(flip_left_right=False, rotation=0.0, shear=0.0, zoom=0.0, shift=0.0)
NO_COLOUR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _image(size: int = 24, seed: int = 0) -> tf.Tensor:
    """A random float32 RGB image in 0..255."""
    return tf.random.stateless_uniform([size, size, 3], [seed, 1], 0.0, 255.0)


def _seed(a: int = 1, b: int = 2) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


EVERYTHING_ON = AugmentConfig(
    flip_up_down=True, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, erase_prob=0.5,
    cutmix_prob=0.3, mixup_prob=0.3,
)


@pytest.mark.parametrize("in_size,out_size", [(24, 24), (24, 16), (24, 40)])
def test_every_transform_keeps_shape_dtype_and_range(in_size, out_size):
    for s in range(5):
        out = augment_image(_image(in_size, s), _seed(s, 9), EVERYTHING_ON, out_size)
        assert out.shape == (out_size, out_size, 3) and out.dtype == tf.float32
        assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0


def test_switched_off_is_the_identity_or_the_plain_resize():
    image = _image(24)
    np.testing.assert_array_equal(augment_image(image, _seed(), AugmentConfig.off(), 24), image)
    np.testing.assert_array_equal(augment_image(image, _seed(), AugmentConfig.off(), 16), resize_image(image, 16))
    zero = AugmentConfig(**NO_GEOMETRY, **NO_COLOUR)
    np.testing.assert_array_equal(augment_image(image, _seed(), zero, 24), image)
    # On, but nothing for the pixels (e.g. only MixUp, done later on the batch): still resized to the model's size.
    resized = augment_image(image, _seed(), dataclasses.replace(zero, mixup_prob=0.5), 16)
    np.testing.assert_allclose(resized, resize_image(image, 16), atol=1e-3)


@pytest.mark.parametrize("out_size", [16, 40])
def test_fused_resampling_with_zero_magnitudes_equals_the_bilinear_resize(out_size):
    # Only the flip path is on but never fires for a zero-probability up-down flip: the transform
    # pass runs with the identity augmentation and must reproduce tf.image.resize exactly.
    config = AugmentConfig(**(NO_GEOMETRY | {"flip_up_down": True}), **NO_COLOUR)
    image = _image(24)
    for s in range(6):
        out = augment_image(image, _seed(s, 0), config, out_size)
        expected = resize_image(image, out_size)
        flipped = tf.reverse(expected, axis=[0])
        err = min(float(tf.reduce_max(tf.abs(out - expected))), float(tf.reduce_max(tf.abs(out - flipped))))
        assert err < 1e-3


def test_a_flip_only_config_gives_the_image_or_its_mirror_and_both_occur():
    config = AugmentConfig(**(NO_GEOMETRY | {"flip_left_right": True}), **NO_COLOUR)
    image = _image(20)
    seen = set()
    for s in range(12):
        out = augment_image(image, _seed(s, 5), config, 20).numpy()
        if np.allclose(out, image.numpy(), atol=1e-3):
            seen.add("same")
        elif np.allclose(out, image.numpy()[:, ::-1], atol=1e-3):
            seen.add("mirror")
        else:
            pytest.fail("flip-only output is neither the image nor its mirror")
    assert seen == {"same", "mirror"}


def test_the_same_seed_gives_the_same_augmentation_and_others_differ():
    image = _image(24)
    a = augment_image(image, _seed(4, 4), EVERYTHING_ON, 24)
    b = augment_image(image, _seed(4, 4), EVERYTHING_ON, 24)
    c = augment_image(image, _seed(4, 5), EVERYTHING_ON, 24)
    np.testing.assert_array_equal(a, b)
    assert float(tf.reduce_max(tf.abs(a - c))) > 1.0


def test_augmentation_runs_inside_tf_data_and_matches_eager():
    image = _image(24)
    eager = augment_image(image, _seed(7, 7), EVERYTHING_ON, 16)
    ds = tf.data.Dataset.from_tensors((image, _seed(7, 7))).map(lambda x, s: augment_image(x, s, EVERYTHING_ON, 16))
    np.testing.assert_allclose(next(iter(ds)), eager, atol=1e-4)


def test_rotation_moves_pixels_but_keeps_a_centred_disc():
    size = 33
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 8**2).astype(np.float32)
    image = tf.constant(np.repeat(disc[..., None] * 255.0, 3, axis=2))
    config = AugmentConfig(**(NO_GEOMETRY | {"rotation": 40.0}), **NO_COLOUR)
    out = augment_image(image, _seed(3, 3), config, size).numpy()
    assert abs(out.mean() - image.numpy().mean()) < 2.0  # a disc rotated about its centre stays a disc


def test_colour_jitter_keeps_greys_grey_under_hue_and_saturation():
    grey = tf.fill([8, 8, 3], 120.0)
    config = AugmentConfig(**NO_GEOMETRY | {"hue": 0.4, "saturation": 0.9})
    for s in range(4):
        out = augment_image(grey, _seed(s, 1), config, 8).numpy()
        np.testing.assert_allclose(out, 120.0, atol=0.05)


def test_hue_rotation_changes_colours_but_keeps_brightness():
    pink = tf.constant([[[160.0, 110.0, 100.0]]]) * tf.ones([8, 8, 3])  # unsaturated: no clipping
    config = AugmentConfig(**NO_GEOMETRY | {"hue": 0.3})
    outs = [augment_image(pink, _seed(s, 1), config, 8).numpy()[0, 0] for s in range(6)]
    luma = [float(o @ np.array([0.299, 0.587, 0.114])) for o in outs]
    assert max(np.abs(o - [160, 110, 100]).max() for o in outs) > 10
    np.testing.assert_allclose(luma, 160 * 0.299 + 110 * 0.587 + 100 * 0.114, atol=1.0)


def test_brightness_shifts_every_pixel_by_the_same_amount():
    image = tf.fill([6, 6, 3], 100.0)
    out = augment_image(image, _seed(), AugmentConfig(**NO_GEOMETRY | {"brightness": 0.2}), 6).numpy()
    assert np.ptp(out) < 1e-3 and abs(out[0, 0, 0] - 100.0) <= 0.2 * 255 + 1e-3


def test_contrast_scales_distances_from_the_mean():
    image = tf.constant(np.tile(np.array([60.0, 180.0])[None, :, None], [8, 4, 3]), tf.float32)
    outs = [augment_image(image, _seed(s, 3), AugmentConfig(**NO_GEOMETRY | {"contrast": 0.5}), 8) for s in range(4)]
    spreads = [float(o[0, 1, 0] - o[0, 0, 0]) for o in outs]
    assert all(60.0 <= s <= 180.0 for s in spreads) and np.ptp(spreads) > 5
    for o in outs:
        assert abs(float(tf.reduce_mean(o)) - 120.0) < 0.5


def test_random_erasing_replaces_one_rectangle_within_the_area_range():
    size = 40
    images = tf.fill([6, size, size, 3], 7.0)
    config = AugmentConfig(**NO_GEOMETRY, erase_prob=1.0, erase_area=(0.05, 0.2))
    out = augment_batch(images, _seed(), config, size).numpy()
    for image in out:
        changed = np.any(image != 7.0, axis=2)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert changed.sum() == len(rows) * len(cols)  # a filled rectangle
        assert 0.02 <= changed.mean() <= 0.25
    untouched = augment_batch(images, _seed(), AugmentConfig(**NO_GEOMETRY, erase_prob=0.0), size)
    np.testing.assert_array_equal(untouched, images)


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_a_shift_fills_the_uncovered_border_by_the_fill_mode(fill_mode):
    ramp = tf.constant(np.tile(np.arange(16, dtype=np.float32)[None, :, None] * 10, [16, 1, 3]))
    config = AugmentConfig(**NO_GEOMETRY | {"shift": 300.0, "fill_mode": fill_mode}, shift_reference_size=192)
    out = augment_image(ramp, _seed(8, 8), config, 16).numpy()[..., 0]
    src = ramp.numpy()[..., 0]
    assert out.shape == (16, 16)
    if fill_mode == "constant":
        assert (out == 0).any()
    else:  # every output value is one of the source's values (integer shifts of a ramp) or between two
        assert out.min() >= src.min() - 1e-3 and out.max() <= src.max() + 1e-3


def test_the_compiled_and_plain_graphs_agree():
    # Erase noise comes from different random kernels with and without XLA, so erasing is left out.
    images = tf.stack([_image(24, s) for s in range(3)])
    for fill_mode in ("nearest", "reflect", "wrap", "constant"):
        config = dict(EVERYTHING_ON.__dict__, erase_prob=0.0, fill_mode=fill_mode)
        fast = augment_batch(images, _seed(), AugmentConfig(**config), 20)
        plain = augment_batch(images, _seed(), AugmentConfig(**config | {"jit_compile": False}), 20)
        np.testing.assert_allclose(fast, plain, atol=1e-2)


def _flat_batch(count: int, size: int = 16, classes: int = 4):
    """Images whose pixels all equal their index, with one-hot labels of class index % classes."""
    images = tf.constant(np.arange(count, dtype=np.float32)[:, None, None, None] * np.ones((1, size, size, 3)))
    labels = tf.one_hot(np.arange(count) % classes, classes)
    return tf.cast(images, tf.float32), labels


def test_cutmix_labels_equal_the_pasted_area_and_sum_to_one():
    images, labels = _flat_batch(8)
    mixed, soft = mix_batch(images, labels, _seed(), AugmentConfig(cutmix_prob=1.0))
    soft = soft.numpy()
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    shares = []
    for i in range(8):
        partner = (i - 1) % 8
        pasted = float(np.mean(mixed.numpy()[i, ..., 0] == partner))
        assert abs(soft[i, partner % 4] - pasted) < 1e-5  # partners always have another class here
        shares.append(pasted)
    assert sum(shares) > 0.5


def test_mixup_blends_pixels_and_labels_with_the_same_weight():
    images, labels = _flat_batch(8)
    mixed, soft = mix_batch(images, labels, _seed(), AugmentConfig(mixup_prob=1.0, mixup_alpha=0.4))
    soft = soft.numpy()
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    assert (soft >= 0).all()
    for i in range(8):
        partner = (i - 1) % 8
        weight = (float(mixed[i, 0, 0, 0]) - i) / (partner - i)  # pixel = (1-w) i + w partner
        assert abs(soft[i, partner % 4] - weight) < 1e-4


def test_mixing_is_a_no_op_when_switched_off():
    images, labels = _flat_batch(4)
    mixed, soft = mix_batch(images, labels, _seed(), AugmentConfig())
    assert mixed is images and soft is labels


@pytest.mark.parametrize(
    "values,message",
    [
        ({"rotation": -1}, "augment.rotation must be >= 0"),
        ({"erase_prob": 1.5}, "augment.erase_prob must be in"),
        ({"cutmix_prob": 0.7, "mixup_prob": 0.6}, "cutmix_prob \\+ augment.mixup_prob"),
        ({"erase_area": [0.3, 0.1]}, "augment.erase_area"),
        ({"fill_mode": "mirror"}, "augment.fill_mode must be one of"),
        ({"rotaton": 3}, "unknown option\\(s\\) \\['augment.rotaton'\\]"),
        ({"flip_left_right": "no"}, "augment.flip_left_right: expected bool, got 'no'"),
        ({"erase_area": [0.1]}, "augment.erase_area: expected a pair"),
    ],
)
def test_bad_augment_options_are_rejected_with_the_option_named(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_dict(values)


def test_the_grid_command_writes_a_png(tiny_data, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = show_augment_main([
        "--data", str(tiny_data), "--size", "32", "--rows", "2", "--copies", "3", "--out", str(out),
        "--set", "cutmix_prob=0.5", "--set", "erase_prob=0.5",
    ])
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert show_augment_main(["--data", str(tmp_path / "none"), "--size", "32", "--out", str(out)]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_rotation_turns_a_marked_spot_about_the_centre_by_the_sampled_angle():
    from imaging.augment import _seeds, sample_affine

    size, centre = 33, 16.0
    image = np.zeros((size, size, 3), np.float32)
    image[15:18, 27:30] = 255.0  # a spot 12 px right of the centre
    config = AugmentConfig(**(NO_GEOMETRY | {"rotation": 30.0}), **NO_COLOUR)
    angles = []
    for s in range(8):
        seed = _seed(s, 11)
        out = augment_image(tf.constant(image), seed, config, size).numpy()[..., 0]
        weight = out / out.sum()
        rows, cols = np.mgrid[:size, :size]
        y, x = float((weight * rows).sum()), float((weight * cols).sum())
        assert abs(np.hypot(x - centre, y - centre) - 12.0) < 0.5  # a rotation keeps the distance to the centre
        angles.append(np.degrees(np.arctan2(y - centre, x - centre)))
        # The sampled map takes the spot's new place back to where it was.
        affine = sample_affine(_seeds(seed, 4)[0], 1, config, size, size).numpy()[0]
        back = affine @ np.array([x, y, 1.0])
        np.testing.assert_allclose(back, [28.0, 16.0], atol=0.5)
        np.testing.assert_allclose(affine[:, :2] @ affine[:, :2].T, np.eye(2), atol=1e-5)  # pure rotation
    angles = np.array(angles)
    assert 8.0 < np.abs(angles).mean() < 60.0 and (angles > 1).any() and (angles < -1).any()


def test_zoom_and_shear_change_the_shape_and_shift_moves_without_turning():
    from imaging.augment import _seeds, sample_affine

    seed = _seeds(_seed(2, 2), 4)[0]
    zoom = sample_affine(seed, 64, AugmentConfig(**(NO_GEOMETRY | {"zoom": 0.2})), 32, 32).numpy()
    scales = np.concatenate([zoom[:, 0, 0], zoom[:, 1, 1]])
    assert np.allclose(zoom[:, 0, 1], 0) and np.allclose(zoom[:, 1, 0], 0) and 0.1 < np.std(1 / scales) < 0.3
    shear = sample_affine(seed, 64, AugmentConfig(**(NO_GEOMETRY | {"shear": 10.0})), 32, 32).numpy()
    # The notebooks' shear: x leans by sin(angle) of y, y shrinks by cos(angle) (inverse map here).
    assert np.abs(shear[:, 0, 1]).mean() > 0.05 and np.allclose(shear[:, 0, 0], 1) and np.allclose(shear[:, 1, 0], 0)
    np.testing.assert_allclose(shear[:, 1, 1], np.sqrt(1 + shear[:, 0, 1] ** 2), rtol=1e-4)
    shift = sample_affine(seed, 64, AugmentConfig(**(NO_GEOMETRY | {"shift": 16.0})), 32, 32).numpy()
    np.testing.assert_allclose(shift[:, :, :2], np.tile(np.eye(2), (64, 1, 1)), atol=1e-6)
    assert 1.5 < np.std(shift[:, :, 2]) < 4.5  # 16 px at 192 px is about 2.7 px at 32 px
    resized = sample_affine(seed, 2, AugmentConfig(**NO_GEOMETRY), 64, 32).numpy()
    np.testing.assert_allclose(resized[:, :, :2], np.tile(2 * np.eye(2), (2, 1, 1)), atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--size", "0"], "error: --size must be at least 1, got 0"),
    (["--size", "-3"], "error: --size must be at least 1, got -3"),
    (["--rows", "0"], "error: --rows must be at least 1, got 0"),
    (["--copies", "0"], "error: --copies must be at least 1, got 0"),
    (["--copies", "-1"], "error: --copies must be at least 1, got -1"),
])
def test_the_grid_command_refuses_sizes_rows_and_copies_below_one(tiny_data, tmp_path, capsys, args, message):
    out = tmp_path / "grid.png"
    assert show_augment_main(["--data", str(tiny_data), "--size", "32", "--out", str(out), *args]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not out.exists()


def test_resize_image_makes_any_rectangle_the_square_of_the_size():
    tall, wide = _image(48)[:, :32], _image(48)[:32]  # 48x32 and 32x48
    for image in (tall, wide, tf.stack([tall, tall])):
        out = resize_image(image, 32)
        assert out.shape[-3:] == (32, 32, 3)
        np.testing.assert_allclose(out, tf.image.resize(image, [32, 32], method="bilinear"), atol=1e-4)


@pytest.mark.parametrize("out_size", [16, 40])
def test_without_geometry_the_pixel_pass_resizes_on_the_evaluation_grid(out_size):
    # Geometry off but the pixel pass on (an erase probability that never fires): its resize-only affine maps
    # must sample exactly where `resize_image` does.
    config = AugmentConfig(**NO_GEOMETRY, **NO_COLOUR, erase_prob=1e-9)
    images = tf.stack([_image(24, s) for s in range(3)])
    out = augment_batch(images, _seed(), config, out_size)
    np.testing.assert_allclose(out, resize_image(images, out_size), atol=1e-3)


def test_box_masks_cover_exactly_their_rows_and_columns():
    from imaging.augment import _box_mask

    boxes = tf.constant([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 0.0, 3.0]])  # top, left, height, width
    mask = _box_mask(8, boxes).numpy()[..., 0]
    expected = np.zeros((3, 8, 8))
    expected[0, 1:4, 2:6] = 1.0
    expected[1] = 1.0  # the whole image; the third box has no height: nothing
    np.testing.assert_array_equal(mask, expected)


def test_erased_boxes_hold_uniform_noise_over_the_whole_pixel_range():
    config = AugmentConfig(**NO_GEOMETRY, **NO_COLOUR, erase_prob=1.0, erase_area=(0.5, 0.5))
    images = tf.fill([16, 32, 32, 3], 100.0)
    out = augment_batch(images, _seed(), config, 32).numpy()
    noise = out[out != 100.0]
    assert noise.size > 0.4 * out.size  # about half of every image is erased
    assert abs(noise.mean() - 127.5) < 2.0 and noise.min() < 5.0 and noise.max() > 250.0


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_mixup_weights_follow_beta_alpha_alpha(alpha):
    # MixUp's partner weight is 1 - Beta(alpha, alpha): mean 1/2, variance 1 / (4 (2 alpha + 1)).
    count = 4000
    images = tf.constant(np.arange(count, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3)), tf.float32)
    labels = tf.one_hot(np.arange(count) % 2, 2)
    mixed, _ = mix_batch(images, labels, _seed(), AugmentConfig(mixup_prob=1.0, mixup_alpha=alpha))
    own, partner = np.arange(count), (np.arange(count) - 1) % count
    weights = (mixed.numpy()[:, 0, 0, 0] - own) / (partner - own)
    assert abs(weights.mean() - 0.5) < 0.02
    assert abs(weights.var() - 1 / (4 * (2 * alpha + 1))) < 0.1 / (4 * (2 * alpha + 1))


def test_cutmix_and_mixup_take_their_share_of_images_and_leave_the_rest_untouched():
    count = 4000
    images, labels = _flat_batch(count, size=8)
    config = AugmentConfig(cutmix_prob=0.3, mixup_prob=0.4, mixup_alpha=2.0)  # MixUp weights rarely near 0 or 1
    mixed, soft = mix_batch(images, labels, _seed(), config)
    pixels, own = mixed.numpy()[..., 0], np.arange(count)[:, None, None]
    is_own, is_partner = pixels == own, pixels == (own - 1) % count
    untouched = is_own.all(axis=(1, 2))
    cut = ~untouched & (is_own | is_partner).all(axis=(1, 2))  # whole pixels of the image or of its partner
    blended = ~(is_own | is_partner).all(axis=(1, 2))
    # A CutMix box rounds to nothing for about 1.5 % of its images (lam within 1/64 of 1): they count as untouched.
    assert abs(cut.mean() - 0.3) < 0.03 and abs(blended.mean() - 0.4) < 0.03 and abs(untouched.mean() - 0.3) < 0.03
    np.testing.assert_array_equal(soft.numpy()[untouched], labels.numpy()[untouched])


def test_cutmix_pastes_one_rectangle_of_about_one_minus_lambda_centred_anywhere():
    # With alpha 100, lam is 1/2 (std 0.035): every box has side size * sqrt(1/2), centred uniformly, clipped to the
    # image. Per axis the clipped length is min(c + a, 1) - max(c - a, 0) for c ~ U(0, 1), a = sqrt(1/2) / 2,
    # whose mean is 2a - a^2; the two axes are independent, so the mean pasted share is (2a - a^2)^2 = 0.339.
    count, size = 1000, 64
    images, labels = _flat_batch(count, size)
    mixed, _ = mix_batch(images, labels, _seed(), AugmentConfig(cutmix_prob=1.0, cutmix_alpha=100.0))
    pasted = mixed.numpy()[..., 0] != np.arange(count)[:, None, None]
    rows, cols = pasted.any(axis=2), pasted.any(axis=1)
    np.testing.assert_array_equal(pasted, rows[:, :, None] & cols[:, None, :])  # one axis-aligned rectangle each
    a = np.sqrt(0.5) / 2
    assert abs(pasted.mean() - (2 * a - a * a) ** 2) < 0.01
    inner = ~rows[:, 0] & ~rows[:, -1] & ~cols[:, 0] & ~cols[:, -1]  # boxes that no edge clipped
    side = size * np.sqrt(0.5)
    assert inner.sum() > 40  # expected (1 - 2a)^2 = 8.6 %
    heights, widths = rows[inner].sum(1), cols[inner].sum(1)
    assert (np.abs(heights - widths) <= 1).all()  # squares
    assert abs(heights.mean() - side) < 1.0 and (np.abs(heights - side) <= 6).all()  # lam's spread: side +- 1.6
    for edge in (rows[:, 0], rows[:, -1], cols[:, 0], cols[:, -1]):
        assert 0.25 < edge.mean() < 0.45  # a box reaches each edge when its centre is within a of it: 35 %
    frequency = pasted.mean(axis=0)
    assert abs(frequency[: size // 2].mean() - frequency[size // 2:].mean()) < 0.04  # centred anywhere: symmetric
    assert abs(frequency[:, : size // 2].mean() - frequency[:, size // 2:].mean()) < 0.04


def _forward_parameters(affine: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Rotation, shear (degrees), zooms, flips and shifts read back from inverse maps [B, 2, 3] of a size->size
    transform: the forward map is q = R(rotation) Shear(shear) Zoom Flip p + t on centred coordinates, so its
    first column is zoom_x flip_x (cos r, sin r) and its second zoom_y flip_y (-sin(r + s), cos(r + s))."""
    forward = np.linalg.inv(affine[:, :, :2].astype(np.float64))
    col0, col1 = forward[:, :, 0], forward[:, :, 1]
    rotation = np.degrees(np.arctan(col0[:, 1] / col0[:, 0]))
    centre = (size - 1) / 2.0
    out = np.einsum("bij,bj->bi", forward, centre - affine[:, :, 2]) - centre  # where the input centre goes
    return {"rotation": rotation, "shear": np.degrees(np.arctan(-col1[:, 0] / col1[:, 1])) - rotation,
            "zoom_x": np.linalg.norm(col0, axis=1), "zoom_y": np.linalg.norm(col1, axis=1),
            "flip_x": np.sign(col0[:, 0]), "flip_y": np.sign(col1[:, 1]), "shift_x": out[:, 0], "shift_y": out[:, 1]}


def test_the_affine_parameters_have_their_documented_spreads_and_are_independent():
    from imaging.augment import _seeds, sample_affine

    config = AugmentConfig(flip_up_down=True, rotation=10.0, shear=5.0, zoom=0.1, shift=16.0, shift_reference_size=192)
    affine = sample_affine(_seeds(_seed(4, 4), 4)[0], 4000, config, 32, 32).numpy()
    p = _forward_parameters(affine, 32)
    spreads = {"rotation": 10.0, "shear": 5.0, "zoom_x": 0.1, "zoom_y": 0.1, "shift_x": 16.0 * 32 / 192,
               "shift_y": 16.0 * 32 / 192, "flip_x": 1.0, "flip_y": 1.0}  # flips: -1 or 1 with even odds
    for name, spread in spreads.items():
        assert abs(p[name].std() / spread - 1) < 0.08, name
    assert abs(p["zoom_x"].mean() - 1) < 0.01 and abs(p["flip_x"].mean()) < 0.08 and abs(p["flip_y"].mean()) < 0.08
    correlations = np.corrcoef(np.stack([p[name] for name in spreads]))
    assert np.abs(correlations - np.eye(len(spreads))).max() < 0.1  # each drawn on its own


def test_rotation_with_zoom_keeps_right_angles():
    from imaging.augment import _seeds, sample_affine

    config = AugmentConfig(**(NO_GEOMETRY | {"rotation": 20.0, "zoom": 0.2}))
    forward = np.linalg.inv(sample_affine(_seeds(_seed(3, 1), 4)[0], 256, config, 24, 24).numpy()[:, :, :2])
    cosine = np.einsum("bi,bi->b", forward[:, :, 0], forward[:, :, 1])
    cosine /= np.linalg.norm(forward[:, :, 0], axis=1) * np.linalg.norm(forward[:, :, 1], axis=1)
    assert np.abs(cosine).max() < 1e-5  # R(angle) Zoom: no shear appears


def test_darkening_clips_at_black():
    config = AugmentConfig(**NO_GEOMETRY, brightness=0.3)
    out = augment_batch(tf.fill([8, 8, 8, 3], 10.0), _seed(), config, 8).numpy()
    assert out.min() == 0.0 and (out.reshape(8, -1) == 0.0).all(axis=1).any()  # some images are pushed to black


@pytest.mark.parametrize("fill_mode,right,left", [
    # A ramp of columns 10, 20, ..., 160 moved by 5 columns each way: what the 5 uncovered columns show.
    ("nearest", [160] * 5, [10] * 5),
    ("wrap", [10, 20, 30, 40, 50], [120, 130, 140, 150, 160]),
    ("reflect", [160, 150, 140, 130, 120], [50, 40, 30, 20, 10]),  # mirrored about the edge, the edge repeated
    ("constant", [0] * 5, [0] * 5),
])
def test_each_fill_mode_fills_the_uncovered_columns_with_its_own_pixels(fill_mode, right, left):
    from imaging.augment import _resample

    ramp = np.tile((np.arange(16, dtype=np.float32) + 1)[None, :, None] * 10, [16, 1, 3])[None]
    for shift, edge, expected in ((5.0, slice(11, 16), right), (-5.0, slice(0, 5), left)):
        affine = tf.constant([[[1.0, 0.0, shift], [0.0, 1.0, 0.0]]])  # output column j samples input column j + shift
        out = _resample(tf.constant(ramp), affine, 16, fill_mode).numpy()[0, :, :, 0]
        np.testing.assert_array_equal(out[:, edge], np.tile(np.array(expected, np.float32), (16, 1)))
        covered = np.arange(11) if shift > 0 else np.arange(5, 16)
        np.testing.assert_array_equal(out[:, covered], ramp[0][:, covered + int(shift), 0])


def test_rotation_with_shear_keeps_lengths_and_turns_the_second_axis_by_the_shear():
    from imaging.augment import _seeds, sample_affine

    config = AugmentConfig(**(NO_GEOMETRY | {"rotation": 20.0, "shear": 20.0}))
    forward = np.linalg.inv(sample_affine(_seeds(_seed(6, 1), 4)[0], 256, config, 24, 24).numpy()[:, :, :2])
    np.testing.assert_allclose(np.linalg.norm(forward, axis=1), 1.0, atol=1e-5)  # no zoom: both axes keep length
    shear = np.degrees(np.arcsin(-np.einsum("bi,bi->b", forward[:, :, 0], forward[:, :, 1])))  # axes at 90 + shear
    assert 15 < shear.std() < 25


def _reference_resample(images: np.ndarray, affine: np.ndarray, out_size: int, fill_mode: str) -> np.ndarray:
    """Bilinear sampling written out pixel by pixel in float64: the definition `_resample` must meet."""
    batch, n = images.shape[0], images.shape[1]
    out = np.zeros((batch, out_size, out_size, 3))

    def fold(i: int) -> tuple[int, bool]:
        inside = 0 <= i < n
        if fill_mode == "wrap":
            return i % n, inside
        if fill_mode == "reflect":
            m = i % (2 * n)
            return (2 * n - 1 - m if m >= n else m), inside
        return min(max(i, 0), n - 1), inside

    for b in range(batch):
        for row in range(out_size):
            for col in range(out_size):
                x = affine[b, 0, 0] * col + affine[b, 0, 1] * row + affine[b, 0, 2]
                y = affine[b, 1, 0] * col + affine[b, 1, 1] * row + affine[b, 1, 2]
                if fill_mode == "nearest":
                    x, y = min(max(x, 0.0), n - 1.0), min(max(y, 0.0), n - 1.0)
                x0, y0 = int(np.floor(x)), int(np.floor(y))
                value = np.zeros(3)
                for dy, wy in ((0, 1 - (y - y0)), (1, y - y0)):
                    for dx, wx in ((0, 1 - (x - x0)), (1, x - x0)):
                        (fy, iny), (fx, inx) = fold(y0 + dy), fold(x0 + dx)
                        keep = 1.0 if fill_mode != "constant" or (iny and inx) else 0.0
                        value += wy * wx * keep * images[b, fy, fx].astype(np.float64)
                out[b, row, col] = value
    return out


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_resampling_equals_bilinear_sampling_written_out_for_each_fill_mode(fill_mode):
    # Three images, each with its own turned, sheared, scaled and shifted grid reaching well outside the image.
    from imaging.augment import _resample

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    affine = np.stack([np.array([[1.3, -0.4, -4.2], [0.35, 0.9, 3.7]]),
                       np.array([[-0.8, 0.6, 11.3], [-0.5, -1.1, 12.1]]),
                       np.array([[0.45, 0.1, 2.6], [-0.2, 0.55, -1.4]])]).astype(np.float32)
    expected = _reference_resample(images, affine.astype(np.float64), 11, fill_mode)
    got = _resample(tf.constant(images), tf.constant(affine), 11, fill_mode)
    assert got.dtype == tf.float32 and got.shape == (3, 11, 11, 3)
    np.testing.assert_allclose(got.numpy(), expected, atol=0.02)
    floats = _resample(tf.constant(images, tf.float32), tf.constant(affine), 11, fill_mode)  # any input dtype
    np.testing.assert_allclose(floats.numpy(), expected, atol=0.02)


def _colour_parameters(colour_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Saturation and hue angle back from colour maps H(hue) @ S(saturation), S = s*I + (1 - s)*luma."""
    from imaging.augment import LUMA, RGB_TO_YIQ, YIQ_TO_RGB

    to_yiq, to_rgb, luma = np.array(RGB_TO_YIQ), np.array(YIQ_TO_RGB), np.array(LUMA)[:, None] @ np.ones((1, 3))
    saturation = np.sqrt(np.linalg.det(colour_map) / np.linalg.det(to_yiq @ to_rgb))  # det S = s^2, det R = 1
    hue = []
    for m, s in zip(colour_map, saturation, strict=True):
        rotation = np.linalg.inv(to_yiq) @ m @ np.linalg.inv(s * np.eye(3) + (1 - s) * luma) @ np.linalg.inv(to_rgb)
        hue.append(np.arctan2(rotation[1, 2], rotation[1, 1]))
    return saturation, np.array(hue)


def test_colour_parameters_fill_their_documented_ranges_and_are_drawn_independently():
    from imaging.augment import _seeds, sample_colour

    config = AugmentConfig(brightness=0.2, contrast=0.3, saturation=0.4, hue=0.05)
    colour_map, contrast, brightness = (t.numpy() for t in sample_colour(_seeds(_seed(7, 7), 4)[1], 20000, config))
    saturation, hue = _colour_parameters(colour_map.astype(np.float64))
    drawn = {"brightness": (brightness, 0.2 * 255), "contrast": (contrast - 1, 0.3),
             "saturation": (saturation - 1, 0.4), "hue": (hue, 0.05 * 2 * np.pi)}
    for name, (values, half_width) in drawn.items():  # uniform over [-half_width, half_width]
        assert np.abs(values).max() <= half_width * (1 + 1e-4), name
        assert values.min() < -0.995 * half_width and values.max() > 0.995 * half_width, name
        assert abs(values.mean()) < 0.02 * half_width, name
        assert abs(values.std() / (half_width / np.sqrt(3)) - 1) < 0.02, name
    correlations = np.corrcoef(np.stack([values for values, _ in drawn.values()]))
    assert np.abs(correlations - np.eye(4)).max() < 0.05  # each drawn on its own


def test_erase_boxes_follow_the_probability_area_and_aspect_ranges_and_reach_every_edge():
    from imaging.augment import _seeds, sample_erase

    size, lo, hi = 32, 0.05, 0.3
    config = AugmentConfig(erase_prob=0.4, erase_area=(lo, hi))
    boxes = sample_erase(_seeds(_seed(8, 8), 4)[2], 20000, config, size).numpy()
    top, left, height, width = boxes.T
    erased = height > 0
    assert abs(erased.mean() - 0.4) < 0.015
    top, left, height, width = top[erased], left[erased], height[erased], width[erased]
    assert np.array_equal(top, np.floor(top)) and np.array_equal(height, np.round(height))  # whole pixels
    assert top.min() == 0 and left.min() == 0 and (top + height).max() == size and (left + width).max() == size
    assert (top + height).max() <= size and (left + width).max() <= size
    area = height * width / size**2
    assert lo - 0.02 < area.min() < lo + 0.005 and hi - 0.005 < area.max() < hi + 0.03  # rounding to pixels
    assert abs(np.median(area) - (lo + hi) / 2) < 0.01
    aspect = np.log(height / width)
    assert np.log(0.3) - 0.2 < aspect.min() < np.log(0.3) + 0.05
    assert np.log(3.3) - 0.05 < aspect.max() < np.log(3.3) + 0.2
    assert abs(np.median(aspect) - (np.log(0.3) + np.log(3.3)) / 2) < 0.05  # log-uniform
    down, across = top / np.maximum(size - height, 1), left / np.maximum(size - width, 1)  # uniform over the room left
    assert abs(down.mean() - 0.5) < 0.02 and abs(across.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(area, aspect)[0, 1]) < 0.05 and abs(np.corrcoef(down, across)[0, 1]) < 0.05
    assert abs(np.corrcoef(down, aspect)[0, 1]) < 0.05 and abs(np.corrcoef(across, area)[0, 1]) < 0.05


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "wrap", "constant"])
def test_the_batch_pass_applies_the_sampled_geometry_colour_and_erasing_with_the_configs_fill_mode(fill_mode):
    # augment_batch = the pixel pass of parameters drawn from the batch seed's four parts (geometry, colour, erase
    # boxes, erase noise), resampled with the config's own fill mode; the modes give different borders.
    from imaging.augment import _compiled_apply, _seeds, sample_affine, sample_colour, sample_erase

    images = tf.constant(np.tile((np.arange(16, dtype=np.float32)[None, :, None] + 1) * 10, [3, 16, 1, 3]))
    images = tf.reshape(images, [3, 16, 16, 3])
    config = AugmentConfig(**NO_GEOMETRY | {"shift": 300.0, "rotation": 10.0, "fill_mode": fill_mode},
                           shift_reference_size=192, brightness=0.1, saturation=0.3, erase_prob=0.7)
    seed = _seed(9, 4)
    got = augment_batch(images, seed, config, 16).numpy()
    s = _seeds(seed, 4)
    parameters = (sample_affine(s[0], 3, config, 16, 16), *sample_colour(s[1], 3, config),
                  sample_erase(s[2], 3, config, 16), s[3])
    # The compiled pass, as training runs it (XLA draws the erase noise differently from an eager run).
    np.testing.assert_allclose(got, _compiled_apply(config, 16)(images, *parameters).numpy(), atol=1e-3)
    for other in {"nearest", "reflect", "wrap", "constant"} - {fill_mode}:
        elsewhere = _compiled_apply(dataclasses.replace(config, fill_mode=other), 16)(images, *parameters).numpy()
        assert np.abs(got - elsewhere).max() > 5, other
    # Records larger than the model: the geometry maps 24 px to 16 px and the erase boxes are drawn at 16 px.
    large = tf.image.resize(images, [24, 24])
    got = augment_batch(large, seed, config, 16).numpy()
    parameters = (sample_affine(s[0], 3, config, 24, 16), *sample_colour(s[1], 3, config),
                  sample_erase(s[2], 3, config, 16), s[3])
    np.testing.assert_allclose(got, _compiled_apply(config, 16)(large, *parameters).numpy(), atol=1e-3)


def test_shared_draws_give_every_image_of_a_batch_what_it_would_get_alone():
    config = AugmentConfig(rotation=20.0, shift=40.0, zoom=0.2, brightness=0.2, saturation=0.3, erase_prob=1.0)
    images = tf.stack([_image(24, seed) for seed in range(4)])
    seed = _seed(6, 2)
    shared = augment_batch(images, seed, config, 16, shared=True).numpy()
    for i in range(4):
        alone = augment_batch(images[i:i + 1], seed, config, 16, shared=True).numpy()[0]
        np.testing.assert_allclose(shared[i], alone, atol=1e-3)  # the transform, colours, box and its noise
    same = augment_batch(tf.stack([images[0]] * 3), seed, config, 16, shared=True).numpy()
    np.testing.assert_allclose(same[1:], same[:1].repeat(2, axis=0), atol=1e-3)
    own = augment_batch(tf.stack([images[0]] * 3), seed, config, 16).numpy()  # by default each its own draw
    assert np.abs(own[1] - own[0]).max() > 10 and np.abs(own[2] - own[1]).max() > 10

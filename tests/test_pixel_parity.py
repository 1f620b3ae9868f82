"""The same pixels as training: a photo sent to the service, or to the SavedModel's own bytes signature, reaches
the model as the import tool's copy of it does, for every fit mode; and the serve-time TTA."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from PIL import Image

from core.members import FIT_MODES
from core.photos import load_rgb
from service.app import create_app
from service.images import decode_image
from service.predictor import MemberModel, load_run
from service.settings import Settings
from testkit.artifacts import make_run, photo
from training.data.importer.folders import import_folders
from training.data.importer.squares import fit_square

SIZE = 160  # at 64 px the records' own JPEG encoding (quality 95) moves the pixels by 2 grey levels on its own
# (width, height): landscape and portrait phone photos, one over the service's 4 M pixel draft threshold
# (decoded at 1/8 scale), a square one, a small web image and one smaller than the model's input (upscaled).
SHAPES = {"wide": (2400, 1600), "tall": (1200, 1800), "phone": (3000, 2000), "square": (700, 700),
          "web": (640, 427), "tiny": (90, 60)}
DEFAULTS = Settings()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Two class folders of JPEG photos of every shape; returns the source folder and {relative path: bytes}."""
    src = tmp_path_factory.mktemp("photos")
    files = {}
    for c, label in enumerate(("daisy", "tulip")):
        (src / label).mkdir()
        for i, (name, (width, height)) in enumerate(SHAPES.items()):
            buffer = io.BytesIO()
            photo(width, height, seed=10 * c + i).save(buffer, format="JPEG", quality=92)
            relative = f"{label}/{name}.jpg"
            (src / relative).write_bytes(buffer.getvalue())
            files[relative] = buffer.getvalue()
    return src, files


def _imported(data: Path) -> dict[str, np.ndarray]:
    """Every record of an imported data set at SIZE px, decoded as training decodes it: {id: pixels}."""
    pixels = {}
    for file in sorted(data.glob(f"tfrecords-jpeg-{SIZE}x{SIZE}/*/*.tfrec")):
        for raw in tf.data.TFRecordDataset(str(file)):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            image = tf.io.decode_jpeg(feature["image"].bytes_list.value[0], channels=3)
            pixels[feature["id"].bytes_list.value[0].decode()] = image.numpy().astype(np.float32)
    return pixels


def _served(member: MemberModel, blob: bytes, downscale_pixels: int = DEFAULTS.downscale_pixels) -> np.ndarray:
    """What the service gives the member for an uploaded file: its decode (with the large-photo draft) and fit."""
    return member.square(decode_image(blob, DEFAULTS.max_pixels, member.image_size, downscale_pixels))


def _stretched_bilinear(blob: bytes) -> np.ndarray:
    """How the service made a photo square before: stretched, plain bilinear, no antialiasing."""
    image = decode_image(blob, DEFAULTS.max_pixels)
    return tf.image.resize(image.astype(np.float32), [SIZE, SIZE], method="bilinear").numpy()


@pytest.mark.parametrize("fit", FIT_MODES)
def test_a_photo_reaches_the_model_as_the_import_tools_copy_of_it(photos, tmp_path, fit):
    src, files = photos
    import_folders(src, tmp_path / "data", sizes=[SIZE], val_fraction=0.25, test_fraction=0.25, fit=fit,
                   progress=False, near_duplicate_distance=None)
    imported = _imported(tmp_path / "data")
    assert len(imported) == len(files)
    member = MemberModel("m", tmp_path, SIZE, predict_pixels=None, fit=fit)
    to_records, to_squares = {}, {}
    for relative, blob in files.items():
        record = imported[hashlib.sha1(relative.encode()).hexdigest()[:9]]  # the import tool's id of the file
        served = _served(member, blob)
        to_records[relative] = float(np.abs(served - record).mean())
        # The import tool's square before its JPEG encoding: the geometry alone, without the records' JPEG loss.
        square = np.asarray(fit_square(load_rgb(src / relative), SIZE, fit), dtype=np.float32)
        to_squares[relative] = float(np.abs(served - square).mean())
    assert max(to_records.values()) <= 2.0, to_records
    assert max(to_squares.values()) <= 0.5, to_squares
    if fit == "crop":  # the old geometry is far off: the test can tell them apart
        wide = files["daisy/wide.jpg"]
        record = imported[hashlib.sha1(b"daisy/wide.jpg").hexdigest()[:9]]
        assert np.abs(_stretched_bilinear(wide) - record).mean() > 10


@pytest.mark.parametrize("fit", FIT_MODES)
def test_the_saved_models_bytes_signature_agrees_with_the_service(photos, tmp_path, fit):
    _, files = photos
    predictor = load_run(make_run(tmp_path, f"m-{fit}", SIZE, fit=fit))
    member = predictor.members[0]
    assert member.fit == fit
    signature = member.saved_model.signatures["serving_default"]
    for relative, blob in files.items():
        # No draft: the signature decodes every photo at full size (the 4 M pixel draft is the service's own).
        served = predictor.predict([decode_image(blob, DEFAULTS.max_pixels, SIZE, DEFAULTS.max_pixels)])[0][0]
        own = signature(image_bytes=tf.constant([blob]))["probabilities"].numpy()[0]
        np.testing.assert_allclose(served, own, atol=2e-5, err_msg=relative)
    # The service's draft of a photo over 4 M pixels changes its pixels by far less than a grey level.
    phone = files["daisy/phone.jpg"]
    assert np.abs(_served(member, phone) - _served(member, phone, DEFAULTS.max_pixels)).mean() < 1.0


def test_a_run_without_a_recorded_geometry_is_served_with_a_centre_crop(tmp_path):
    run = make_run(tmp_path, "old", SIZE)
    member_json = run / "member.json"
    document = __import__("json").loads(member_json.read_text())
    del document["geometry"]
    member_json.write_text(__import__("json").dumps(document))
    assert load_run(run).members[0].fit == "crop"


def test_serve_time_tta_averages_the_plain_pass_and_the_offline_kind_of_augmented_passes(photos, tmp_path):
    from imaging.augment import TTA_AUGMENT, augment_batch

    _, files = photos
    run = make_run(tmp_path, "tta", SIZE)
    plain, with_tta = load_run(run), load_run(run, tta=3)
    images = [decode_image(files["daisy/web.jpg"], DEFAULTS.max_pixels, SIZE)]
    member = plain.members[0]
    batch = tf.constant(np.stack([member.square(images[0])]))
    passes = [member.predict_pixels(images=batch)["probabilities"].numpy()]
    for k in (1, 2):
        seed = tf.constant([1 + k, 0], tf.int64)
        passes.append(member.predict_pixels(images=augment_batch(batch, seed, TTA_AUGMENT, SIZE))["probabilities"])
    expected = np.mean(passes, axis=0)
    np.testing.assert_allclose(with_tta.predict(images)[0], expected, atol=1e-6)
    np.testing.assert_allclose(with_tta.predict(images)[0], expected, atol=1e-6)  # the same answer every time
    assert np.abs(plain.predict(images)[0] - expected).max() > 1e-4  # the passes do change the answer
    client = TestClient(create_app(Settings(run=str(run), tta=3), with_tta))
    with client:
        metadata = client.get("/v1/models/flowers/metadata").json()
    assert metadata["flower"]["tta"] == 3


def test_a_member_trained_on_larger_records_gets_a_record_as_the_training_pipeline_resized_it(photos, tmp_path):
    src, _ = photos
    import_folders(src, tmp_path / "data", sizes=[96], val_fraction=0.25, test_fraction=0.25, progress=False,
                   near_duplicate_distance=None)
    member = MemberModel("m", tmp_path, 64, predict_pixels=None, fit="crop", record_size=96)  # 96 px records
    for file in sorted((tmp_path / "data").glob("tfrecords-jpeg-96x96/*/*.tfrec"))[:2]:
        for raw in tf.data.TFRecordDataset(str(file)):
            blob = tf.train.Example.FromString(raw.numpy()).features.feature["image"].bytes_list.value[0]
            pipeline = tf.image.resize(tf.cast(tf.io.decode_jpeg(blob, dct_method="INTEGER_ACCURATE"), tf.float32),
                                       [64, 64], method="bilinear").numpy()  # imaging.augment.resize_image
            np.testing.assert_allclose(_served(member, blob), pipeline, atol=1e-3)
    # A photo is made square at the record size first, then resized as a record: close to a 64 px import.
    wide = src / "daisy" / "wide.jpg"
    square = np.asarray(fit_square(load_rgb(wide), 64, "crop"), dtype=np.float32)
    assert np.abs(_served(member, wide.read_bytes()) - square).mean() < 1.5


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_the_bytes_signature_reads_every_format_and_makes_squares_at_the_record_size(tmp_path):
    # A member trained on 48 px records at 32 px: the photo is made square at 48, then resized as a record.
    predictor = load_run(make_run(tmp_path, "m", 32, fit="crop", record_size=48))
    signature = predictor.members[0].saved_model.signatures["serving_default"]
    rgb = photo(120, 80, seed=3)
    frames = [photo(60, 40, seed=4).convert("P"), photo(60, 40, seed=5).convert("P")]
    blobs = {"grey JPEG": _encoded(rgb.convert("L"), "JPEG", quality=90),
             "opaque RGBA PNG": _encoded(rgb.convert("RGBA"), "PNG"),
             "animated GIF (first frame)": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
             "BMP": _encoded(rgb, "BMP"), "RGB JPEG": _encoded(rgb, "JPEG", quality=90)}
    for kind, blob in blobs.items():
        served = predictor.predict([decode_image(blob, DEFAULTS.max_pixels, 32, DEFAULTS.max_pixels)])[0][0]
        own = signature(image_bytes=tf.constant([blob]))["probabilities"].numpy()[0]
        np.testing.assert_allclose(served, own, atol=2e-5, err_msg=kind)
    # ... and the record step is taken: the same photo made square at 32 directly gives other probabilities.
    direct = load_run(make_run(tmp_path, "direct", 32, fit="crop"))
    rgb_blob = [decode_image(blobs["RGB JPEG"], DEFAULTS.max_pixels, 32)]
    assert np.abs(direct.predict(rgb_blob)[0] - predictor.predict(rgb_blob)[0]).max() > 1e-4

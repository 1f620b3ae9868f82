"""The import tool (real photos and bad files) and the synthetic demo data set."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from core.errors import DataError
from core.photos import HIDDEN_NAME, NOT_A_PHOTO_NAME
from flower.commands.import_photos import main as import_main
from imaging.records import iter_records
from training.data.dataset import eval_dataset, split_info
from training.data.demo_data import KINDS, demo_examples
from training.data.importer.folders import import_folders
from training.data.importer.split import stratified_split
from training.data.layout import count_records, split_files


def _save(path, image: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def test_importing_the_real_photos_gives_a_stratified_competition_layout(real_photos, tmp_path):
    out = tmp_path / "flowers5"
    report = import_folders(real_photos, out, sizes=[64], progress=False)
    manifest = list(csv.DictReader(open(real_photos / "manifest.csv")))
    assert report.classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert [s["path"] for s in report.skipped] == ["SOURCE.md", "manifest.csv"]  # beside the class folders: listed
    assert json.loads((out / "classes.json").read_text()) == report.classes
    per_class = {c: sum(report.counts[s][c] for s in report.counts) for c in report.classes}
    assert per_class == {c: sum(r["label"] == c for r in manifest) for c in report.classes}
    for name in report.classes:
        share = report.counts["val"][name] / per_class[name]
        assert abs(share - 0.15) < 0.01  # every class split in the same proportion

    ids = {}
    for split in ("train", "val", "test"):
        files = split_files(str(out), 64, split)
        assert count_records(files) == sum(report.counts[split].values())
        ids[split] = {i.decode() for b in eval_dataset(split_info(str(out), split, 64), 64, 256) for i in b[-1].numpy()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    answers = list(csv.DictReader(open(out / "test_answers.csv")))
    assert {a["id"] for a in answers} == ids["test"]
    raw = next(iter_records(split_files(str(out), 64, "test")[0]))[1]
    assert "class" not in tf.train.Example.FromString(raw).features.feature  # test labels only in the CSV


def test_odd_image_kinds_are_converted_and_bad_files_are_reported(tmp_path):
    src = tmp_path / "src"
    rgb = Image.new("RGB", (40, 20), (200, 30, 30))
    _save(src / "red" / "plain.jpg", rgb, "JPEG")
    _save(src / "red" / "alpha.png", Image.new("RGBA", (30, 30), (255, 0, 0, 128)), "PNG")
    _save(src / "red" / "cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    _save(src / "red" / "anim.gif", rgb.convert("P"), "GIF")
    _save(src / "blue" / "grey.png", Image.new("L", (25, 25), 90), "PNG")
    _save(src / "blue" / "sixteen.png", Image.new("I;16", (25, 25), 3000), "PNG")
    _save(src / "blue" / "pic.bmp", Image.new("RGB", (20, 20), (0, 0, 200)), "BMP")
    _save(src / "blue" / "pic.webp", Image.new("RGB", (20, 20), (0, 0, 200)), "WEBP")
    (src / "blue" / "notes.txt").write_text("not an image")
    good = io.BytesIO()
    rgb.save(good, format="JPEG")
    (src / "red" / "truncated.jpg").write_bytes(good.getvalue()[:60])
    _save(src / "top.jpg", rgb, "JPEG")  # beside the class folders: in no class
    _save(src / ".hidden_class" / "x.jpg", rgb, "JPEG")  # a hidden folder is no class
    _save(src / "blue" / ".thumb.jpg", rgb, "JPEG")  # a hidden file in a class

    report = import_folders(src, tmp_path / "out", sizes=[16], val_fraction=0.25, test_fraction=0.25, progress=False)
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"blue/notes.txt", "red/truncated.jpg", "top.jpg", ".hidden_class", "blue/.thumb.jpg"}
    assert skipped["blue/notes.txt"] == NOT_A_PHOTO_NAME  # every file found and not imported is listed, with why
    assert skipped["top.jpg"].startswith("a file beside the class folders: not imported")
    assert skipped[".hidden_class"] == f"{HIDDEN_NAME} as a class folder" and skipped["blue/.thumb.jpg"] == HIDDEN_NAME
    assert sum(sum(c.values()) for c in report.counts.values()) == 8
    saved = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert {s["path"] for s in saved["skipped"]} == set(skipped)


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    wide = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _save(src / "a" / "phone.jpg", wide, "JPEG", exif=exif)
    _save(src / "b" / "x.jpg", wide, "JPEG")
    from core.photos import load_rgb

    assert load_rgb(src / "a" / "phone.jpg").size == (20, 40)
    assert load_rgb(src / "b" / "x.jpg").size == (40, 20)


def test_import_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(DataError, match="source folder not found"):
        import_folders(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="at least 2"):
        import_folders(tmp_path / "one", tmp_path / "out", progress=False)
    assert import_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error: source folder not found" in capsys.readouterr().err


def test_an_existing_import_is_kept_unless_overwrite_is_asked(tmp_path):
    src = tmp_path / "src"
    for c, name in enumerate(("a", "b")):  # no copy across the classes: that would be a label conflict
        for i in range(4):
            _save(src / name / f"{i}.png", Image.new("RGB", (12, 12), (i * 40, c * 100, 0)), "PNG")
    out = tmp_path / "out"
    import_folders(src, out, sizes=[16], progress=False)
    before = sorted(p.name for p in (out / "tfrecords-jpeg-16x16" / "train").iterdir())
    with pytest.raises(DataError, match="already holds a data set"):
        import_folders(src, out, sizes=[16], progress=False)
    assert sorted(p.name for p in (out / "tfrecords-jpeg-16x16" / "train").iterdir()) == before
    import_folders(src, out, sizes=[16], overwrite=True, progress=False)
    assert not list(out.glob(".import-staging*"))


def test_stratified_split_keeps_class_proportions_and_a_training_image_per_class():
    labels = [0] * 100 + [1] * 40 + [2] * 2
    split = stratified_split(labels, 0.2, 0.1, seed=5)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(142))
    assert sum(labels[i] == 0 for i in split["val"]) == 20 and sum(labels[i] == 1 for i in split["val"]) == 8
    assert any(labels[i] == 2 for i in split["train"])
    assert split == stratified_split(labels, 0.2, 0.1, seed=5)


def test_demo_data_has_the_competition_layout(tiny_data):
    names = json.loads((tiny_data / "classes.json").read_text())
    assert names == [k.name for k in KINDS]
    for size in (32, 48):
        for split in ("train", "val", "test"):
            assert split_files(str(tiny_data), size, split)
    answers = list(csv.DictReader(open(tiny_data / "test_answers.csv")))
    assert {a["label"] for a in answers} <= {str(i) for i in range(len(KINDS))}


def test_demo_data_is_learnable_from_simple_features():
    from sklearn.linear_model import LogisticRegression

    def features(split_counts, seed):
        rows, labels = [], []
        for _, _, label, image in demo_examples(split_counts, seed):
            small = np.asarray(image.resize((16, 16)), np.float32) / 255.0
            rows.append(np.concatenate([small.mean((0, 1)), small.std((0, 1)), small.reshape(-1)]))
            labels.append(label)
        return np.array(rows), np.array(labels)

    x_train, y_train = features({"train": 240}, seed=1)
    x_test, y_test = features({"test": 120}, seed=2)
    accuracy = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_test, y_test)
    assert accuracy > 0.6  # chance is 1/6


def _two_class_photos(src) -> None:
    for name in ("a", "b"):
        for i in range(3):
            _save(src / name / f"{i}.png", Image.new("RGB", (12, 12), (i * 40, 0, 0)), "PNG")


@pytest.mark.parametrize("args,message", [
    (["--sizes", "abc"], "error: --sizes must be comma-separated whole numbers, got 'abc'"),
    (["--sizes", "32,x"], "error: --sizes must be comma-separated whole numbers, got '32,x'"),
    (["--sizes", "12.5"], "error: --sizes must be comma-separated whole numbers, got '12.5'"),
    (["--sizes", ","], "error: --sizes must be comma-separated whole numbers, got ','"),
    (["--sizes", "32,16,32"], "error: --sizes lists 32 twice"),
    (["--sizes", "4"], "error: --sizes must be a non-empty list of whole numbers >= 8, got [4]"),
    (["--records-per-file", "0"], "error: --records-per-file must be a whole number >= 1, got 0"),
    (["--val", "0"], "error: --val must be a fraction above 0"),
    (["--test", "-0.1"], "error: --test must be a fraction above 0"),
    (["--test", "1"], "error: --test must be a fraction above 0"),
    (["--val", "nan"], "error: --val must be a fraction above 0"),
    (["--val", "0.5", "--test", "0.5"], "error: --val + --test must be below 1 to leave training images"),
])
def test_import_options_are_checked_before_anything_is_read_or_written(tmp_path, capsys, monkeypatch, args, message):
    import training.data.importer.folders

    src, out = tmp_path / "src", tmp_path / "out"
    _two_class_photos(src)
    monkeypatch.setattr(training.data.importer.folders, "scan_source", lambda *a: pytest.fail("photos were read"))
    assert import_main([str(src), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_import_folders_refuses_repeated_sizes_and_splits_without_images(tmp_path):
    src = tmp_path / "src"
    _two_class_photos(src)
    with pytest.raises(ValueError, match="^sizes lists 16 twice$"):
        import_folders(src, tmp_path / "out", sizes=[16, 16], progress=False)
    with pytest.raises(ValueError, match="val_fraction must be a fraction above 0"):
        import_folders(src, tmp_path / "out", sizes=[16], val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="records_per_file must be a whole number >= 1"):
        import_folders(src, tmp_path / "out", sizes=[16], records_per_file=0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_import_into_a_file_is_a_clear_error(tmp_path, capsys, where):
    src = tmp_path / "src"
    _two_class_photos(src)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "out" else blocker / "data"
    assert import_main([str(src), str(out), "--sizes", "16"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {blocker} is a file, not a folder: cannot write the data set to {out}\n"
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("args,message", [
    (["--sizes", "0"], "error: --sizes must be comma-separated whole numbers >= 8, got '0'"),
    (["--sizes", "32,-4"], "error: --sizes must be comma-separated whole numbers >= 8, got '32,-4'"),
    (["--sizes", "7"], "error: --sizes must be comma-separated whole numbers >= 8, got '7'"),
    (["--sizes", "abc"], "error: --sizes must be comma-separated whole numbers >= 8, got 'abc'"),
    (["--sizes", ""], "error: --sizes must be comma-separated whole numbers >= 8, got ''"),
    (["--train", "-1"], "error: --train must be at least 1"),
    (["--val", "0"], "error: --val must be at least 1"),
    (["--test", "-5"], "error: --test must be at least 1"),
])
def test_demo_data_options_are_checked_before_anything_is_written(tmp_path, capsys, args, message):
    from flower.commands.demo_data import main as demo_main

    out = tmp_path / "demo"
    assert demo_main([str(out), "--sizes", "8", "--train", "6", "--val", "6", "--test", "6", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_make_demo_data_refuses_tiny_sizes_and_empty_splits(tmp_path):
    from training.data.demo_data import make_demo_data

    with pytest.raises(ValueError, match=r"sizes must be whole numbers >= 8, got \[0\]"):
        make_demo_data(tmp_path / "a", sizes=[0], counts={"train": 6}, progress=False)
    with pytest.raises(ValueError, match=r"counts\['val'\] must be a whole number >= 1, got -2"):
        make_demo_data(tmp_path / "b", sizes=[8], counts={"train": 6, "val": -2}, progress=False)
    assert not list(tmp_path.iterdir())


def test_demo_data_over_an_earlier_data_set_replaces_it_whole_and_keeps_other_files(tmp_path, capsys):
    from flower.commands.demo_data import main as demo_main

    out = tmp_path / "demo"
    assert demo_main([str(out), "--sizes", "8,16", "--train", "6", "--val", "6", "--test", "6"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "import_report.json").write_text("{}")  # as if an import had written the earlier data set
    assert demo_main([str(out), "--sizes", "8", "--train", "12", "--val", "4", "--test", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "notes.txt", "test_answers.csv",
                                                     "tfrecords-jpeg-8x8"]
    files = {split: sorted(p.name for p in (out / "tfrecords-jpeg-8x8" / split).iterdir())
             for split in ("train", "val", "test")}
    assert files == {"train": ["00-8x8-12.tfrec"], "val": ["00-8x8-4.tfrec"], "test": ["00-8x8-5.tfrec"]}
    assert len((out / "test_answers.csv").read_text().splitlines()) == 1 + 5
    capsys.readouterr()


DEMO_IN_A_PROCESS = """
import sys
from training.data.demo_data import make_demo_data
make_demo_data(sys.argv[1], sizes=(8,), counts={"train": 6, "val": 6, "test": 12}, seed=7, progress=False)
"""


def test_the_demo_data_seed_reproduces_the_ids_in_another_process(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    answers = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"demo{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run([sys.executable, "-c", DEMO_IN_A_PROCESS, str(out)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append((out / "test_answers.csv").read_text())
    assert answers[0] == answers[1] and len(answers[0].splitlines()) == 13


# --- the split, the squares and the ids, exactly ---------------------------------------------------

@pytest.mark.parametrize("val,test,ok", [(0.0, 0.0, True), (0.0, 0.5, True), (0.5, 0.0, True), (0.5, 0.49, True),
                                         (1.0, 0.0, False), (0.0, 1.0, False), (0.5, 0.5, False), (-0.1, 0.2, False),
                                         (0.2, -0.1, False), (0.6, 0.6, False)])
def test_split_fractions_are_checked_at_their_bounds(val, test, ok):
    if ok:
        assert sum(len(v) for v in stratified_split([0] * 10 + [1] * 10, val, test, 0).values()) == 20
    else:
        with pytest.raises(ValueError, match=f"sum below 1, got {val}, {test}"):
            stratified_split([0] * 10, val, test, 0)


@pytest.mark.parametrize("count,val,test,expected", [
    (1, 0.15, 0.15, (1, 0, 0)), (2, 0.45, 0.45, (1, 1, 0)), (2, 0.4, 0.4, (1, 1, 0)),
    (3, 0.34, 0.34, (1, 1, 1)), (4, 0.5, 0.4, (1, 2, 1)), (10, 0.2, 0.3, (5, 2, 3)), (100, 0.15, 0.15, (70, 15, 15)),
    (7, 0.0, 0.3, (5, 0, 2)), (7, 0.3, 0.0, (5, 2, 0)), (5, 0.45, 0.45, (1, 2, 2)),
    (3, 0.6, 0.3, (1, 1, 1)), (1, 0.2, 0.6, (1, 0, 0)), (6, 0.6, 0.3, (1, 3, 2)),
])
def test_each_class_is_split_in_exact_counts_keeping_a_training_image(count, val, test, expected):
    split = stratified_split([3] * count, val, test, seed=1)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == expected
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(count))


def test_the_split_depends_on_the_seed_only():
    labels = [i % 4 for i in range(80)]
    assert stratified_split(labels, 0.2, 0.2, 3) == stratified_split(labels, 0.2, 0.2, 3)
    assert stratified_split(labels, 0.2, 0.2, 3)["val"] != stratified_split(labels, 0.2, 0.2, 4)["val"]


def test_squares_are_cropped_padded_or_stretched_with_a_lanczos_filter():
    from training.data.importer.squares import fit_square

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)  # red left quarter, green middle half, blue right quarter
    wide[:, 10:30] = (0, 255, 0)
    wide[:, 30:] = (0, 0, 255)
    image = Image.fromarray(wide)
    crop = np.asarray(fit_square(image, 20, "crop"))
    assert (crop[:, 3:17, 1] > 250).all() and (crop[:, :, 0] < 10).all()  # the centre: green only
    pad = np.asarray(fit_square(image, 40, "pad"))
    assert (pad[:9] == 0).all() and (pad[-9:] == 0).all() and (pad[20, 20, 1] > 250)  # black bars above, below
    stretch = np.asarray(fit_square(image, 20, "stretch"))
    assert stretch[10, 1, 0] > 200 and stretch[10, 18, 2] > 200  # all three stripes survive, squeezed
    # Downscaling uses the Lanczos filter (other filters give other pixels on a noisy photo).
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    lanczos = Image.Resampling.LANCZOS
    np.testing.assert_array_equal(fit_square(noisy, 23, "crop"), ImageOps.fit(noisy, (23, 23), lanczos))
    np.testing.assert_array_equal(fit_square(noisy, 23, "pad"), ImageOps.pad(noisy, (23, 23), lanczos, color=(0, 0, 0)))
    np.testing.assert_array_equal(fit_square(noisy, 23, "stretch"), noisy.resize((23, 23), lanczos))
    for other in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        assert not np.array_equal(fit_square(noisy, 23, "crop"), ImageOps.fit(noisy, (23, 23), other))
        assert not np.array_equal(fit_square(noisy, 23, "pad"), ImageOps.pad(noisy, (23, 23), other))
        assert not np.array_equal(fit_square(noisy, 23, "stretch"), noisy.resize((23, 23), other))
    with pytest.raises(ValueError, match="fit must be one of \\('crop', 'stretch', 'pad'\\), got 'zoom'"):
        fit_square(image, 20, "zoom")


def test_ids_are_nine_hex_digits_and_longer_only_on_a_clash():
    import hashlib

    from training.data.importer.split import image_id

    taken: set[str] = set()
    first = image_id("daisy/a.jpg", taken)
    assert first == hashlib.sha1(b"daisy/a.jpg").hexdigest()[:9] and taken == {first}
    clash = {hashlib.sha1(b"daisy/b.jpg").hexdigest()[:9]}
    second = image_id("daisy/b.jpg", clash)
    assert second == hashlib.sha1(b"daisy/b.jpg").hexdigest()[:10] and second in clash
    digest = hashlib.sha1(b"x").hexdigest()
    assert image_id("x", {digest[:n] for n in range(9, 40)}) == digest  # the whole digest is the last resort
    with pytest.raises(DataError, match="cannot make a unique id for x"):
        image_id("x", {digest[:n] for n in range(9, 41)})

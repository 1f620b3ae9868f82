"""The import tool (real photos and bad files) and the synthetic demo data set."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from training.dataset import eval_dataset, split_info
from training.demo_data import KINDS, demo_examples
from training.errors import DataError
from training.layout import count_records, split_files
from training.photos import import_folders, stratified_split
from training.photos import main as import_main
from training.records import iter_records


def _save(path, image: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def test_importing_the_real_photos_gives_a_stratified_competition_layout(real_photos, tmp_path):
    out = tmp_path / "flowers5"
    report = import_folders(real_photos, out, sizes=[64], progress=False)
    manifest = list(csv.DictReader(open(real_photos / "manifest.csv")))
    assert report.classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert report.skipped == []
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

    report = import_folders(src, tmp_path / "out", sizes=[16], val_fraction=0.25, test_fraction=0.25, progress=False)
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"blue/notes.txt", "red/truncated.jpg"}
    assert skipped["blue/notes.txt"] == "not an image"
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
    from training.photos import load_rgb

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
    for name in ("a", "b"):
        for i in range(4):
            _save(src / name / f"{i}.png", Image.new("RGB", (12, 12), (i * 40, 0, 0)), "PNG")
    out = tmp_path / "out"
    import_folders(src, out, sizes=[16], progress=False)
    before = sorted(p.name for p in (out / "tfrecords-jpeg-16x16" / "train").iterdir())
    with pytest.raises(DataError, match="already exists"):
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

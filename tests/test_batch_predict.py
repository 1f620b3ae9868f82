"""`flower predict`: batch scoring into a CSV with the service's decoding and prediction."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from flower.cli import main as flower
from flower.commands.predict import main
from service.app import create_app
from service.images import decode_image
from service.predictor import load_ensemble
from service.scoring import InputError, Options, collect_inputs, header, score
from service.settings import Settings
from testkit.artifacts import CLASSES, image_bytes, make_ensemble


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The two-member test ensemble (32 and 48 px), made and loaded once."""
    root = tmp_path_factory.mktemp("batch")
    ensemble_dir = make_ensemble(root)
    return ensemble_dir, load_ensemble(ensemble_dir)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _photos(folder: Path) -> dict[str, bytes]:
    """A folder of images in every format, one in a sub-folder, a huge flat PNG, and a file that is not one."""
    blobs = {"a.jpg": image_bytes(seed=1), "b.PNG": image_bytes("PNG", seed=2), "c.gif": image_bytes("GIF", seed=3),
             "sub/d.webp": image_bytes("WEBP", seed=4), "sub/e.bmp": image_bytes("BMP", (30, 70), seed=5),
             "z.jpeg": image_bytes(size=(300, 200), seed=6, quality=90)}
    big = Image.new("RGB", (2100, 2100), (30, 160, 40))  # over downscale_pixels: reduced while decoding
    path = folder / "f.png"
    folder.mkdir(parents=True, exist_ok=True)
    big.save(path, format="PNG")
    blobs["f.png"] = path.read_bytes()
    for name, data in blobs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image, and not named like one")
    (folder / ".hidden.jpg").write_bytes(b"hidden")
    return blobs


def test_files_and_folders_get_the_services_own_answer(models, tmp_path):
    ensemble_dir, predictor = models
    blobs = _photos(tmp_path / "photos")
    single = tmp_path / "single.jpg"
    single.write_bytes(image_bytes(seed=9))
    inputs = collect_inputs([str(tmp_path / "photos"), str(single)])
    assert inputs.ignored == 2  # notes.txt and the hidden file
    out = tmp_path / "predictions.csv"
    summary = score(predictor, inputs, out, Options(top_k=10, probabilities=True, batch_size=3))
    rows = _rows(out)
    order = ["a.jpg", "b.PNG", "c.gif", "f.png", "sub/d.webp", "sub/e.bmp", "z.jpeg"]  # sorted, recursively
    assert [r["path"] for r in rows] == [str(tmp_path / "photos" / n) for n in order] + [str(single)]
    assert summary.rows == 8 and summary.failures == 0
    blobs["single"] = single.read_bytes()
    settings = Settings(ensemble=str(ensemble_dir))
    with TestClient(create_app(settings, predictor)) as client:
        answer = client.post("/v1/predict", files=[("files", (n, blobs[n], "application/octet-stream"))
                                                   for n in [*order, "single"]],
                             data={"top_k": "4", "include_probabilities": "true"})
    assert answer.status_code == 200
    for row, result in zip(rows, answer.json()["results"], strict=True):
        assert row["ok"] == "true" and row["error"] == "" and result["ok"]
        assert [row[f"top{n}"] for n in range(1, 5)] == [t["name"] for t in result["top"]]
        top = [float(row[f"top{n}_probability"]) for n in range(1, 5)]
        np.testing.assert_allclose(top, [t["probability"] for t in result["top"]], atol=1e-5)
        np.testing.assert_allclose([float(row[c]) for c in CLASSES], result["probabilities"], atol=1e-5)


def test_a_bad_file_is_its_own_error_row_and_the_others_are_scored(models, tmp_path):
    _, predictor = models
    good, text, truncated, link, other = (tmp_path / n for n in ("good.jpg", "notes.txt", "cut.jpg", "gone.jpg",
                                                                 "other.png"))
    good.write_bytes(image_bytes(seed=1))
    text.write_text("hello")  # named on the command line: scored whatever its extension
    truncated.write_bytes(image_bytes(size=(200, 200), seed=2)[:300])
    link.symlink_to(tmp_path / "missing.jpg")
    other.write_bytes(image_bytes("PNG", seed=3))
    odd = Path(os.fsdecode(bytes(tmp_path / "odd") + b"\xff.jpg"))
    odd.write_bytes(image_bytes(seed=4))
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 6000)).save(huge, format="PNG")  # 42 M pixels, over the service's 40 M limit
    paths = [good, text, truncated, link, huge, other, odd]
    out = tmp_path / "out.csv"
    summary = score(predictor, collect_inputs([str(p) for p in paths]), out, Options())
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths[:-1]] + [f"{tmp_path}/odd\\xff.jpg"]
    assert [r["ok"] for r in rows] == ["true", "false", "false", "false", "false", "true", "true"]
    kinds = [r["error"].partition(":")[0] for r in rows]
    assert kinds == ["", "not_an_image", "corrupt", "broken_link", "too_many_pixels", "", ""]
    assert "missing.jpg does not exist" in rows[3]["error"] and rows[1]["top1"] == ""
    assert summary.failures == 4 and summary.failed["corrupt"] == 1
    alone = predictor.predict([decode_image(other.read_bytes(), 40_000_000, 48, 4_000_000)])[0][0]
    assert rows[5]["top1"] == CLASSES[int(alone.argmax())]
    assert abs(float(rows[5]["top1_probability"]) - alone.max()) < 1e-5


def test_a_data_split_gives_one_row_per_record_at_the_size_for_the_largest_member(models, tmp_path):
    from imaging.records import iter_records
    from training.data.importer.folders import import_folders

    _, predictor = models
    for label, name in enumerate(("red", "blue")):
        for i in range(6):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(label * 10 + i).integers(0, 256, (40, 50, 3), dtype=np.uint8)) \
                .save(tmp_path / "src" / name / f"{i}.png")
    data = tmp_path / "data"
    import_folders(tmp_path / "src", data, sizes=[40, 64, 96], val_fraction=0.25, test_fraction=0.25, progress=False)
    answers = _rows(data / "test_answers.csv")
    inputs = collect_inputs([f"{data}:test"])
    assert inputs.sources[0].size_for(48) == 64  # the smallest record size >= 48 px
    out = tmp_path / "test.csv"
    score(predictor, inputs, out, Options(probabilities=True))
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(f"{data}:test#{a['id']}" for a in answers)
    assert all(r["ok"] == "true" for r in rows)
    import tensorflow as tf

    first = next(iter_records(str(next((data / "tfrecords-jpeg-64x64" / "test").glob("*.tfrec")))))[1]
    feature = tf.train.Example.FromString(first).features.feature
    record_id = feature["id"].bytes_list.value[0].decode()
    probs = predictor.predict([decode_image(feature["image"].bytes_list.value[0], 40_000_000, 48, 4_000_000)])[0][0]
    row = next(r for r in rows if r["path"] == f"{data}:test#{record_id}")
    np.testing.assert_allclose([float(row[c]) for c in CLASSES], probs, atol=1e-5)
    with pytest.raises(Exception, match="no .tfrec files of split 'nosuch'"):
        collect_inputs([f"{data}:nosuch"])


def test_the_header_is_the_documented_one(models):
    _, predictor = models
    assert header(CLASSES, 2, False) == ["path", "ok", "error", "top1", "top1_probability", "top2", "top2_probability"]
    assert header(CLASSES, 1, True) == ["path", "ok", "error", "top1", "top1_probability", *CLASSES]
    with pytest.raises(InputError, match="class 'ok' is also the name of one of the CSV's own columns"):
        header(["daisy", "ok"], 1, True)  # a class folder named 'ok': one column twice


def test_an_existing_out_is_refused_without_overwrite_and_nothing_changes(models, tmp_path, capsys):
    ensemble_dir, predictor = models
    photo = tmp_path / "p.jpg"
    photo.write_bytes(image_bytes())
    out = tmp_path / "predictions.csv"
    out.write_text("keep me\n")
    assert main([str(ensemble_dir), str(photo), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["p.jpg",
                                                                                                "predictions.csv"]
    assert main([str(ensemble_dir), str(photo), "--out", str(tmp_path / "nope" / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    score(predictor, collect_inputs([str(photo)]), out, Options(top_k=2), overwrite=True)
    assert list(_rows(out)[0]) == header(CLASSES, 2, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jpg", "predictions.csv"]  # no temporary file left


def test_inputs_that_are_not_there_or_hold_no_images_are_refused_by_name(models, tmp_path, capsys):
    ensemble_dir, _ = models
    out = str(tmp_path / "o.csv")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no photos here")
    for args, message in (([str(tmp_path / "missing.jpg")], f"{tmp_path / 'missing.jpg'} not found"),
                          ([str(tmp_path / "empty")], "no images in"), ([], "no images given")):
        assert main([str(ensemble_dir), *args, "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "empty"), "--out", out]) == 2
    assert "neither an ensemble directory" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"version": 2, "members": [], "classes": ["a"], "blend": {}}))
    photo = tmp_path / "p.jpg"
    photo.write_bytes(image_bytes())
    assert main([str(broken), str(photo), "--out", out]) == 1
    assert capsys.readouterr().err.startswith("error: ") and not os.path.exists(out)


def test_flower_predict_end_to_end_with_an_ensemble_and_with_one_run(models, tmp_path, capsys):
    ensemble_dir, _ = models
    _photos(tmp_path / "photos")
    out = tmp_path / "p.csv"
    assert flower(["predict", str(ensemble_dir), str(tmp_path / "photos"), "--out", str(out), "--top-k", "2"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "7 scored, 0 failed" in err and "ignored 2 file(s)" in err
    rows = _rows(out)
    assert len(rows) == 7 and list(rows[0]) == header(CLASSES, 2, False)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    run = ensemble_dir.parent / "runs" / "m32"
    single = tmp_path / "run.csv"
    status = flower(["predict", str(run), str(tmp_path / "photos" / "a.jpg"), str(tmp_path / "bad.jpg"),
                     "--out", str(single), "--quiet"])
    assert status == 1
    err = capsys.readouterr().err
    assert "1 of 2 image(s) failed (not_an_image 1)" in err and "wrote" not in err
    assert [r["ok"] for r in _rows(single)] == ["true", "false"]


def test_the_out_file_may_not_be_an_image_being_scored(models, tmp_path, capsys):
    ensemble_dir, _ = models
    photo = tmp_path / "p.jpg"
    photo.write_bytes(image_bytes())
    assert main([str(ensemble_dir), str(photo), "--out", str(photo), "--overwrite"]) == 2
    assert "is one of the images to score" in capsys.readouterr().err
    assert photo.read_bytes() == image_bytes()


def test_an_unreadable_data_folder_is_an_error_naming_it(models, tmp_path, capsys, monkeypatch):
    ensemble_dir, _ = models
    data = tmp_path / "data"
    data.mkdir()
    listdir = os.listdir

    def refused(path):  # what a folder without read permission does (the tests may run as root, who reads all)
        if os.path.realpath(path) == os.path.realpath(data):
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refused)
    assert main([str(ensemble_dir), f"{data}:test", "--out", str(tmp_path / "x.csv")]) == 2
    assert f"{data} cannot be read (Permission denied)" in capsys.readouterr().err


def test_a_run_stopped_midway_leaves_no_partial_csv(models, tmp_path, monkeypatch):
    import service.scoring as scoring
    from flower.commands import terminate

    ensemble_dir, predictor = models
    for i in range(3):
        (tmp_path / "in" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.jpg").write_bytes(image_bytes(seed=i))
    real = scoring.score_batch

    def stopped(*args, **kwargs):
        yield from real(*args, **kwargs)
        terminate(15, None)  # what SIGTERM does once main() has installed it

    monkeypatch.setattr(scoring, "score_batch", stopped)
    with pytest.raises(SystemExit) as stop:
        score(predictor, collect_inputs([str(tmp_path / "in")]), tmp_path / "out.csv", Options(batch_size=1))
    assert stop.value.code == 143 and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_damaged_split_is_counted_in_records_and_the_rows_say_where_each_file_stopped(models, tiny_data, tmp_path,
                                                                                        capsys):
    import shutil

    import tensorflow as tf

    ensemble_dir, predictor = models
    val = tmp_path / "data" / "tfrecords-jpeg-48x48" / "val"  # the size the 48 px member reads
    shutil.copytree(tiny_data / "tfrecords-jpeg-48x48" / "val", val)
    first, second = sorted(val.iterdir())  # 00-48x48-20.tfrec, 01-48x48-4.tfrec
    raw = first.read_bytes()
    first.write_bytes(raw[: len(raw) // 2])  # a damaged record half-way: it and those after it are lost
    kept = [r.numpy() for r in tf.data.TFRecordDataset(str(second))][:3]
    with tf.io.TFRecordWriter(str(second)) as writer:  # cut short at a record boundary: no read error at all
        for record in kept:
            writer.write(record)
    out = tmp_path / "val.csv"
    assert main([str(ensemble_dir), f"{tmp_path / 'data'}:val", "--out", str(out), "--quiet"]) == 1
    rows = _rows(out)
    damaged = [r for r in rows if r["ok"] == "false"]
    read = len(rows) - len(damaged)
    assert [r["path"].rpartition("#")[2] for r in damaged] == [f"{first.name}@{read - 3}", f"{second.name}@3"]
    assert damaged[0]["error"].startswith(f"corrupt_record: {first}: records {read - 3} to 19 ({23 - read} records) "
                                          "cannot be read (DataLossError: ")
    assert damaged[1]["error"] == f"corrupt_record: {second}: record 3 cannot be read (the file ends early)"
    err = capsys.readouterr().err
    assert err.startswith(f"{24 - read} of 24 records could not be read ({first} from record {read - 3}: "
                          "DataLossError: ") and "image(s) failed" not in err


def test_glob_patterns_are_their_matches_and_a_remote_path_needs_the_beam_runner(tmp_path):
    _photos(tmp_path / "photos")
    inputs = collect_inputs([str(tmp_path / "photos" / "*.[jp]*g"), str(tmp_path / "photos" / "**" / "*.bmp")])
    assert [s.shown for s in inputs.sources] == [str(tmp_path / "photos" / n) for n in ("a.jpg", "f.png", "z.jpeg",
                                                                                        "sub/e.bmp")]
    with pytest.raises(InputError, match=r"photos/\*\.tiff matches no file"):
        collect_inputs([str(tmp_path / "photos" / "*.tiff")])
    with pytest.raises(InputError, match="gs://bucket/photos: a remote path is read by `--runner beam`"):
        collect_inputs(["gs://bucket/photos"])


def test_a_split_scored_alone_gives_its_kaggle_submission_checked_as_flower_blend_checks_its_own(models, tiny_data,
                                                                                              tmp_path, capsys):
    from types import SimpleNamespace

    from flower.commands.predict import write_split_submission

    ensemble_dir, _ = models
    out, submission = tmp_path / "test.csv", tmp_path / "submission.csv"
    assert main([str(ensemble_dir), f"{tiny_data}:test", "--out", str(out), "--submission", str(submission)]) == 0
    assert f"wrote {submission}: 18 id(s)" in capsys.readouterr().err
    rows, written = _rows(out), _rows(submission)
    assert [r["id"] for r in written] == [r["path"].rpartition("#")[2] for r in rows]
    assert sorted(r["id"] for r in written) == sorted(a["id"] for a in _rows(tiny_data / "test_answers.csv"))
    assert [int(r["label"]) for r in written] == [CLASSES.index(r["top1"]) for r in rows]
    expected = np.array([r["id"] for r in written][1:])  # the competition's list lacks one of the scored ids
    args = SimpleNamespace(out=str(out), submission=str(tmp_path / "again.csv"), quiet=True)
    assert write_split_submission(args, f"{tiny_data}:test", CLASSES, expected) == 1
    assert "not written: submission has 18 ids and 18 labels, expected 17" in capsys.readouterr().err
    assert not (tmp_path / "again.csv").exists()
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert main([str(ensemble_dir), f"{tiny_data}:test", str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "b.csv"),
                 "--submission", str(tmp_path / "s.csv")]) == 2
    assert "score that split alone" in capsys.readouterr().err and not (tmp_path / "b.csv").exists()

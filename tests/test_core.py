"""The ground floor (core/): each idea of the contract in its one home, TensorFlow-free."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from core.contract import (
    choose_size,
    count_in_name,
    folder_size,
    is_data_folder,
    local_size_folders,
    parse_split_spec,
    size_folder_name,
)
from core.errors import FlowerError, Kind
from core.files import Unit, folder_lock, is_tmp, write_atomic, write_text_atomic
from core.members import (
    ArtifactError,
    data_fit,
    read_ensemble,
    read_member,
    write_ensemble,
    write_member,
)
from core.names import without_paths
from core.photos import PhotoError, TooManyPixels, is_photo_name, load_rgb, open_photo, walk_photos


def _png(size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the contract's names and rules -----------------------------------------------------------------------


def test_size_folders_record_counts_and_the_one_size_rule():
    assert size_folder_name(192) == "tfrecords-jpeg-192x192" and folder_size("tfrecords-jpeg-192x192") == 192
    assert folder_size("tfrecords-jpeg-192x224") is None and folder_size("tfrecords-jpeg-x") is None
    assert count_in_name("gs://b/00-192x192-230.tfrec") == 230 and count_in_name("a.tfrec") is None
    assert choose_size([512, 192, 224], 200) == 224  # the smallest at least as large as the model
    assert choose_size([192, 224], 300) == 224 and choose_size([192, 224], None) == 224  # else, or asked: largest
    with pytest.raises(ValueError):
        choose_size([], 10)


def test_a_split_spec_is_an_existing_folder_and_a_plain_split_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "odd:name").mkdir()  # a folder whose own name holds a colon is a folder, not a split
    assert (spec := parse_split_spec("data:test")) and (spec.data, spec.split) == ("data", "test")
    assert str(spec) == "data:test"
    for text in ("odd:name", "missing:test", "data:a/b", "data:", ":test", "data"):
        assert parse_split_spec(text) is None, text
    (tmp_path / "data" / "tfrecords-jpeg-32x32").mkdir()
    (tmp_path / "data" / "tfrecords-jpeg-32x48").mkdir()
    assert list(local_size_folders("data")) == [32] and not is_data_folder("data")
    (tmp_path / "data" / "classes.json").write_text("[]")
    assert is_data_folder("data") and not is_data_folder("nowhere")


# --- files ------------------------------------------------------------------------------------------------


def test_an_atomic_write_never_leaves_a_partial_file_and_names_the_target(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")

    def fails(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as err:
        write_atomic(target, fails)
    assert err.value.filename == str(target) and target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_an_error_about_another_file_keeps_that_files_name_and_leftovers_are_known(tmp_path):
    def reads_a_missing_file(tmp: str) -> None:
        open(tmp_path / "missing.bin", "rb")

    with pytest.raises(FileNotFoundError) as err:
        write_atomic(tmp_path / "out.bin", reads_a_missing_file)
    assert err.value.filename == str(tmp_path / "missing.bin")
    leftover = tmp_path / ".best.weights.h5.x1y2.tmp.weights.h5"
    leftover.write_bytes(b"")
    assert is_tmp(leftover) and is_tmp(tmp_path / "out.bin") is False


def test_a_write_removes_what_killed_writes_of_the_same_file_left_but_not_a_live_writers_file(tmp_path):
    import socket
    import zlib

    host = f"{zlib.crc32(socket.gethostname().encode()):08x}"
    gone = 4_194_305  # above the largest pid Linux hands out: a process that has ended
    target = tmp_path / "out.csv"
    killed = tmp_path / f".out.csv.{host}-{gone}.k1ll3d_9.tmp"  # what kill -9 left of a write of out.csv
    others = [tmp_path / f".other.csv.{host}-{gone}.k1ll3d_9.tmp", tmp_path / f".out.csv.0badc0de-{gone}.abcdefgh.tmp"]
    for path in (killed, *others):
        path.write_text("half")
    seen = []

    def slow(tmp: str) -> None:  # a second write of out.csv starts while this one writes: it must leave this one be
        Path(tmp).write_text("first")
        write_text_atomic(target, "second")
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.csv.")))

    write_atomic(target, slow)
    assert target.read_text() == "first" and len(seen[0]) == 2  # the live one and another host's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in others), "out.csv"])


def test_without_overwrite_a_file_that_appears_while_writing_is_kept(tmp_path):
    target = tmp_path / "out.csv"

    def meanwhile(tmp: str) -> None:
        open(tmp, "w").write("mine")
        target.write_text("theirs")  # another process wins the race

    with pytest.raises(FileExistsError):
        write_atomic(target, meanwhile, overwrite=False)
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    assert write_atomic(tmp_path / "new.csv", lambda tmp: open(tmp, "w").write("x"), overwrite=False).exists()


def test_a_folder_published_as_a_unit_keeps_the_old_one_on_failure_and_refuses_strangers(tmp_path):
    unit = Unit(lambda p: p.name in ("a", "b") and p.is_file(), "test")
    out = tmp_path / "out"

    def writes(values):
        def write(stage):
            for name, value in values.items():
                (stage / name).write_text(value)
            return "done"
        return write

    assert unit.publish(out, writes({"a": "1", "b": "1"}), ValueError) == "done"

    def broken(stage):
        (stage / "a").write_text("2")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        unit.publish(out, broken, ValueError)
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        unit.publish(out, writes({"a": "3"}), lambda strangers: ValueError(f"holds {strangers}"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "a").read_text() == "1"


def test_a_folder_lock_is_exclusive(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(BlockingIOError):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released
        pass


# --- photos -----------------------------------------------------------------------------------------------


def test_the_one_opener_refuses_by_code_from_the_header(tmp_path):
    assert load_rgb(_png()).size == (8, 6)
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    cases = [(b"", "empty"), (b"text", "not_an_image"), (_png()[:20], "corrupt"),
             (tiff.getvalue(), "unsupported_format")]
    for data, code in cases:
        with pytest.raises(PhotoError) as err:
            open_photo(data)
        assert err.value.code == code and err.value.kind is Kind.INVALID
    with pytest.raises(TooManyPixels, match="8x6 = 48 pixels, more than the limit of 47") as err:
        open_photo(_png(), max_pixels=47)
    assert err.value.kind is Kind.TOO_LARGE and isinstance(err.value, FlowerError)


def test_a_folder_of_photos_means_one_thing(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for name in ("a.JPG", "b/c.png", "b/deep/d.webp", "notes.txt", ".hidden.jpg", "noextension"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a broken link is one whatever its name
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    (tmp_path / "b" / "up").symlink_to(tmp_path)
    walk = walk_photos(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in walk.photos] == ["a.JPG", "b/c.png", "b/deep/d.webp"]
    assert sorted(p.name for p in walk.others) == ["noextension", "notes.txt"]
    assert [p.name for p in walk.hidden] == [".hidden.jpg"]
    codes = {p.path.name: (p.code, p.reason) for p in walk.problems}
    assert codes["gone.jpg"] == ("broken_link", f"broken link: its target {tmp_path / 'nowhere.jpg'} does not exist")
    assert codes["gone"][0] == "broken_link"
    assert codes["self.png"] == ("broken_link", "link loop: the link leads back to itself")
    assert codes["up"][0] == "link_loop" and codes["up"][1].startswith("link loop: a link to")
    assert is_photo_name("x.JPEG") and not is_photo_name("x.tif")


# --- member.json and ensemble.json ------------------------------------------------------------------------


def test_member_json_is_read_typed_and_written_checked(tmp_path):
    run = tmp_path / "run"
    write_member(run, {"name": "m", "image_size": 64, "geometry": {"fit": "pad"}, "data": {"file_size": 96},
                       "metrics": {"val_macro_f1": 0.5}, "config": {"data": {"train_on_val": True}},
                       "validation_from": "../orig"})
    member = read_member(run)
    assert (member.name, member.image_size, member.geometry(), member.val_macro_f1) == ("m", 64, ("pad", 96), 0.5)
    assert member.train_on_val and member.validation_from == "../orig"
    before = (run / "member.json").read_text()
    for bad, message in (({"name": 3}, "'name' must be a string"), ({"image_size": 0}, "no valid image_size"),
                         ({"geometry": {"fit": "squash"}}, "'geometry' must be"), ({"config": [1]}, "config must be")):
        with pytest.raises(ArtifactError, match=message):
            write_member(run, bad)
    assert (run / "member.json").read_text() == before  # a refused write changes nothing
    for name, shown_as in (("", "run"), (None, "run")):
        write_member(run, {"name": name})
        assert read_member(run).name == shown_as  # no name: the folder's
    with pytest.raises(ArtifactError, match="'name' must be a string"):
        write_member(run, {"name": "   "})
    (run / "member.json").write_text("[1]")
    with pytest.raises(ArtifactError, match="must be a JSON object"):
        read_member(run)
    with pytest.raises(ArtifactError, match="not found"):
        read_member(tmp_path / "nothing")


def test_ensemble_json_is_read_typed_and_written_checked(tmp_path):
    document = {"version": 1, "classes": ["a", "b "], "blend": {"method": "mean", "weights": [1.0]},
                "members": [{"name": "m", "path": "../runs/m", "weight": 1.0}]}
    write_ensemble(tmp_path / "ens", document)
    ensemble = read_ensemble(tmp_path / "ens")
    assert ensemble.classes == ("a", "b") and ensemble.members[0].run_dir(ensemble.path) == (tmp_path / "runs" / "m")
    assert read_ensemble(tmp_path / "ens" / "ensemble.json").blend == document["blend"]
    for change, message in (({"version": 2}, "reads version 1"), ({"members": [{"name": "m"}]}, "'path'"),
                            ({"classes": []}, "'classes' must be")):
        with pytest.raises(ArtifactError, match=message):
            write_ensemble(tmp_path / "ens", {**document, **change})
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text()) == document
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'final' / 'ensemble.json'}: 'classes'"):
        write_ensemble(tmp_path / "ens", {**document, "classes": []}, final_dir=tmp_path / "final")


def test_the_fit_of_a_data_set_comes_from_the_option_then_its_report(tmp_path):
    assert data_fit(str(tmp_path), "pad")["from"] == "data.fit"
    assert data_fit(str(tmp_path))["fit"] == "crop"
    (tmp_path / "import_report.json").write_text(json.dumps({"fit": "stretch"}))
    assert data_fit(str(tmp_path))["fit"] == "stretch"


def test_text_shown_to_a_client_names_a_known_folder_as_given_and_any_other_absolute_path_by_its_last_part(tmp_path):
    version = tmp_path / "models" / "m" / "1"
    text = (f"{version}/member.json is not JSON; {tmp_path}/models/m/10/x; member 'a' ({tmp_path}/runs/a): NaN; "
            f"[Errno 2] No such file: '/srv/other/saved_model'; ratio 1/2, gs://bucket/file, runs/b")
    assert without_paths(text, {version: "m/1"}) == (
        "m/1/member.json is not JSON; x; member 'a' (a): NaN; [Errno 2] No such file: 'saved_model'; ratio 1/2, "
        "gs://bucket/file, runs/b")


def test_a_server_path_with_spaces_or_accents_or_written_as_bytes_is_not_shown_to_a_client():
    version = Path("/srv/my models é/flowers/3")
    tf_error = "OSError: Cannot parse file b'/srv/my models \\xc3\\xa9/flowers/3/saved_model/saved_model.pb': corrupt"
    assert without_paths(tf_error, {version: "flowers/3"}) == \
        "OSError: Cannot parse file b'flowers/3/saved_model/saved_model.pb': corrupt"
    text = "run directory not found: /home/Ann Lee/other runs/x; /srv/old copy/linked/saved_model cannot be loaded"
    assert without_paths(text, {version: "flowers/3"}) == "run directory not found: x; saved_model cannot be loaded"


def test_a_refits_validation_source_with_a_damaged_val_npz_is_named_not_a_traceback(tmp_path):
    from core.members import validation_source_problem

    (tmp_path / "predictions").mkdir()
    (tmp_path / "classes.json").write_text('["a", "b"]')
    (tmp_path / "predictions" / "val.npz").write_bytes(b"PK\x03\x04" + bytes(60))  # a zip's magic, then nothing
    problem = validation_source_problem(tmp_path, ["a", "b"], val_rows=10)
    assert problem is not None and problem.startswith(f"{tmp_path / 'predictions' / 'val.npz'} cannot be read: ")


def test_a_server_path_with_punctuation_in_a_folder_is_not_shown_and_given_names_stay_whole():
    from core.names import without_paths

    for path in ("/srv/a,b/secret/x.npz", "/srv/run:1/data/x.npz", "/home/o'brien/runs/x.npz",
                 "/home/u/runs (old)/m/x.npz"):
        assert without_paths(f"cannot read {path}: bad", {}) == "cannot read x.npz: bad", path
    copy = Path("/srv/model (copy)")
    assert without_paths(f"{copy}/runs/a/x.json: bad", {copy: "model (copy)"}) == "model (copy)/runs/a/x.json: bad"
    assert without_paths("/srv/repo/flowers/1/e.json", {Path("/srv/repo"): "<repo>"}) == "<repo>/flowers/1/e.json"

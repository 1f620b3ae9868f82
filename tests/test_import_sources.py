"""The import tool against unlucky or hostile sources: links (to the source, broken, looping, reaching a file
twice), classes too small for val/test, file names that are not UTF-8, decompression bombs and the pixel limit,
and the sizes' upper bound."""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

import training.data.importer.options as options
from core.errors import DataError
from core.photos import NOT_A_PHOTO_NAME, load_rgb
from flower.commands.import_photos import main as import_main
from flower.commands.overlap import main as overlap_main
from tests.support import OFF, _classes, _noise, _one_line_error
from training.data.importer.folders import import_folders
from training.data.near_duplicates import read_folder

# --- 1. links ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["source", "above"])
def test_a_class_folder_that_links_to_the_source_or_above_is_refused(tmp_path, capsys, target):
    src = tmp_path / "photos" / "src"
    _classes(src, "ab")
    (src / "c").symlink_to(src if target == "source" else src.parent, target_is_directory=True)
    out = tmp_path / "out"
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 2
    err = _one_line_error(capsys)
    assert f"class folder {src / 'c'} is a link to" in err and "the source folder or a folder above it" in err, err
    assert not out.exists()


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    src = tmp_path / "src"
    _classes(src, "ab")
    (src / "c").symlink_to(src / "a", target_is_directory=True)
    with pytest.raises(DataError, match="class folders a and c are the same folder"):
        import_folders(src, tmp_path / "out", sizes=[16], progress=False)
    (src / "c").unlink()
    (src / "a" / "inner").mkdir()
    (src / "c").symlink_to(src / "a" / "inner", target_is_directory=True)
    with pytest.raises(DataError, match="class folder c .* lies inside class folder a"):
        import_folders(src, tmp_path / "out", sizes=[16], progress=False)


def test_links_reach_a_file_once_and_broken_or_looping_links_are_reported(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab", count=5)
    (src / "a" / "again.png").symlink_to("0.png")  # the same file twice in one class: counted once
    (src / "a" / "sub").mkdir()
    (src / "a" / "sub" / "up").symlink_to("..", target_is_directory=True)  # a loop: not followed
    (src / "b" / "dangling.png").symlink_to("missing.png")
    (src / "b" / "loop1.png").symlink_to("loop2.png")
    (src / "b" / "loop2.png").symlink_to("loop1.png")
    (src / "b" / "borrowed.png").symlink_to("../a/1.png")  # one file in two classes: which label? neither
    (src / "gone").symlink_to("nowhere", target_is_directory=True)  # a class folder link that is broken
    os.mkfifo(src / "b" / "pipe.png")  # not a regular file (reading it would block)
    assert import_main([str(src), str(out), "--sizes", "16", "--val", "0.25", "--test", "0.25", *OFF]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "import_report.json").read_text())
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"a/again.png", "a/sub/up", "b/dangling.png", "b/loop1.png", "b/loop2.png",
                            "a/1.png", "b/borrowed.png", "gone", "b/pipe.png"}, skipped
    assert skipped["a/again.png"].startswith("the same file as a/0.png")
    assert skipped["a/sub/up"].startswith("link loop") and skipped["b/loop1.png"].startswith("link loop")
    assert skipped["b/dangling.png"].startswith("broken link") and skipped["gone"].startswith("broken link")
    assert "class folders a and b" in skipped["a/1.png"] and "class folders a and b" in skipped["b/borrowed.png"]
    assert skipped["b/pipe.png"].startswith("not a regular file")
    assert sum(sum(c.values()) for c in report["counts"].values()) == 9  # 5 + 5 files, less a/1.png
    assert any("a/1.png" in w and "b/borrowed.png" in w for w in report["warnings"])
    assert "skipped 9 file(s)" in printed


def test_overlap_reports_broken_links_in_a_folder(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    _classes(a, ["x"], count=2)
    _classes(b, ["y"], count=2, seed=9)
    (a / "x" / "dangling.png").symlink_to("missing.png")
    folder = read_folder(str(a), squares_too=False, progress=False)
    assert folder.skipped == ["x/dangling.png"] and len(folder.names) == 2


# --- 2. classes too small, splits left empty ---------------------------------------------------------------

def test_a_class_too_small_for_a_val_or_test_photo_is_warned_about(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab", count=10)
    (src / "lonely").mkdir()
    _noise(999).save(src / "lonely" / "only.png")
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "import_report.json").read_text())
    assert report["counts"]["val"]["lonely"] == report["counts"]["test"]["lonely"] == 0
    warnings = [w for w in report["warnings"] if "'lonely'" in w]
    assert len(warnings) == 1 and "has only 1 photo(s)" in warnings[0] and "val and test" in warnings[0], warnings
    assert f"WARNING: {warnings[0]}" in printed
    assert not [w for w in report["warnings"] if "'a'" in w or "'b'" in w]


def test_an_import_whose_val_and_test_only_label_conflicts_could_fill_is_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "a")
    shutil.copytree(src / "a", src / "b")  # every photo of b is a byte-identical copy of one in a
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 2
    err = _one_line_error(capsys)
    assert "would leave val and test empty" in err and "label conflict" in err and "nothing was written" in err
    assert not out.exists()


# --- 3. names that are not UTF-8 ---------------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_imported_and_shown_escaped(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab")
    folder = os.fsencode(src / "a")
    with open(os.path.join(folder, b"bad\xff.png"), "wb") as f:
        f.write((src / "a" / "0.png").read_bytes())  # a copy of 0.png: named in a duplicate group
    with open(os.path.join(folder, b"notes\xfe.txt"), "wb") as f:
        f.write(b"not an image")
    (src / "b" / "two\nlines.txt").write_text("not an image either")  # a newline: shown escaped, on one line
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "import_report.json").read_bytes().decode("utf-8"))  # valid UTF-8 throughout
    assert report["skipped"] == [{"path": "a/notes\\xfe.txt", "reason": NOT_A_PHOTO_NAME},
                                 {"path": "b/two\\x0alines.txt", "reason": NOT_A_PHOTO_NAME}]
    assert report["duplicate_groups"][0]["files"] == ["a/0.png", "a/bad\\xff.png"]
    assert sum(sum(c.values()) for c in report["counts"].values()) == 9
    assert "skipped 2 file(s)" in printed


def test_a_class_folder_name_that_is_not_utf8_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _classes(src, "ab")
    os.rename(src / "b", os.path.join(os.fsencode(src), b"b\xff"))
    assert import_main([str(src), str(tmp_path / "out"), "--sizes", "16", *OFF]) == 2
    assert "class folder name 'b\\xff'" in _one_line_error(capsys)


@pytest.mark.parametrize(("names", "message"), [
    (["rose", "rose ", "tulip"], "class names 'rose' and 'rose ' are one class, 'rose', once their surrounding "
                                 "spaces are stripped"),
    (["  ", "rose", "tulip"], "class name '  ' is empty once its surrounding spaces are stripped"),
])
def test_class_folders_that_would_be_one_class_or_an_empty_name_are_refused_before_anything_is_written(
        tmp_path, capsys, names, message):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, names, count=1)
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 2
    assert message in _one_line_error(capsys) and not out.exists()


def test_overlap_shows_names_that_are_not_utf8_escaped(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    _classes(a, ["x"], count=2)
    b.mkdir()
    with open(os.path.join(os.fsencode(b), b"copy\xff.png"), "wb") as f:
        f.write((a / "x" / "0.png").read_bytes())
    assert overlap_main([str(a), str(b), "--quiet"]) == 1
    assert "x/0.png  copy\\xff.png" in capsys.readouterr().out


# --- 4. decompression bombs --------------------------------------------------------------------------------

def _png_bomb(path: Path, side: int = 13000) -> None:
    """A greyscale PNG of side x side black pixels, written row by row (a few dozen KB; never in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def _no_large_decode(monkeypatch, limit: int = 10_000_000) -> None:
    real = ImageFile.ImageFile.load

    def load(self):
        assert self.size[0] * self.size[1] <= limit, f"decoded {self.size}"
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_decompression_bomb_is_skipped_from_its_header(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab")
    _png_bomb(src / "a" / "bomb.png")
    assert (src / "a" / "bomb.png").stat().st_size < 300_000
    _no_large_decode(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no PIL warning either: not opened that far
        assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 0
    report = json.loads((out / "import_report.json").read_text())
    reason = {s["path"]: s["reason"] for s in report["skipped"]}["a/bomb.png"]
    assert "13000x13000" in reason and "--max-pixels 40000000" in reason, reason
    assert sum(sum(c.values()) for c in report["counts"].values()) == 8


def test_max_pixels_is_an_option_and_is_checked(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab")
    _noise(7, size=20).save(src / "a" / "big.png")  # 400 pixels
    assert import_main([str(src), str(out), "--sizes", "16", "--max-pixels", "300", *OFF]) == 0
    report = json.loads((out / "import_report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == ["a/big.png"]
    capsys.readouterr()
    assert import_main([str(src), str(tmp_path / "o2"), "--max-pixels", "0"]) == 2
    assert _one_line_error(capsys).startswith("error: --max-pixels must be a whole number >= 1, got 0")
    with pytest.raises(SystemExit):
        import_main(["--help"])
    assert "--max-pixels" in capsys.readouterr().out


def test_every_reader_of_user_images_honours_the_pixel_limit(tmp_path, monkeypatch, capsys):
    from core.photos import TooManyPixels

    folder = tmp_path / "photos"
    _png_bomb(folder / "bomb.png")
    _noise(3).save(folder / "fine.png")
    _no_large_decode(monkeypatch)
    with pytest.raises(TooManyPixels, match="13000x13000"):
        load_rgb(folder / "bomb.png")
    with pytest.raises(TooManyPixels, match="13000x13000"):
        load_rgb((folder / "bomb.png").read_bytes())
    assert load_rgb(folder / "fine.png", max_pixels=144).size == (12, 12)
    with pytest.raises(TooManyPixels):
        load_rgb(folder / "fine.png", max_pixels=143)
    photos_read = read_folder(str(folder), squares_too=False, progress=False)
    assert photos_read.skipped == ["bomb.png"] and photos_read.names == ["fine.png"]
    other = tmp_path / "other"
    other.mkdir()
    _noise(4).save(other / "x.png")
    assert overlap_main([str(folder), str(other), "--quiet", "--max-pixels", "100"]) == 2  # fine.png too: none left
    assert "no images in" in capsys.readouterr().err


def test_sizes_have_an_upper_bound(tmp_path, capsys):
    src = tmp_path / "src"
    _classes(src, "ab")
    assert import_main([str(src), str(tmp_path / "out"), "--sizes", "64,4097"]) == 2
    assert _one_line_error(capsys).startswith("error: --sizes allows squares up to 4096, got [64, 4097]")
    options.check_import_options([64, 4096], 0.15, 0.15, 1)  # the bound itself is allowed
    assert not (tmp_path / "out").exists()

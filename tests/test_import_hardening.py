"""The import tool against hostile or unlucky input: a data folder that holds other data, a swap interrupted
at any step, links (to the source, broken, looping, reaching a file twice), classes too small for val/test,
file names that are not UTF-8, and decompression bombs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import training.data.importer.options as options
import training.data.importer.publish as publish
from core.errors import DataError
from core.photos import NOT_A_PHOTO_NAME, load_rgb
from flower.commands.import_photos import main as import_main
from flower.commands.overlap import main as overlap_main
from training.data.importer.folders import import_folders
from training.data.near_duplicates import read_folder


def _noise(seed: int, size: int = 12) -> Image.Image:
    """A random photo: distinct seeds give images that are neither the same bytes nor near duplicates."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _classes(src: Path, names: str | list[str], count: int = 4, seed: int = 0) -> None:
    for c, name in enumerate(names):
        (src / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            _noise(seed + 100 * c + k).save(src / name / f"{k}.png")


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under a folder: file contents, None for a folder."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


OFF = ["--near-duplicate-distance", "off"]


# --- 1. a data folder holding other data; the swap ---------------------------------------------------------

def test_an_import_into_a_folder_holding_other_data_is_refused_without_overwrite(tmp_path, capsys):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    _classes(first, "ab")
    _classes(second, "xyz", seed=50)
    assert import_main([str(first), str(out), "--sizes", "16", *OFF]) == 0
    before = _tree(out)
    for sizes in ("24", "16", "16,24"):  # other sizes, the same size, both: all refused, nothing touched
        assert import_main([str(second), str(out), "--sizes", sizes, *OFF]) == 2
        err = _one_line_error(capsys)
        assert f"{out} already holds a data set" in err and "classes a, b" in err, err
        assert "tfrecords-jpeg-16x16" in err and "--overwrite" in err and "x, y, z" in err, err
        assert _tree(out) == before


def test_overwrite_replaces_the_whole_data_set_and_drops_sizes_it_does_not_write(tmp_path, capsys):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    _classes(first, "ab")
    _classes(second, "xyz", seed=50)
    assert import_main([str(first), str(out), "--sizes", "16,20", *OFF]) == 0
    (out / "notes.txt").write_text("mine")  # not an import output: kept
    assert import_main([str(second), str(out), "--sizes", "24", "--overwrite", *OFF]) == 0
    assert json.loads((out / "classes.json").read_text()) == ["x", "y", "z"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "import_report.json", "notes.txt",
                                                     "test_answers.csv", "tfrecords-jpeg-24x24"]
    assert json.loads((out / "import_report.json").read_text())["sizes"] == [24]


class Killed(BaseException):
    """A simulated kill: not an Exception, so no `except Exception` handler swallows it."""


def _fail_at(monkeypatch, at: int, forever: bool) -> dict:
    """Make the at-th call of os.replace / os.rmdir / shutil.rmtree raise (and every later one, when forever)."""
    state = {"calls": 0, "inside": 0}

    def wrap(real, name):
        def call(*args, **kwargs):
            if not state["inside"]:
                state["calls"] += 1
                if state["calls"] == at or (forever and state["calls"] > at):
                    raise Killed(name) if forever else OSError(5, f"simulated failure of {name}")
            state["inside"] += name == "rmtree"
            try:
                return real(*args, **kwargs)
            finally:
                state["inside"] -= name == "rmtree"
        return call

    monkeypatch.setattr(os, "replace", wrap(os.replace, "replace"))
    monkeypatch.setattr(os, "rmdir", wrap(os.rmdir, "rmdir"))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree, "rmtree"))
    return state


def _old_and_new(tmp_path) -> tuple[Path, Path, dict, dict]:
    """A data folder with classes a, b at 16 and 20 px, its tree, and the tree an overwrite with x, y, z gives."""
    first, second = tmp_path / "first", tmp_path / "second"
    _classes(first, "ab")
    _classes(second, "xyz", seed=50)
    import_folders(second, tmp_path / "new", sizes=[24], progress=False, near_duplicate_distance=None)
    new = _tree(tmp_path / "new")
    import_folders(first, tmp_path / "out", sizes=[16, 20], progress=False, near_duplicate_distance=None)
    return second, tmp_path / "out", _tree(tmp_path / "out"), new


def test_a_failure_at_any_step_of_an_overwrite_leaves_the_old_data_intact(tmp_path, monkeypatch, capsys):
    second, out, old, _ = _old_and_new(tmp_path)
    for at in range(1, 100):
        with monkeypatch.context() as patched:
            state = _fail_at(patched, at, forever=False)
            try:
                import_folders(second, out, sizes=[24], overwrite=True, progress=False, near_duplicate_distance=None)
            except (DataError, OSError) as err:
                assert "simulated failure" in str(err) and "\n" not in str(err)
                assert _tree(out) == old, at  # rolled back at once: the old data, no leftovers
                continue
        break
    # Every step failed once, but the last: deleting the old data after the commit fails with a note only.
    assert at > 10 and state["calls"] == at and "could not be deleted" in capsys.readouterr().err
    assert json.loads((out / "classes.json").read_text()) == ["x", "y", "z"]
    assert (out / ".import-old").exists()
    import_folders(second, out, sizes=[24], overwrite=True, progress=False, near_duplicate_distance=None)
    assert not (out / "tfrecords-jpeg-16x16").exists() and not list(out.glob(".import*"))


def test_a_kill_at_any_step_of_an_overwrite_is_undone_by_the_next_import(tmp_path, monkeypatch, capsys):
    second, out, old, new = _old_and_new(tmp_path)
    outcomes = []
    for at in range(1, 100):
        with monkeypatch.context() as patched:
            state = _fail_at(patched, at, forever=True)  # the kill: the in-process rollback fails too
            try:
                import_folders(second, out, sizes=[24], overwrite=True, progress=False, near_duplicate_distance=None)
            except Killed:
                pass
        killed = state["calls"] >= at
        # The next import into the folder first finishes or undoes the interrupted one (here it is then refused).
        assert import_main([str(second), str(out), "--sizes", "24", *OFF]) == 2
        assert "already holds a data set" in _one_line_error(capsys)
        tree = _tree(out)
        assert tree in (old, new), at  # never a mix, never leftovers
        outcomes.append(tree == old)
        if not killed:
            break
        if tree == new:  # killed after the new data was complete and in place: start again from the old data
            shutil.rmtree(out)
            import_folders(tmp_path / "first", out, sizes=[16, 20], progress=False, near_duplicate_distance=None)
            assert _tree(out) == old
    # Killed at any step up to the commit: the old data came back; at the last step (deleting the old data once
    # the new is in place) and with no kill: the new data.
    assert len(outcomes) > 10 and outcomes == [True] * (len(outcomes) - 2) + [False, False]


def _restore(folder: Path, tree: dict[str, bytes | None]) -> None:
    shutil.rmtree(folder)
    folder.mkdir()
    for name, data in tree.items():
        if data is None:
            (folder / name).mkdir(parents=True, exist_ok=True)
        else:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)


def test_a_kill_while_undoing_an_interrupted_import_is_undone_again(tmp_path, monkeypatch):
    second, out, old, new = _old_and_new(tmp_path)
    tries = 0
    for at in range(1, 100):
        _restore(out, old)
        with monkeypatch.context() as patched:
            state = _fail_at(patched, at, forever=True)
            try:
                import_folders(second, out, sizes=[24], overwrite=True, progress=False, near_duplicate_distance=None)
            except Killed:
                pass
        if state["calls"] < at:
            break
        interrupted = _tree(out)
        publish.recover(out, progress=False)
        expected = _tree(out)
        assert expected in (old, new), at
        for again in range(1, 100):  # kill the clean-up at each of its steps, then clean up again
            _restore(out, interrupted)
            with monkeypatch.context() as patched:
                cleanup = _fail_at(patched, again, forever=True)
                try:
                    publish.recover(out, progress=False)
                except Killed:
                    pass
            publish.recover(out, progress=False)
            assert _tree(out) == expected, (at, again)
            tries += 1
            if cleanup["calls"] < again:
                break
    assert at > 10 and tries > 2 * at


def test_two_imports_into_one_folder_at_once_are_refused(tmp_path, capsys):
    import fcntl

    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab")
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 2
        assert f"another import is writing to {out}" in _one_line_error(capsys)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []
    assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 0


def test_a_data_folder_inside_the_source_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _classes(src, "ab")
    for out in (src, src / "data", src / "a" / "data"):
        assert import_main([str(src), str(out), "--sizes", "16", *OFF]) == 2
        assert f"the data folder {out} is inside the source folder {src}" in _one_line_error(capsys)
    assert not (src / "data").exists() and not (src / "a" / "data").exists()


def test_a_users_file_that_merely_looks_like_a_leftover_is_kept(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _classes(src, "ab")
    out.mkdir()
    (out / ".import-staging-notes").write_text("mine")
    (out / ".import-staging-0").mkdir()  # only .import-staging itself is the import's
    import_folders(src, out, sizes=[16], progress=False, near_duplicate_distance=None)
    import_folders(src, out, sizes=[16], progress=False, near_duplicate_distance=None, overwrite=True)
    assert (out / ".import-staging-notes").read_text() == "mine" and (out / ".import-staging-0").is_dir()


# --- 2. links ----------------------------------------------------------------------------------------------

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


# --- 3. classes too small, splits left empty ---------------------------------------------------------------

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


# --- 4. names that are not UTF-8 ---------------------------------------------------------------------------

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


def test_overlap_shows_names_that_are_not_utf8_escaped(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    _classes(a, ["x"], count=2)
    b.mkdir()
    with open(os.path.join(os.fsencode(b), b"copy\xff.png"), "wb") as f:
        f.write((a / "x" / "0.png").read_bytes())
    assert overlap_main([str(a), str(b), "--quiet"]) == 1
    assert "x/0.png  copy\\xff.png" in capsys.readouterr().out


# --- 5. decompression bombs --------------------------------------------------------------------------------

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

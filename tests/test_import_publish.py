"""The import tool's output folder: an import into a folder holding other data is refused without --overwrite,
an overwrite replaces the whole data set through a swap that a failure or a kill at any step leaves (or the next
import puts) whole, two imports at once or a data folder inside the source are refused, and a user's file
that merely looks like a leftover is kept."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import training.data.importer.publish as publish
from core.errors import DataError
from flower.commands.import_photos import main as import_main
from tests.support import OFF, _classes, _one_line_error
from training.data.importer.folders import import_folders


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under a folder: file contents, None for a folder."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


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
        assert f"another import (or flower demo-data) is writing to {out}" in _one_line_error(capsys)
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

"""The ensemble directory under failure: interrupted writes, bad --out, full or read-only disks, broken members."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import core.files as files
import ensemble.build as build
import ensemble.output as output
from ensemble.build import build_ensemble
from flower.commands.blend import main
from testkit.synthetic import synthetic_runs

REPO = Path(__file__).resolve().parents[1]
FILES = ("ensemble.json", "submission.csv", "report.md", "weights.png", "scores.png")
WRITERS = ("write_submission", "write_ensemble_json", "plot_weights", "plot_scores", "write_report")


@pytest.fixture
def tiny(tmp_path):
    """Two small members (3 classes, 60 validation and 20 test rows): fast to blend."""
    return synthetic_runs(tmp_path / "runs", skills=[1.5, 3.0], classes=3, val_rows=60, test_rows=20)


def _blend(runs, out, *extra) -> int:
    return main([*map(str, runs), "--out", str(out), "--method", "mean", "--folds", "2", "--quiet", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of a folder (hidden ones too) and its bytes (None for a folder)."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err.strip()


@pytest.fixture
def previous(tiny, tmp_path):
    """An ensemble directory written by an earlier blend, and its content."""
    out = tmp_path / "ens"
    assert _blend(tiny, out) == 0
    return out, _snapshot(out)


def _leftovers(out: Path) -> list[str]:
    """Entries beside out that a blend made (staging or set-aside folders), and temporary files inside it."""
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    inside = [p.name for p in out.iterdir() if p.name.endswith(".tmp")] if out.is_dir() else []
    return beside + inside


def _fail_after(monkeypatch, writer: str, error: BaseException) -> None:
    """Make one of build's writers do its write, then raise."""
    original = getattr(build, writer)

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise error

    monkeypatch.setattr(build, writer, failing)


# --- 1. the directory changes as one unit ------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_a_failure_at_any_write_leaves_the_previous_directory_intact_and_no_leftovers(
        tiny, previous, monkeypatch, writer):
    out, before = previous
    _fail_after(monkeypatch, writer, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_ensemble(tiny, out, "weighted", folds=2, progress=lambda _: None)
    assert _snapshot(out) == before and sorted(before) == sorted(FILES)
    assert _leftovers(out) == []


def test_a_first_blend_that_fails_creates_no_directory(tiny, tmp_path, monkeypatch):
    _fail_after(monkeypatch, "write_report", RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        build_ensemble(tiny, tmp_path / "new" / "ens", "mean", folds=2, progress=lambda _: None)
    assert not (tmp_path / "new" / "ens").exists() and list((tmp_path / "new").iterdir()) == []


def _killed_blend(runs, out, where: str) -> None:
    """Run the blender in a subprocess that is killed with SIGKILL at `where` (build's writer or output's step)."""
    module, _, name = where.rpartition(".")
    code = (
        "import os, signal, sys\n"
        f"import {module} as target\n"
        f"original = target.{name}\n"
        "def kill(*args, **kwargs):\n"
        "    result = original(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"target.{name} = kill\n"
        "from flower.commands.blend import main\n"
        f"main({[*map(str, runs), '--out', str(out), '--method', 'weighted', '--folds', '2', '--quiet']!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()


def test_a_blender_killed_between_its_writes_changes_nothing_and_the_rerun_cleans_up(tiny, previous):
    out, before = previous
    _killed_blend(tiny, out, "ensemble.build.write_submission")  # killed just before ensemble.json
    assert _snapshot(out) == before  # the old method with its own submission, not a mix
    assert _leftovers(out), "the killed run's staging folder should be there to clean"
    assert _blend(tiny, out, "--method", "weighted") == 0
    assert _leftovers(out) == [] and sorted(_snapshot(out)) == sorted(FILES)
    assert json.loads((out / "ensemble.json").read_text())["method"] == "weighted"


def test_a_blender_killed_in_the_middle_of_the_swap_is_recovered_by_the_next_run(tiny, previous):
    out, before = previous
    _killed_blend(tiny, out, "core.files.set_aside")  # the old directory is aside, the new one not yet in
    assert not out.exists()
    output.clean_leftovers(out)  # what the next blend does first: the previous directory comes back
    assert _snapshot(out) == before and _leftovers(out) == []
    _killed_blend(tiny, out, "core.files.set_aside")
    assert _blend(tiny, out, "--method", "weighted") == 0
    assert _leftovers(out) == [] and json.loads((out / "ensemble.json").read_text())["method"] == "weighted"


def test_temporary_files_of_interrupted_writes_are_removed_by_the_next_blend(tiny, previous):
    out, _ = previous
    (out / ".submission.csv.k2j4h1.tmp").write_bytes(b"x" * 3_000_000)  # what an older blender left behind
    (out.parent / f".{out.name}.staging-0123456789abcdef").mkdir()
    (out.parent / f".{out.name}.staging-0123456789abcdef" / "report.md").write_text("half")
    assert _blend(tiny, out) == 0
    assert _leftovers(out) == [] and sorted(_snapshot(out)) == sorted(FILES)


def test_a_staging_folder_in_use_by_another_blend_is_left_alone(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "ens"
    live, stale = tmp_path / ".ens.staging-00000000000000aa", tmp_path / ".ens.staging-00000000000000bb"
    live.mkdir(), stale.mkdir()
    other = tmp_path / ".ens.x.staging-00000000000000cc"  # another --out's (named "ens.x"): not ours
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        output.clean_leftovers(out)
    finally:
        os.close(fd)
    assert live.exists() and other.exists() and not stale.exists()


def test_a_symlinked_out_keeps_its_link_and_replaces_the_target(tiny, tmp_path):
    target = tmp_path / "v1"
    assert _blend(tiny, target) == 0
    (tmp_path / "current").symlink_to(target)
    assert _blend(tiny, tmp_path / "current", "--method", "weighted") == 0
    assert (tmp_path / "current").is_symlink()
    assert json.loads((target / "ensemble.json").read_text())["method"] == "weighted"


# --- 2. --out and the disk -------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["", "   ", "afile", "afile/ens"])
def test_a_bad_out_is_refused_before_anything_is_loaded(tiny, tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(build, "load_members", lambda *_: pytest.fail("loaded members"))
    before = _snapshot(tmp_path)
    assert _blend(tiny, out) == 2
    err = _one_line_error(capsys)
    assert ("--out" in err) and ("empty" in err if not out.strip() else "afile" in err), err
    assert _snapshot(tmp_path) == before and (tmp_path / "afile").read_text() == "mine"


def test_a_folder_named_like_an_ensemble_file_is_refused_not_deleted(tiny, tmp_path, capsys):
    out = tmp_path / "ens"
    (out / "report.md").mkdir(parents=True)
    (out / "report.md" / "thesis.tex").write_text("years of work")
    assert _blend(tiny, out) == 2
    assert "report.md" in _one_line_error(capsys)
    assert (out / "report.md" / "thesis.tex").read_text() == "years of work"


def test_an_out_starting_with_an_unexpanded_tilde_is_refused(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _blend(tiny, "~/ens") == 2
    assert "'~'" in _one_line_error(capsys) and not (tmp_path / "~").exists()


def test_a_file_saved_into_out_during_the_blend_is_kept_and_the_blend_refused(tiny, previous, monkeypatch, capsys):
    out, before = previous

    def user_saves_a_note(*args, **kwargs):
        (out / "my_notes.txt").write_text("mine")

    original = build.write_report

    def writer(*args, **kwargs):
        result = original(*args, **kwargs)
        user_saves_a_note()
        return result

    monkeypatch.setattr(build, "write_report", writer)
    assert _blend(tiny, out) == 2
    assert "my_notes.txt" in _one_line_error(capsys)
    assert (out / "my_notes.txt").read_text() == "mine"
    assert {k: v for k, v in _snapshot(out).items() if k != "my_notes.txt"} == before and _leftovers(out) == []


def test_a_set_aside_directory_keeps_what_the_blend_did_not_write(tmp_path, capsys):
    from ensemble.output import ENSEMBLE_DIRECTORY

    aside = tmp_path / ".ens.old-0123456789abcdef"
    aside.mkdir()
    for name in FILES:
        (aside / name).write_text("old")
    (aside / "late.txt").write_text("saved during the swap")
    ENSEMBLE_DIRECTORY.remove_old(aside)
    assert sorted(p.name for p in aside.iterdir()) == ["late.txt"]
    assert "kept" in capsys.readouterr().err
    (aside / "late.txt").unlink()
    ENSEMBLE_DIRECTORY.remove_old(aside)
    assert not aside.exists()


@pytest.mark.parametrize("stranger", ["notes.txt", "member.json", "sub/"])
def test_an_out_that_holds_other_files_is_refused_not_replaced(tiny, tmp_path, capsys, stranger):
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "ensemble.json").write_text("{}")
    (out / stranger.rstrip("/")).mkdir() if stranger.endswith("/") else (out / stranger).write_text("keep me")
    before = _snapshot(out) if not stranger.endswith("/") else None
    assert _blend(tiny, out) == 2
    assert stranger.rstrip("/") in _one_line_error(capsys)
    assert (out / stranger.rstrip("/")).exists() and (before is None or _snapshot(out) == before)
    assert _blend(tiny, tiny[0]) == 2 and (tiny[0] / "member.json").exists()  # a run directory as --out
    assert "not an ensemble directory" in _one_line_error(capsys)


@pytest.mark.parametrize("writer", ["write_ensemble_json", "plot_scores", "write_report"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_directory_stays(
        tiny, previous, monkeypatch, capsys, writer):
    out, before = previous
    _fail_after(monkeypatch, writer, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "staged-file"))
    assert _blend(tiny, out, "--method", "weighted") == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "No space left on device" in err, err
    assert _snapshot(out) == before and _leftovers(out) == []


def test_a_full_disk_while_writing_a_file_names_that_file(tiny, previous, monkeypatch, capsys):
    out, before = previous

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    assert _blend(tiny, out) == 2
    err = _one_line_error(capsys)
    assert f"{out / 'submission.csv'}: No space left on device" in err, err
    assert _snapshot(out) == before and _leftovers(out) == []


def test_a_read_only_location_is_one_line_naming_it_and_writes_nothing(tiny, previous, monkeypatch, capsys):
    out, before = previous
    parent = out.parent
    if os.geteuid() == 0:  # root writes through file modes: simulate a read-only mount instead
        def read_only(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr(output.os, "mkdir", read_only)
        reason = "Read-only file system"
    else:
        parent.chmod(0o555)
        reason = "Permission denied"
    try:
        assert _blend(tiny, out, "--method", "weighted") == 2
    finally:
        parent.chmod(0o755)
    err = _one_line_error(capsys)
    assert str(parent) in err and reason in err, err
    monkeypatch.undo()
    assert _snapshot(out) == before and _leftovers(out) == []


def test_a_failed_swap_puts_the_previous_directory_back(tiny, previous, monkeypatch, capsys):
    out, before = previous

    def refuse(stage, out_dir):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(out_dir))

    monkeypatch.setattr(files, "move_in", refuse)
    assert _blend(tiny, out, "--method", "weighted") == 2
    assert "Permission denied" in _one_line_error(capsys)
    assert _snapshot(out) == before and _leftovers(out) == []


@pytest.mark.parametrize("option", ["--expect-ids", "runs"])
def test_other_empty_paths_are_refused(tiny, tmp_path, monkeypatch, capsys, option):
    monkeypatch.chdir(tmp_path)
    extra = ["--expect-ids", " "] if option == "--expect-ids" else []
    runs = [*tiny, ""] if option == "runs" else tiny
    assert _blend(runs, tmp_path / "ens", *extra) == 2
    assert "empty" in _one_line_error(capsys) and not (tmp_path / "ens").exists()


def _test_ids(run: Path) -> list[str]:
    with np.load(run / "predictions" / "test.npz") as data:
        return sorted(data["ids"].tolist())


@pytest.mark.parametrize("mangle,message", [
    (lambda ids: ids, None),
    (lambda ids: ["", *ids[1:]], "1 rows have an empty id \\(the first is data row 1\\)"),
    (lambda ids: [ids[1], *ids[1:]], "has duplicate ids, e.g. \\['t000001'\\]"),
])
def test_expected_ids_with_a_byte_order_mark_empty_or_repeated_ids(tiny, tmp_path, capsys, mangle, message):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("\ufeffid,label\n" + "".join(f"{i},0\n" for i in mangle(_test_ids(tiny[0]))))  # as Excel saves
    code = _blend(tiny, tmp_path / "ens", "--expect-ids", str(sample))
    if message is None:
        assert code == 0 and (tmp_path / "ens" / "submission.csv").exists()
        return
    assert code == 2 and re.search(message, _one_line_error(capsys)) and not (tmp_path / "ens").exists()


def test_a_figure_is_closed_even_when_its_file_cannot_be_written(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(output, "write_atomic", full)
    before = len(plt.get_fignums())
    with pytest.raises(OSError):
        output.plot_scores(tmp_path / "scores.png", {"a": {"macro_f1": 0.5, "macro_f1_std": 0.1}},
                           {"macro_f1": 0.6, "macro_f1_std": 0.1})
    assert len(plt.get_fignums()) == before


# --- 3. broken member files ------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


def _corrupt_entry(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ids.npy", b"\x93NUMPY garbage")
        z.writestr("probs.npy", b"\x00" * 10)


BROKEN = [
    ("predictions/test.npz", _truncate, "test.npz is not an .npz \\(corrupt or truncated\\)"),
    ("predictions/test.npz", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)),
     "test.npz is not an .npz \\(corrupt or truncated\\)"),
    ("predictions/val.npz", lambda p: p.write_bytes(b""), "val.npz is not an .npz \\(corrupt or truncated\\)"),
    ("predictions/test.npz", lambda p: p.write_bytes(_npy_bytes()), "test.npz is a .npy array, not an .npz"),
    ("predictions/test.npz", _corrupt_entry, "test.npz holds a corrupt array"),
    ("member.json", lambda p: p.write_text('["member1"]'), "member.json must be a JSON object"),
    ("member.json", lambda p: p.write_text('{"config": [1]}'), "member.json: config must be a JSON object"),
    ("member.json", lambda p: p.write_text('{"config": {"data": 3}}'), "member.json: config.data must be a JSON obj"),
    ("member.json", lambda p: p.write_bytes(b"\xff\xfe{garbage"), "member.json is not valid JSON"),
    ("classes.json", lambda p: p.write_bytes(b"\xff[1]"), "classes.json is not valid JSON"),
    ("member.json", lambda p: p.write_text("[" * 100_000), "member.json is not valid JSON"),
]


@pytest.mark.parametrize("name,break_it,message", BROKEN)
def test_a_broken_member_file_is_one_line_naming_the_file(tiny, tmp_path, capsys, name, break_it, message):
    break_it(tiny[1] / name)
    assert _blend(tiny, tmp_path / "ens") == 2
    err = _one_line_error(capsys)
    assert re.search(message, err), err
    assert str(tiny[1]) in err or "member 'member1'" in err, err
    assert not (tmp_path / "ens").exists()


# --- 4. file modes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_and_the_directory_honour_the_umask(tiny, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert _blend(tiny, tmp_path / "ens") == 0
        files.write_text_atomic(tmp_path / "alone.txt", "x")
    finally:
        os.umask(old)
    for name in FILES:
        assert oct((tmp_path / "ens" / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name
    assert oct((tmp_path / "alone.txt").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct((tmp_path / "ens").stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_a_rerun_keeps_the_directorys_own_mode(tiny, previous):
    out, _ = previous
    out.chmod(0o750)
    assert _blend(tiny, out) == 0
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)

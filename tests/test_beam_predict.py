"""`flower predict --runner beam`: the rows of `flower predict`, in its order, from an Apache Beam pipeline."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from flower.commands.predict import main
from service.scoring import DamagedFile, InputError, Inputs, SplitInput, Summary, collect_inputs, read_file
from testkit.artifacts import CLASSES, image_bytes, make_ensemble

beam = pytest.importorskip("apache_beam", reason="the `beam` extra is not installed")

from apache_beam.io.filesystem import FileMetadata  # noqa: E402
from apache_beam.io.localfilesystem import LocalFileSystem  # noqa: E402

from service.beam import shards  # noqa: E402
from service.beam.inputs import manifest_entries, read_entry, remote_inputs  # noqa: E402
from service.beam.model import local_model, stage_model  # noqa: E402

TWO_PROCESSES = ["--runner", "beam", "--beam-option", "direct_num_workers=2",
                 "--beam-option", "direct_running_mode=multi_processing"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _photos_with_bad_files(folder: Path) -> Path:
    """Good photos (one in a sub-folder, one named so that a walk and a plain sort of the paths differ), a text file
    named .jpg, an empty file, a truncated JPEG, a file ignored."""
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(image_bytes(seed=i))
    (folder / "sub" / "q.png").write_bytes(image_bytes("PNG", seed=7))
    (folder / "sub-a.jpg").write_bytes(image_bytes(seed=8))  # after sub/q.png: '-' sorts before '/'
    (folder / "text.jpg").write_text("not an image, whatever its name")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(image_bytes(size=(200, 200), seed=2)[:300])
    (folder / "notes.txt").write_text("not named like a photo")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """The two-member test ensemble (32 and 48 px), and a folder of photos with bad files."""
    root = tmp_path_factory.mktemp("beam")
    return make_ensemble(root), _photos_with_bad_files(root / "photos")


def _predict(args: list[str]) -> tuple[int, str]:
    """`flower predict ARGS` in this process: its exit status and what it said on stderr."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        status = main(args)
    return status, said.getvalue()


def test_beam_writes_the_rows_of_flower_predict_in_its_order_and_counts_them(models, tiny_data, tmp_path):
    ensemble, photos = models
    inputs = [str(ensemble), f"{tiny_data}:test", str(photos), "--probabilities"]
    local_status, _ = _predict([*inputs, "--out", str(tmp_path / "local.csv"), "--quiet"])
    status, said = _predict([*inputs, "--out", str(tmp_path / "beam.csv"), *TWO_PROCESSES, "--batch-size", "4",
                             "--min-batch-size", "2"])
    local, rows = _rows(tmp_path / "local.csv"), _rows(tmp_path / "beam.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in local]  # flower predict's order, after the merge
    assert len(rows) == 18 + 10 and rows[0]["path"].startswith(f"{tiny_data}:test#")
    for ours, theirs in zip(rows, local, strict=True):
        assert (ours["ok"], ours["error"]) == (theirs["ok"], theirs["error"])
        assert [ours[f"top{n}"] for n in range(1, 5)] == [theirs[f"top{n}"] for n in range(1, 5)]
        if ours["ok"] == "true":
            np.testing.assert_allclose([float(ours[c]) for c in CLASSES], [float(theirs[c]) for c in CLASSES],
                                       atol=1e-5)
    kinds = sorted(r["error"].partition(":")[0] for r in rows if r["ok"] == "false")
    assert kinds == ["corrupt", "empty", "not_an_image"]  # bad files are rows, never a failed pipeline
    assert status == local_status == 1  # some rows failed, as flower predict says it
    assert ("beam (DirectRunner, 2 worker processes): 25 images scored, 3 failed (corrupt 1, empty 1, "
            "not_an_image 1), by the pipeline's metrics") in said
    assert "wrote " in said and "28 row(s), 25 scored, 3 failed" in said
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the work folder is gone


def test_without_beam_the_runner_is_one_error_line_naming_the_extra(models, tmp_path, monkeypatch):
    ensemble, photos = models
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # what an install without the extra has
    for name in [n for n in sys.modules if n.startswith("service.beam.")]:
        monkeypatch.delitem(sys.modules, name)
    status, said = _predict([str(ensemble), str(photos), "--out", str(tmp_path / "out.csv"), "--runner", "beam"])
    assert status == 2 and said.count("\n") == 1
    assert said.startswith("error: --runner beam needs Apache Beam") and "flower-ensemble[beam]" in said
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--beam-option", "foo_bar=1"], "foo_bar is no Beam pipeline option"),
    (["--beam-option", "direct_num_workers=many"], "invalid int value: 'many'"),
    (["--beam-option", "=1"], "expected KEY=VALUE"),
    (["--beam-option", "runner=DataflowRunner"], "needs --beam-option temp_location=URL"),
    (["--min-batch-size", "40"], "--min-batch-size must be 1 to --batch-size (32), got 40"),
])
def test_a_bad_beam_option_is_one_error_line_before_anything_runs(models, tmp_path, options, message):
    ensemble, photos = models
    status, said = _predict([str(ensemble), str(photos), "--out", str(tmp_path / "out.csv"), "--runner", "beam",
                             *options])
    assert status == 2 and said.count("\n") == 1 and said.startswith("error: ") and message in said, said
    assert list(tmp_path.iterdir()) == []


def test_the_local_runner_refuses_the_beam_options(models, tmp_path):
    ensemble, photos = models
    status, said = _predict([str(ensemble), str(photos), "--out", str(tmp_path / "out.csv"),
                             "--beam-option", "direct_num_workers=2"])
    assert status == 2 and "options of --runner beam" in said


# --- the merge -------------------------------------------------------------------------------------------


def _shard(path: Path, keys: list[tuple[int, int]], damaged: tuple[int, int] | None = None) -> None:
    lines = []
    for key in keys:
        if key == damaged:
            facts = {"file": "f.tfrec", "index": 3, "lost": 2, "reason": "the file ends early"}
            row = [f"d:test#f.tfrec@{key[1]}", "false", "corrupt_record: f.tfrec: records 3 to 4 (2 records) ...", "",
                   ""]
            lines.append(shards.shard_line(key, row, facts))
        else:
            lines.append(shards.shard_line(key, [f"img {key}", "true", "", "a, \"b\"\nc", "0.5"], None))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_the_merge_puts_every_shard_row_in_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_OPEN", 2)  # five shards: merged in two rounds
    keys = [(i, r) for i in range(12) for r in range(3 if i == 4 else 1)]
    order = np.random.default_rng(0).permutation(len(keys))
    for n in range(5):
        _shard(tmp_path / f"rows-{n}.csv", [keys[i] for i in order[n::5]], damaged=(4, 2))
    summary = Summary()
    out = tmp_path / "out.csv"
    assert shards.merge_shards(str(tmp_path / "rows-*.csv"), out, ["path", "ok", "error", "top1", "p"], False,
                               summary) == 5
    rows = _rows(out)
    assert [r["path"] for r in rows[:6]] == ["img (0, 0)", "img (1, 0)", "img (2, 0)", "img (3, 0)", "img (4, 0)",
                                             "img (4, 1)"]
    assert len(rows) == len(keys) and rows[6]["path"] == "d:test#f.tfrec@2" and rows[7]["path"] == "img (5, 0)"
    assert rows[0]["top1"] == "a, \"b\"\nc"  # quotes and a line break inside a value survive the shards
    assert summary.rows == len(keys) and summary.failed == {"corrupt_record": 1}
    assert summary.damaged == [DamagedFile("corrupt_record", "f.tfrec: records 3 to 4 (2 records) ...", "f.tfrec", 3,
                                           2, "the file ends early")]
    _shard(tmp_path / "rows-5.csv", [(7, 0)])
    with pytest.raises(RuntimeError, match=r"row \(7, 0\) twice"):
        shards.merge_shards(str(tmp_path / "rows-*.csv"), tmp_path / "again.csv", ["path"], False, Summary())
    assert not (tmp_path / "again.csv").exists()


# --- remote paths (a local folder seen as a bucket) ----------------------------------------------------------


class BucketFileSystem(LocalFileSystem):
    """`testbucket://...`: the files under ROOT as a bucket holds objects (no folders), as gs:// does."""

    ROOT = ""

    @classmethod
    def scheme(cls) -> str:
        return "testbucket"

    def has_dirs(self) -> bool:
        return False

    def _local(self, url: str) -> str:
        return os.path.join(self.ROOT, url.removeprefix("testbucket://"))

    def _list(self, prefix: str):
        for folder, _, files in os.walk(self.ROOT):
            for name in files:
                url = "testbucket://" + os.path.relpath(os.path.join(folder, name), self.ROOT)
                if url.startswith(prefix):
                    yield FileMetadata(url, os.path.getsize(self._local(url)))

    def exists(self, url: str) -> bool:
        return os.path.isfile(self._local(url))

    def metadata(self, url: str) -> FileMetadata:
        return FileMetadata(url, os.path.getsize(self._local(url)))

    def open(self, url: str, *args, **kwargs):
        return super().open(self._local(url), *args, **kwargs)

    def create(self, url: str, *args, **kwargs):
        return super().create(self._local(url), *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Path:
    """A folder seen as the bucket testbucket://."""
    monkeypatch.setattr(BucketFileSystem, "ROOT", str(tmp_path))
    return tmp_path


def test_a_remote_folder_glob_and_split_are_listed_as_local_ones_are(bucket, tiny_data):
    import shutil

    photos = _photos_with_bad_files(bucket / "photos")
    (photos / ".hidden").mkdir()
    (photos / ".hidden" / "x.jpg").write_bytes(image_bytes())
    shutil.copytree(tiny_data, bucket / "data")
    local = collect_inputs([str(photos), str(photos / "p*.jpg"), f"{bucket / 'data'}:test"])
    remote = Inputs()
    for spec in ("testbucket://photos", "testbucket://photos/p*.jpg", "testbucket://data:test"):
        remote_inputs(spec, remote)
    paths = [s.shown.replace("testbucket://", f"{bucket}/") for s in remote.sources if not isinstance(s, SplitInput)]
    assert paths == [s.shown for s in local.sources if not isinstance(s, SplitInput)]
    assert remote.ignored == local.ignored == 2  # notes.txt and the hidden folder
    split = remote.sources[-1]
    assert {size: [u.replace("testbucket://", f"{bucket}/") for u in urls] for size, urls in split.files.items()} \
        == local.sources[-1].files
    entries = manifest_entries(remote, 48)
    (key, (shown, data, damage)), = read_entry(json.dumps(entries[0]), 1 << 20)
    assert key == (0, 0) and data == read_file(local.sources[0], 1 << 20) and damage is None
    with pytest.raises(InputError, match="testbucket://nowhere not found"):
        remote_inputs("testbucket://nowhere", Inputs())
    with pytest.raises(InputError, match="nosuchfs://x: Unable to get filesystem"):  # no file system serves it
        remote_inputs("nosuchfs://x", Inputs())


def test_a_model_staged_in_a_bucket_is_copied_whole_to_a_worker(bucket, models):
    from core.members import read_ensemble

    ensemble, _ = models
    staged = local_model(stage_model(str(ensemble), "testbucket://work/model"))
    copy = read_ensemble(staged)
    assert [e.path for e in copy.members] == ["members/0", "members/1"]
    original = read_ensemble(ensemble)
    for entry, source in zip(copy.members, original.members, strict=True):
        source_dir, target_dir = source.run_dir(original.path), entry.run_dir(copy.path)
        files = sorted(p.relative_to(target_dir) for p in target_dir.rglob("*") if p.is_file())
        assert {"member.json", "classes.json", "saved_model/saved_model.pb"} <= {f.as_posix() for f in files}
        assert any(f.parts[:2] == ("saved_model", "variables") for f in files)
        assert all((target_dir / f).read_bytes() == (source_dir / f).read_bytes() for f in files)
        assert len(files) == len([p for p in (source_dir / "saved_model").rglob("*") if p.is_file()]) + 2

"""Near duplicates: the perceptual hash, the banded search, duplicate groups in the import's split, and
`flower overlap` between folders and data splits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import flower.commands.overlap as overlap_command
from core.errors import DataError
from core.photos import load_rgb
from flower.commands.import_photos import main as import_main
from flower.commands.overlap import main as overlap_main
from tests.conftest import REPO
from tests.support import peak_memory
from training.data.importer.folders import import_folders
from training.data.importer.split import stratified_split
from training.data.near_duplicates import (
    _BYTE_BITS,
    DEFAULT_DISTANCE,
    bands,
    centre_square,
    close_pairs,
    find_duplicates,
    parse_distance,
    perceptual_hash,
    popcount,
    read_split,
)


def _photo(seed: int, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """A textured photo-like image: smooth random colour fields with some finer detail."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return Image.blend(coarse, fine, 0.3)


def _bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    """Cut `fraction` of the width and height off each side."""
    w, h = image.size
    dx, dy = round(w * fraction), round(h * fraction)
    return image.crop((dx, dy, w - dx, h - dy))


def _distance(a: Image.Image, b: Image.Image) -> int:
    return bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1")


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- the hash ----------------------------------------------------------------------------------------------

def test_the_hash_matches_resized_recompressed_and_slightly_cropped_copies():
    for seed in range(5):
        photo = _photo(seed)
        assert _distance(photo, load_rgb(_bytes(photo))) == 0
        assert _distance(photo, photo.resize((100, 75), Image.Resampling.LANCZOS)) <= DEFAULT_DISTANCE  # smaller
        assert _distance(photo, photo.resize((400, 300), Image.Resampling.BICUBIC)) <= DEFAULT_DISTANCE  # larger
        assert _distance(photo, load_rgb(_bytes(photo, "JPEG", quality=40))) <= DEFAULT_DISTANCE  # re-compressed
        assert _distance(photo, photo.convert("L").convert("RGB")) <= DEFAULT_DISTANCE  # greyscale
        assert _distance(photo, _crop(photo, 0.01)) <= DEFAULT_DISTANCE  # a 2-pixel border cropped off
        # Known limits (docs/DATA.md): a 5% crop on every side, or a mirror image, is another photo to this hash.
        assert _distance(photo, _crop(photo, 0.05)) > DEFAULT_DISTANCE
        assert _distance(photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) > DEFAULT_DISTANCE


def test_the_hash_sees_the_photo_as_displayed_after_its_exif_orientation():
    photo = _photo(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    stored_sideways = photo.transpose(Image.Transpose.ROTATE_90)  # undone by the orientation tag on display
    tagged = load_rgb(_bytes(stored_sideways, "JPEG", quality=95, exif=exif))
    assert tagged.size == photo.size
    assert _distance(photo, tagged) <= DEFAULT_DISTANCE
    assert _distance(photo, stored_sideways) > DEFAULT_DISTANCE


def test_fifty_distinct_photos_never_pair_up_at_the_default_threshold():
    hashes = [perceptual_hash(_photo(seed)) for seed in range(100, 150)]
    assert len(close_pairs(hashes, None, DEFAULT_DISTANCE)[0]) == 0
    h = np.array(hashes, np.uint64)
    distances = popcount(h[:, None] ^ h[None, :])[np.triu_indices(50, 1)]
    assert distances.min() > DEFAULT_DISTANCE + 4  # with room to spare
    assert all(bin(x).count("1") == 32 for x in hashes)  # median threshold: half the bits set


# --- the search and the groups --------------------------------------------------------------------------

def _brute_force(left: np.ndarray, right: np.ndarray | None, t: int) -> set[tuple[int, int, int]]:
    other = left if right is None else right
    d = np.array([[bin(int(a) ^ int(b)).count("1") for b in other] for a in left])
    return {(i, j, int(d[i, j])) for i, j in zip(*np.nonzero(d <= t), strict=True) if right is not None or i < j}


def _hashes_with_planted_pairs(rng: np.random.Generator, n: int, planted: int, most_bits: int) -> np.ndarray:
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    for _ in range(planted):  # copy a hash onto another slot and flip up to most_bits of its bits
        source, target = rng.choice(n, 2, replace=False)
        flips = rng.choice(64, int(rng.integers(0, most_bits + 1)), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    return hashes


@pytest.mark.parametrize("t", [0, 1, 4, 6, 10])
def test_the_banded_search_finds_exactly_the_pairs_of_a_brute_force_search(t):
    rng = np.random.default_rng(t)
    hashes = _hashes_with_planted_pairs(rng, 300, 80, t + 3)
    i, j, d = close_pairs(hashes, None, t)
    found = set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    assert len(found) == len(i)  # no pair twice, though it may agree on several bands
    assert found == _brute_force(hashes, None, t)
    assert len(found) > 5 and (t == 0 or any(0 < dist <= t for _, _, dist in found))  # planted pairs found
    other = np.concatenate([hashes[:40] ^ np.uint64(1 << 7), rng.integers(0, 2**63, 60, dtype=np.uint64)])
    cross = close_pairs(hashes, other, t)
    assert set(zip(*(c.tolist() for c in cross), strict=True)) == _brute_force(hashes, other, t)
    assert len(bands(t)) == t + 1 and sum(width for _, width in bands(t)) == 64


def test_the_byte_table_popcount_agrees_with_numpy():
    values = np.random.default_rng(0).integers(0, 2**64 - 1, 1000, dtype=np.uint64, endpoint=True)
    by_table = _BYTE_BITS[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)
    np.testing.assert_array_equal(popcount(values), by_table)
    assert popcount(np.array([0, 2**64 - 1, 5], np.uint64)).tolist() == [0, 64, 2]


def test_duplicates_are_grouped_through_chains_and_by_same_bytes():
    base = 0x0F0F_0F0F_0F0F_0F0F
    hashes = [base, 0x1234_5678_9ABC_DEF0, base ^ 0b1111, 0xFFFF_0000_FFFF_0000, base ^ 0b1111_1111, 0x00FF_00FF_00FF]
    digests = ["a", "b", "c", "d", "e", "b"]  # 1 and 5 are the same bytes, however far apart their hashes
    found = find_duplicates(hashes, digests, 4)
    assert found.groups == [[0, 2, 4], [1, 5]]  # 0 and 4 are 8 bits apart, linked through 2
    assert found.exact == [False, True] and found.distance == [4, 0]
    assert found.group_of.tolist() == [0, 1, 0, 2, 0, 1] or len(set(found.group_of.tolist())) == 3
    off = find_duplicates(hashes, digests, None)
    assert off.groups == [[1, 5]] and off.exact == [True] and off.distance == [0]
    assert off.group_of[1] == off.group_of[5] and len(set(off.group_of.tolist())) == 5
    assert find_duplicates([], [], 6).groups == []


def test_the_distance_option_takes_a_number_or_off():
    assert parse_distance("6") == 6 and parse_distance("0") == 0 and parse_distance("16") == 16
    assert parse_distance("off") is None and parse_distance("-1") is None and parse_distance("OFF") is None
    for bad in ("33", "-2", "six", "1.5"):
        with pytest.raises(ValueError, match="--near-duplicate-distance must be a whole number from 0 to 16"):
            parse_distance(bad)


# --- the split --------------------------------------------------------------------------------------------

def test_the_split_keeps_each_group_whole_and_the_counts_at_their_targets():
    labels = [0] * 40 + [1] * 30
    groups = list(range(70))
    for members in ([0, 1], [2, 3, 4], [5, 39], [40, 41], [42, 43, 44, 45]):
        for i in members:
            groups[i] = members[0]
    groups[6] = groups[46] = 6  # a group spanning both classes: a label conflict
    split = stratified_split(labels, 0.2, 0.2, seed=3, groups=groups)
    where = {i: name for name, members in split.items() for i in members}
    assert sorted(where) == list(range(70))
    for group in set(groups):
        assert len({where[i] for i, g in enumerate(groups) if g == group}) == 1
    assert where[6] == where[46] == "train"
    for label, total in ((0, 40), (1, 30)):
        for name, fraction in (("val", 0.2), ("test", 0.2)):
            assert sum(labels[i] == label for i in split[name]) == round(total * fraction)  # singletons fill up
    assert split == stratified_split(labels, 0.2, 0.2, seed=3, groups=groups)
    assert stratified_split(labels, 0.2, 0.2, 3, groups=list(range(70))) == stratified_split(labels, 0.2, 0.2, 3)


def test_a_split_of_only_groups_comes_as_close_as_the_groups_allow():
    labels = [0] * 10
    groups = [k // 2 for k in range(10)]  # five pairs; targets 3 test, 3 val
    split = stratified_split(labels, 0.3, 0.3, seed=0, groups=groups)
    assert [len(split[s]) for s in ("train", "val", "test")] in ([6, 2, 2], [2, 4, 4], [4, 2, 4], [4, 4, 2])
    one_group = stratified_split([0] * 4 + [1] * 3, 0.3, 0.3, seed=0, groups=[0, 0, 0, 0, 1, 2, 3])
    assert sorted(one_group["train"])[:4] == [0, 1, 2, 3]  # a class's only group keeps its training images
    with pytest.raises(ValueError, match="one group per item"):
        stratified_split([0, 0, 1], 0.3, 0.3, 0, groups=[0, 1])


# --- the import --------------------------------------------------------------------------------------------

def _photo_tree(src, planted: bool = True) -> dict[str, str]:
    """Two classes of eight distinct photos; with copies planted: a copy name -> the original it copies."""
    for c, name in enumerate(("a", "b")):
        for k in range(8):
            _write(src / name / f"{name}{k}.png", _bytes(_photo(1000 + 10 * c + k)))
    if not planted:
        return {}
    a = [_photo(1000 + k) for k in range(5)]
    copies = {"a/copy_of_a0.png": (src / "a" / "a0.png").read_bytes(),  # the same bytes
              "a/small_a1.jpg": _bytes(a[1].resize((100, 75), Image.Resampling.LANCZOS), "JPEG"),
              "a/q40_a2.jpg": _bytes(a[2], "JPEG", quality=40),
              "a/large_a3.png": _bytes(a[3].resize((400, 300), Image.Resampling.BICUBIC)),
              "b/mislabelled_a4.png": (src / "a" / "a4.png").read_bytes()}  # a label conflict
    for path, data in copies.items():
        _write(src / path, data)
    return {"a/copy_of_a0.png": "a/a0.png", "a/small_a1.jpg": "a/a1.png", "a/q40_a2.jpg": "a/a2.png",
            "a/large_a3.png": "a/a3.png", "b/mislabelled_a4.png": "a/a4.png"}


def test_the_import_keeps_each_duplicate_group_in_one_split_and_reports_it(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    planted = _photo_tree(src)
    argv = [str(src), str(out), "--sizes", "16", "--val", "0.25", "--test", "0.25", "--seed", "1"]
    assert import_main(argv) == 0
    printed = capsys.readouterr().out
    assert "duplicates: 5 group(s) of 10 files (2 exact, 3 near; same bytes or hash distance <= 6)" in printed
    assert "WARNING: label conflict: a/a4.png, b/mislabelled_a4.png are byte-identical copies" in printed
    report = json.loads((out / "import_report.json").read_text())
    groups = {tuple(sorted(g["files"])): g for g in report["duplicate_groups"]}
    assert set(groups) == {tuple(sorted(pair)) for pair in planted.items()}
    assert report["duplicates"] == {"groups": 5, "files_in_groups": 10, "exact_groups": 2, "near_groups": 3,
                                    "label_conflicts": 1}
    assert report["near_duplicate_distance"] == 6 and len(report["warnings"]) == 2
    assert report["warnings"][1].startswith("class 'a': val has 2 of its target 3 photo(s): duplicate groups stay "
                                            "whole and did not fit (9 of its 12 photos are in groups, 1 of them in "
                                            "label conflicts")  # 4 pairs and a4, whose copy sits in b
    conflict = groups[("a/a4.png", "b/mislabelled_a4.png")]
    assert conflict["label_conflict"] and conflict["classes"] == ["a", "b"] and conflict["split"] == "train"
    assert groups[("a/a0.png", "a/copy_of_a0.png")]["kind"] == "exact"
    assert groups[("a/a1.png", "a/small_a1.jpg")]["kind"] == "near"
    # The records agree with the report: every file of a group is in the group's split.
    ids = {split: set(read_split("x", str(out), split, progress=False).names) for split in ("train", "val", "test")}
    for group in report["duplicate_groups"]:
        for path in group["files"]:
            assert hashlib.sha1(path.encode()).hexdigest()[:9] in ids[group["split"]]
    for split, target in (("val", {"a": 3, "b": 2}), ("test", {"a": 3, "b": 2})):  # 25% of 12 and of 9
        assert all(abs(report["counts"][split][c] - n) <= 1 for c, n in target.items()), report["counts"]


def test_an_import_without_the_near_duplicate_search_still_groups_exact_copies(tmp_path):
    src = tmp_path / "src"
    _photo_tree(src)
    report = import_folders(src, tmp_path / "out", sizes=[16], val_fraction=0.25, test_fraction=0.25,
                            progress=False, near_duplicate_distance=None)
    assert sorted(sorted(g["files"]) for g in report.duplicate_groups) == [
        ["a/a0.png", "a/copy_of_a0.png"], ["a/a4.png", "b/mislabelled_a4.png"]]
    assert report.near_duplicate_distance is None
    with pytest.raises(ValueError, match="near_duplicate_distance must be a whole number from 0 to 16"):
        import_folders(src, tmp_path / "out2", sizes=[16], progress=False, near_duplicate_distance=40)
    assert not (tmp_path / "out2").exists()


def test_an_import_without_duplicates_reports_none(tmp_path, capsys):
    src = tmp_path / "src"
    _photo_tree(src, planted=False)
    report = import_folders(src, tmp_path / "out", sizes=[16], val_fraction=0.25, test_fraction=0.25, progress=False)
    assert report.duplicate_groups == [] and report.warnings == [] and report.duplicates["groups"] == 0
    assert [sum(report.counts[s].values()) for s in ("train", "val", "test")] == [8, 4, 4]
    assert import_main([str(src), str(tmp_path / "o"), "--sizes", "16", "--near-duplicate-distance", "99"]) == 2
    assert "--near-duplicate-distance must be a whole number from 0 to 16" in capsys.readouterr().err


# --- flower overlap ----------------------------------------------------------------------------------------

def _two_folders(tmp_path):
    """A: six distinct photos. B: an exact copy, a smaller copy and a re-compressed copy of three of them,
    three other photos and a text file."""
    a, b = tmp_path / "A", tmp_path / "B"
    photos = [_photo(2000 + k) for k in range(6)]
    for k, photo in enumerate(photos):
        _write(a / "sub" / f"p{k}.png", _bytes(photo))
    _write(b / "same.png", (a / "sub" / "p0.png").read_bytes())
    _write(b / "small.jpg", _bytes(photos[1].resize((90, 68), Image.Resampling.LANCZOS), "JPEG"))
    _write(b / "deep" / "q40.jpg", _bytes(photos[2], "JPEG", quality=40))
    for k in range(3):
        _write(b / f"other{k}.png", _bytes(_photo(3000 + k)))
    (b / "notes.txt").write_text("not an image")
    return a, b


def test_overlap_lists_the_planted_pairs_between_two_folders(tmp_path, capsys):
    a, b = _two_folders(tmp_path)
    out = tmp_path / "pairs.json"
    assert overlap_main([str(a), str(b), "--json", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert set(pairs) == {("sub/p0.png", "same.png"), ("sub/p1.png", "small.jpg"), ("sub/p2.png", "deep/q40.jpg")}
    assert pairs[("sub/p0.png", "same.png")]["kind"] == "exact" and pairs[("sub/p0.png", "same.png")]["distance"] == 0
    assert all(pairs[k]["kind"] == "near" and pairs[k]["distance"] <= 6 for k in list(pairs)[1:])
    assert report["counts"] == {"pairs": 3, "exact": 1, "near": 2, "photos_of_a": 3, "photos_of_b": 3,
                                "group_pairs": 3, "files_in_both": 0}
    assert report["b"]["not_photos"] == ["notes.txt"] and report["b"]["skipped"] == [] and report["b"]["images"] == 6
    assert "OVERLAP: 3 cross pair(s) (1 exact, 2 near" in printed and "sub/p1.png  small.jpg" in printed
    # Exact copies only: the exact pair alone.
    assert overlap_main([str(a), str(b), "--near-duplicate-distance", "off", "--quiet"]) == 1
    assert "OVERLAP: 1 cross pair(s) (1 exact, 0 near" in capsys.readouterr().out
    # No overlap: exit 0.
    shutil.rmtree(b)
    for k in range(3):
        _write(b / f"other{k}.png", _bytes(_photo(3000 + k)))
    assert overlap_main([str(a), str(b), "--quiet"]) == 0
    assert "no overlap" in capsys.readouterr().out


def test_overlap_finds_a_folders_photos_in_a_data_split(tmp_path, capsys):
    src, data, again = tmp_path / "src", tmp_path / "data", tmp_path / "again"
    _photo_tree(src, planted=False)
    import_folders(src, data, sizes=[24, 48], val_fraction=0.25, test_fraction=0.25, progress=False)  # --fit crop
    for path in src.rglob("*.png"):  # every source photo again, re-encoded as JPEG at another size
        image = load_rgb(path.read_bytes()).resize((160, 120), Image.Resampling.LANCZOS)
        _write(again / path.relative_to(src).with_suffix(".jpg"), _bytes(image, "JPEG", quality=85))
    out = tmp_path / "pairs.json"
    assert overlap_main([str(again), f"{data}:test", "--json", str(out), "--quiet"]) == 1
    report = json.loads(out.read_text())
    test_ids = {line.split(",")[0] for line in (data / "test_answers.csv").read_text().splitlines()[1:]}
    assert report["b"]["spec"] == f"{data}:test (48x48)" and report["b"]["images"] == len(test_ids) == 4
    assert {p["b"] for p in report["pairs"]} == test_ids and len(report["pairs"]) == 4  # one photo each, no others
    for pair in report["pairs"]:
        assert pair["kind"] == "near" and hashlib.sha1(pair["a"].replace(".jpg", ".png").encode()).hexdigest()[:9] \
            == pair["b"]
    assert "OVERLAP: 4 cross pair(s)" in capsys.readouterr().out
    # Two splits of one import never overlap.
    assert overlap_main([f"{data}:train", f"{data}:test", "--quiet"]) == 0


def test_overlap_refuses_bad_arguments_with_exit_status_2(tmp_path, capsys):
    a, _ = _two_folders(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "x.txt").write_text("no image")
    (tmp_path / "data").mkdir()
    cases = [([str(tmp_path / "missing"), str(a)], "folder not found"),
             ([str(a), f"{tmp_path}:tset"], "unknown split 'tset'"),
             ([str(a), str(tmp_path / "empty")], "no images in"),
             ([str(tmp_path / "texts"), str(a)],
              "no images in " + str(tmp_path / "texts") + " (1 file(s) not named like photos)"),
             ([str(a), f"{tmp_path / 'data'}:val"], "no 'tfrecords-jpeg-<S>x<S>' folder"),
             ([str(a), str(a), "--near-duplicate-distance", "x"], "must be a whole number from 0 to 16")]
    for argv, message in cases:
        assert overlap_main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {message}" in err or message in err, (argv, err)
        assert "Traceback" not in err


def test_overlap_between_folders_never_loads_tensorflow(tmp_path):
    a, b = _two_folders(tmp_path)
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
            f"from flower.cli import main\nsys.exit(main(['overlap', {str(a)!r}, {str(b)!r}, '--quiet']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "OVERLAP: 3 cross pair(s)" in result.stdout


# --- the fixes of the hostile-user sweep ------------------------------------------------------------------

def _smooth_images(size: tuple[int, int] = (120, 90)) -> list[Image.Image]:
    """Flat colours and clean (noise-free) gradients: pictures whose hash has only a few bits set."""
    flats = [Image.new("RGB", size, colour) for colour in ((0, 0, 0), (255, 255, 255), (200, 30, 30), (20, 120, 40))]
    down = np.linspace(40, 220, size[1])[:, None] * np.ones((1, size[0]))
    across = np.linspace(230, 60, size[0])[None, :] * np.ones((size[1], 1))
    ramps = [Image.fromarray(np.stack([ramp * f for f in tint], -1).astype(np.uint8))
             for ramp, tint in ((down, (0.5, 0.7, 1.0)), (across, (1.0, 0.6, 0.4)), (down * 0.5, (1.0, 1.0, 1.0)))]
    return flats + ramps


def _bursts(folder, seeds, shots: int = 5) -> None:
    """One burst per seed: near-identical shots of one photo (smaller, more compressed)."""
    for seed in seeds:
        photo = _photo(seed)
        for k in range(shots):
            shot = photo.resize((200 - 12 * k, 150 - 9 * k), Image.Resampling.LANCZOS)
            _write(folder / f"burst{seed}_{k}.jpg", _bytes(shot, "JPEG", quality=95 - 10 * k))


def test_the_import_groups_photos_by_the_square_it_stores(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for c, name in enumerate(("a", "b")):
        for k in range(8):
            _write(src / name / f"{name}{k}.png", _bytes(_photo(4000 + 10 * c + k)))
    wide = _photo(4100, (300, 200))  # a 3:2 photo and its square crop: the same square is stored
    _write(src / "a" / "wide.png", _bytes(wide))
    _write(src / "a" / "wide_square_crop.png", _bytes(centre_square(wide)))
    middle, panoramas = _photo(4101, (100, 100)), []
    for side in range(2):  # two wide shots with other sides and the same middle
        panoramas.append(_photo(4110 + side, (300, 100)))
        panoramas[-1].paste(middle, (100, 0))
        _write(src / "b" / f"pano{side}.png", _bytes(panoramas[-1]))
    assert _distance(wide, centre_square(wide)) > DEFAULT_DISTANCE  # the whole photos differ
    assert _distance(*panoramas) > DEFAULT_DISTANCE
    assert import_main([str(src), str(out), "--sizes", "32", "--val", "0.25", "--test", "0.25"]) == 0
    groups = [sorted(g["files"]) for g in json.loads((out / "import_report.json").read_text())["duplicate_groups"]]
    assert sorted(groups) == [["a/wide.png", "a/wide_square_crop.png"], ["b/pano0.png", "b/pano1.png"]]
    capsys.readouterr()
    for other in ("val", "test"):  # the import's own output has no pair across its splits
        assert overlap_main([f"{out}:train", f"{out}:{other}", "--quiet"]) == 0, capsys.readouterr().out


def test_flat_and_smooth_images_are_grouped_by_their_bytes_only(tmp_path, capsys):
    smooth = _smooth_images()
    src, out = tmp_path / "src", tmp_path / "out"  # in an import: no cross-class group, val and test kept
    _photo_tree(src, planted=False)
    for k, image in enumerate(smooth):
        _write(src / ("a", "b")[k % 2] / f"smooth{k}.png", _bytes(image))
    assert import_main([str(src), str(out), "--sizes", "16", "--val", "0.25", "--test", "0.25"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "import_report.json").read_text())
    assert report["duplicate_groups"] == [] and report["warnings"] == []
    assert sorted(report["exact_only"]) == sorted(f"{'ab'[k % 2]}/smooth{k}.png" for k in range(len(smooth)))
    assert f"{len(smooth)} photo(s) too flat or smooth for the perceptual hash" in printed
    for split in ("val", "test"):
        assert report["counts"][split] == report["targets"][split] == {"a": 3, "b": 3}
    from training.data.near_duplicates import MIN_BITS, informative

    hashes = [perceptual_hash(image) for image in smooth]
    assert perceptual_hash(smooth[0]) == 0 and perceptual_hash(smooth[1]) == 1 << 63
    assert max(bin(h).count("1") for h in hashes) < MIN_BITS  # a few bits: they all look alike
    assert not informative(hashes).any() and informative([perceptual_hash(_photo(k)) for k in range(5)]).all()
    found = find_duplicates([*hashes, hashes[0]], [f"d{k}" for k in range(len(hashes))] + ["d0"], DEFAULT_DISTANCE)
    assert found.groups == [[0, len(hashes)]] and found.exact == [True]  # the byte copy only
    assert found.exact_only == list(range(len(hashes) + 1))


def test_the_real_photos_all_have_hashes_with_32_bits_set(real_photos):
    from training.data.near_duplicates import informative

    files = sorted(real_photos.rglob("*.jpg"))[::10]
    hashes = [perceptual_hash(load_rgb(path)) for path in files]
    assert len(hashes) > 300 and {bin(h).count("1") for h in hashes} == {32} and informative(hashes).all()


def test_overlap_matches_flat_and_smooth_images_by_their_bytes_only(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    smooth = _smooth_images()
    for k, image in enumerate(smooth):
        _write((a if k < 3 else b) / f"s{k}.png", _bytes(image))
    _write(b / "copy.png", (a / "s0.png").read_bytes())
    out = tmp_path / "pairs.json"
    assert overlap_main([str(a), str(b), "--json", str(out), "--quiet"]) == 1
    report = json.loads(out.read_text())
    assert [(p["a"], p["b"], p["kind"]) for p in report["pairs"]] == [("s0.png", "copy.png", "exact")]
    assert len(report["a"]["exact_only"]) == 3 and len(report["b"]["exact_only"]) == len(smooth) - 3 + 1
    assert "too flat or smooth for the perceptual hash (matched by their bytes only)" in capsys.readouterr().out


def test_an_import_that_would_leave_val_or_test_empty_is_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _bursts(src / "a", (5000, 5001, 5002))  # every photo in a group of 5, more than a class's val or test (2)
    _bursts(src / "b", (5010, 5011, 5012))
    assert import_main([str(src), str(out), "--sizes", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the import would leave val and test empty: ") and "duplicate groups" in err
    assert "nothing was written" in err and "Traceback" not in err
    with pytest.raises(DataError, match="would leave val and test empty"):
        import_folders(src, out, sizes=[16], progress=False)
    assert not out.exists()
    conflicts = tmp_path / "conflicts"  # emptied by label conflicts alone: refused too (fix the labels)
    for name in ("a", "b"):
        for k in range(4):
            _write(conflicts / name / f"{k}.png", _bytes(_photo(5300 + k)))
    with pytest.raises(DataError, match="would leave val and test empty: every photo that could go there is in a "
                                        "label conflict"):
        import_folders(conflicts, out, sizes=[16], progress=False)
    assert not out.exists()


def test_a_class_short_of_its_val_or_test_target_is_warned_about(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for k in range(8):
        _write(src / "a" / f"a{k}.png", _bytes(_photo(5100 + k)))
    _bursts(src / "b", (5200, 5201), shots=4)  # two groups of 4: neither fits b's val or test target of 1
    assert import_main([str(src), str(out), "--sizes", "16"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "import_report.json").read_text())
    assert report["targets"] == {"val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    assert report["counts"]["val"] == report["counts"]["test"] == {"a": 1, "b": 0}
    warning = ("class 'b': val has 0 of its target 1 and test has 0 of its target 1 photo(s): duplicate groups "
               "stay whole and did not fit (8 of its 8 photos are in groups, 0 of them in label conflicts")
    assert [w[:len(warning)] for w in report["warnings"]] == [warning] and f"WARNING: {warning}" in printed


def test_overlap_checks_its_json_file_before_the_work_and_writes_it_atomically(tmp_path, capsys, monkeypatch):
    import training.data.near_duplicates as near

    a, b = _two_folders(tmp_path)
    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path / "missing" / "p.json", "the folder " + str(tmp_path / "missing") + " does not exist"),
             (tmp_path, "is a folder; name a file"), (tmp_path / "a_file" / "p.json", "is not a folder")]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        cases.append((tmp_path / "locked" / "p.json", "cannot be written"))
    with monkeypatch.context() as patched:
        patched.setattr(near, "read_photos", lambda *args, **kwargs: pytest.fail("photos were read first"))
        for path, message in cases:
            assert overlap_main([str(a), str(b), "--json", str(path), "--quiet"]) == 2, path
            err = capsys.readouterr().err
            assert err.startswith(f"error: --json {path}") and message in err, err
    assert not (tmp_path / "missing").exists()
    out = tmp_path / "pairs.json"

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:  # a write that fails at the end: 2 (1 would mean pairs found)
        patched.setattr(overlap_command, "write_text_atomic", full_disk)
        assert overlap_main([str(a), str(b), "--json", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write --json {out}: [Errno 28] No space left on device" in err and not out.exists()
    assert overlap_main([str(a), str(b), "--json", str(out), "--quiet"]) == 1
    assert json.loads(out.read_text())["counts"]["pairs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_identical_hashes_are_grouped_without_a_pair_for_every_two_photos():
    n = 3000  # e.g. 3,000 copies of one photo: 4.5 million pairs if every pair were listed
    hashes = [perceptual_hash(_photo(1))] * n + [perceptual_hash(_photo(2))]
    with peak_memory() as peak:
        found = find_duplicates(hashes, [f"file{k}" for k in range(n + 1)], DEFAULT_DISTANCE)
    assert found.groups == [list(range(n))] and found.exact == [False] and found.distance == [0]
    assert peak.bytes < 20 * 2**20, f"{peak.bytes / 2**20:.0f} MB"


def test_overlap_lists_copies_of_one_photo_as_one_match_in_bounded_memory(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    copied, other = _bytes(_photo(1, (48, 36))), _bytes(_photo(2, (48, 36)))
    for k in range(600):  # 120,000 pairs: listed one by one they took ~130 MB here, 13.6 GB for 6,000 x 2,000
        _write(a / f"a{k:03d}.png", copied)
    for k in range(200):
        _write(b / f"b{k:03d}.png", copied)
    _write(a / "q.png", other)
    _write(b / "q.png", other)
    out = tmp_path / "matches.json"
    with peak_memory() as peak:
        assert overlap_main([str(a), str(b), "--json", str(out), "--quiet"]) == 1
    assert peak.bytes < 10 * 2**20, f"{peak.bytes / 2**20:.0f} MB"
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["exact  distance  0  a000.png (and 599 identical)  b000.png (and 199 identical)",
                           "exact  distance  0  q.png  q.png"]
    report = json.loads(out.read_text())
    assert report["counts"] == {"pairs": 120_001, "exact": 120_001, "near": 0, "photos_of_a": 601, "photos_of_b": 201,
                                "group_pairs": 2, "files_in_both": 0}
    assert report["pairs"][0] | {"a_files": 600, "b_files": 200, "pairs": 120_000} == report["pairs"][0]
    assert [len(group) for group in report["identical"]["a"]] == [600] and out.stat().st_size < 100_000
    assert overlap_main([str(a), str(b), "--max-listed", "1", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "q.png" not in printed and "1 more match(es) not listed (--max-listed 1)" in printed


def test_overlap_refuses_a_set_compared_with_itself_and_never_pairs_a_file_with_itself(tmp_path, capsys):
    a, _ = _two_folders(tmp_path)
    (tmp_path / "data").mkdir()
    for argv in ([str(a), str(a)], [f"{a}/", str(a)], [str(a), str(tmp_path / "." / "A" / "sub" / "..")],
                 [f"{tmp_path}/data:test", f"{tmp_path}/data/:test"]):
        assert overlap_main([*argv, "--quiet"]) == 2, argv
        assert "A and B are the same set" in capsys.readouterr().err
    out = tmp_path / "pairs.json"  # a folder and a folder inside it: the files of both are not self-pairs
    assert overlap_main([str(a), str(a / "sub"), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["pairs"] == [] and report["counts"]["files_in_both"] == 6
    assert "6 file(s) are in both A and B" in capsys.readouterr().out
    _write(a / "copy.png", (a / "sub" / "p0.png").read_bytes())  # a group of two identical files, one in both sets
    assert overlap_main([str(a), str(a / "sub"), "--json", str(out), "--quiet"]) == 1
    report = json.loads(out.read_text())
    assert [(p["a"], p["b"], p["a_files"], p["pairs"]) for p in report["pairs"]] == [("copy.png", "p0.png", 2, 1)]
    assert report["counts"] | {"photos_of_a": 1, "photos_of_b": 1} == report["counts"]


def test_a_distance_above_sixteen_is_refused_with_the_reason(tmp_path, capsys):
    assert parse_distance("16") == 16
    for bad in ("17", "20", "32"):
        with pytest.raises(ValueError, match=r"from 0 to 16, .*\(unrelated photos are about 32 of 64 bits apart"):
            parse_distance(bad)
    with pytest.raises(ValueError, match="max_distance must be a whole number from 0 to 16"):
        close_pairs([1, 2], None, 20)
    a, b = _two_folders(tmp_path)
    assert overlap_main([str(a), str(b), "--near-duplicate-distance", "20", "--quiet"]) == 2
    assert "--near-duplicate-distance must be a whole number from 0 to 16" in capsys.readouterr().err


def test_overlap_given_a_data_folder_without_a_split_asks_for_one(tmp_path, capsys):
    a, _ = _two_folders(tmp_path)
    data = tmp_path / "data"
    (data / "tfrecords-jpeg-16x16" / "train").mkdir(parents=True)
    (data / "tfrecords-jpeg-16x16" / "train" / "00-16x16-4.tfrec").write_bytes(bytes(64))
    (data / "classes.json").write_text('["a", "b"]')
    assert overlap_main([str(a), str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: {data} is a data folder" in err and f"{data}:train, {data}:val or {data}:test" in err

"""Exact and near-duplicate photos: a perceptual hash, a banded search for close hashes, duplicate groups,
and `flower overlap` (which photos of one set reappear in another).

    flower overlap photos/new data/mine:test        # a folder against a split written by `flower import`
    flower overlap data/mine:train data/mine:test   # two splits of one data folder
    flower overlap shots/ uploads/ --json pairs.json

A and B are each a folder of photos (searched recursively; files named .jpg, .jpeg, .png, .gif, .bmp or .webp, as
for every command) or a split of a data folder in the competition layout, written `DATA_DIR:train`,
`DATA_DIR:val` or `DATA_DIR:test` (the records of the largest stored image size are read). A cross pair is a
photo of A and a photo of B that are the same bytes ("exact") or whose perceptual hashes differ in at most N of
64 bits ("near"). Identical files (the same bytes) of one side form a group, and each match of a group of A with
a group of B is one line, closest first, with its Hamming distance and how many identical files each side holds
(`a.jpg (and 5999 identical)`): 6,000 copies of a photo against 2,000 copies are one line for 12,000,000 pairs.
At most --max-listed matches are listed (on screen and in --json, which also lists the files of each group);
the summary counts every pair. Exit status: 0 no pair, 1 pairs found, 2 bad arguments or a --json file that
cannot be written. A and B must be two sets: the same folder or the same
split twice is refused (every photo would match itself); a folder inside the other is compared, but no file with
itself.

The hash is a DCT pHash of the photo as displayed (EXIF orientation applied, the import's own loader):
greyscale, resized to 32x32 with a Lanczos filter, 2-D DCT, the 8x8 lowest frequencies, each bit set when
its coefficient is above their median. It matches resized, recompressed, colour-edited and slightly cropped
copies (a percent or two off each side); not mirrored or rotated ones, nor crops of 5% a side or more.
A folder photo compared with a data split is hashed whole and, when not square, also as its centre square,
which is what `flower import --fit crop` (the default) stores; photos imported with `--fit pad` (black
bars) are not recognised. A flat or noise-free smooth image (one colour, a clean gradient) gets a hash with
only a few bits set that matches every other such image; it is matched by its bytes only and counted as
such. A distance above 16 is refused: unrelated photos are about 32 bits apart.

A folder is read recursively, following links to files and folders; broken links, link loops and files that are
not regular files (pipes, devices) are counted as skipped, as are images of more than --max-pixels pixels
(checked from the header, before decoding: a small file can hold a decompression bomb); files not named like
photos are counted apart. Names that are not valid UTF-8 are shown with the odd bytes escaped (`bad\\xff.jpg`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.contract import SPLITS, choose_size, is_data_folder, parse_split_spec, record_id_fallback
from core.errors import ConfigError, DataError
from core.names import shown
from core.photos import DEFAULT_MAX_PIXELS, PhotoError, load_rgb, walk_photos

DEFAULT_DISTANCE = 6  # chosen on 3,230 real photos: docs/DATA.md, "Why a distance of 6"
MAX_DISTANCE = 16  # unrelated photos are about 32 bits apart; from 10 on, different photos pair up (docs/DATA.md)
MIN_BITS = 16  # a hash with fewer bits set (or more than 64 - MIN_BITS) carries no information (docs/DATA.md)
HASH_SIZE = 32  # the greyscale image the DCT is taken of
LOW_FREQUENCIES = 8  # 8 x 8 = 64 bits
CHUNK = 1 << 20  # candidate pairs verified at once (bounds the search's memory)
UNREADABLE = (PhotoError, OSError)
_BYTE_BITS = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT pHash of an image (greyscale 32x32 Lanczos, 8x8 low frequencies above their median)."""
    from scipy.fft import dctn

    grey = image.convert("L").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:LOW_FREQUENCIES, :LOW_FREQUENCIES]
    bits = np.packbits((low > np.median(low)).ravel())
    return int.from_bytes(bits.tobytes(), "big")


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of an image (what `flower import --fit crop` keeps, before resizing)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def popcount(values: np.ndarray) -> np.ndarray:
    """The number of set bits of each uint64 (numpy's bitwise_count where there is one, else a byte table)."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values).astype(np.int64)
    return _BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.int64)


def informative(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """True for each hash with MIN_BITS..64 - MIN_BITS bits set; fewer (a flat or smooth image) say nothing."""
    bits = popcount(np.asarray(hashes, dtype=np.uint64).ravel())
    return (bits >= MIN_BITS) & (bits <= 64 - MIN_BITS)


def check_distance(value: int | None, name: str = "near_duplicate_distance") -> int | None:
    """A valid near-duplicate distance (0..16), or None for off (None or -1); ConfigError naming the option."""
    if value is None or (not isinstance(value, bool) and isinstance(value, int | np.integer) and value == -1):
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= MAX_DISTANCE:
        raise ConfigError(f"{name} must be a whole number from 0 to {MAX_DISTANCE}, or -1 / off to disable it, "
                         f"got {value!r} (unrelated photos are about 32 of 64 bits apart: a larger distance "
                         "pairs up different photos)")
    return int(value)


def parse_distance(text: str) -> int | None:
    """The --near-duplicate-distance option: a whole number 0..16, or 'off' / -1 (None: no near-duplicate search)."""
    if text.strip().lower() in ("off", "none", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = text
    return check_distance(value, "--near-duplicate-distance")


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the max_distance + 1 bands the 64 bits are cut into, as even as possible."""
    count = max_distance + 1
    widths = [64 // count + (1 if k < 64 % count else 0) for k in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    return [(int(s), int(w)) for s, w in zip(shifts, widths, strict=True)]


def _band_keys(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    """The value of one band of each hash."""
    return (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)


def _candidates(lo: np.ndarray, hi: np.ndarray, sources: np.ndarray, order: np.ndarray
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (left, right) index arrays: sources[k] with order[lo[k]:hi[k]], at most about CHUNK at a time."""
    counts = np.maximum(hi - lo, 0)
    busy = np.flatnonzero(counts)
    total = np.cumsum(counts[busy])
    start = 0
    while start < len(busy):
        done = total[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(total, done + CHUNK, side="right")))
        picked = busy[start:stop]
        sizes = counts[picked]
        offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        yield np.repeat(sources[picked], sizes), order[np.repeat(lo[picked], sizes) + offsets]
        start = stop


def close_pairs(left: Sequence[int] | np.ndarray, right: Sequence[int] | np.ndarray | None = None,
                max_distance: int = DEFAULT_DISTANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j, distance) of hashes within max_distance bits: left x right, or i < j within left."""
    # Every pair is listed (n equal hashes: n(n-1)/2 of them); find_duplicates and cross_pairs pass distinct ones.
    a = np.asarray(left, dtype=np.uint64).ravel()
    b = a if right is None else np.asarray(right, dtype=np.uint64).ravel()
    max_distance = check_distance(max_distance, "max_distance")
    found: list[tuple[np.ndarray, ...]] = []
    cuts = [] if max_distance is None else bands(max_distance)  # None (off): no near pairs
    for k, (shift, width) in enumerate(cuts):
        # Pigeonhole: hashes within max_distance bits agree exactly on at least one of the max_distance + 1 bands.
        keys_b = _band_keys(b, shift, width)
        order = np.argsort(keys_b, kind="stable")
        ordered = keys_b[order]
        if right is None:  # each pair once: the later positions of the same bucket in sorted order
            lo = np.arange(1, len(a) + 1)
            hi = np.searchsorted(ordered, ordered, side="right")
            sources = order
        else:
            keys_a = _band_keys(a, shift, width)
            lo, hi = np.searchsorted(ordered, keys_a, side="left"), np.searchsorted(ordered, keys_a, side="right")
            sources = np.arange(len(a))
        for i, j in _candidates(lo, hi, sources, order):
            xor = a[i] ^ b[j]
            hit = np.flatnonzero(popcount(xor) <= max_distance)
            i, j, xor = i[hit], j[hit], xor[hit]
            keep = np.ones(len(hit), bool)
            for earlier_shift, earlier_width in cuts[:k]:  # found already in an earlier band
                keep &= _band_keys(xor, earlier_shift, earlier_width) != 0
            if right is None:
                i, j = np.minimum(i, j), np.maximum(i, j)
            found.append((i[keep], j[keep], popcount(xor[keep])))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j, d = (np.concatenate(parts).astype(np.int64) for parts in zip(*found, strict=True))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def exact_pairs(digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (first, other) linking every file to the first file with the same content digest."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(digest, k), k) for k, digest in enumerate(digests)]
    pairs = [(f, k) for f, k in pairs if f != k]
    i, j = (np.array(col, dtype=np.int64) for col in zip(*pairs, strict=True)) if pairs else (np.zeros(0, int),) * 2
    return i, j


@dataclass
class Duplicates:
    """Groups of duplicate photos among n: a group id per photo, and each group of two or more."""

    group_of: np.ndarray
    groups: list[list[int]] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)  # the group's files are all the same bytes
    distance: list[int] = field(default_factory=list)  # the largest Hamming distance of a pair found in the group
    exact_only: list[int] = field(default_factory=list)  # photos whose hash says nothing: grouped by bytes only


def _near_edges(hashes: Sequence[int] | np.ndarray, n: int, max_distance: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """Graph edges (i, j, distance) linking near duplicates through one node per distinct informative hash.

    Photo k (nodes 0..n-1) links to node n + u of its distinct hash u, and the nodes of distinct hashes within
    max_distance link to each other: identical hashes cost one edge each, not a pair per two photos. Returns the
    edges, the number of nodes and the photos left out (their hash carries no information)."""
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    keep = informative(h)
    unique, inverse = np.unique(h[keep], return_inverse=True)
    near_i, near_j, near_d = close_pairs(unique, None, max_distance)
    photos = np.flatnonzero(keep)
    i = np.concatenate([photos, n + near_i])
    j = np.concatenate([n + inverse.ravel(), n + near_j])
    d = np.concatenate([np.zeros(len(photos), np.int64), near_d])
    return i, j, d, n + len(unique), np.flatnonzero(~keep)


def find_duplicates(hashes: Sequence[int] | np.ndarray, digests: Sequence[str],
                    max_distance: int | None = DEFAULT_DISTANCE) -> Duplicates:
    """Group photos that are the same bytes or (max_distance not None) whose informative hashes are close."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(digests)
    i, j = exact_pairs(digests)
    d = np.zeros(len(i), np.int64)
    nodes, exact_only = n, np.zeros(0, np.int64)
    if max_distance is not None and n:
        near_i, near_j, near_d, nodes, exact_only = _near_edges(hashes, n, max_distance)
        i, j, d = np.concatenate([i, near_i]), np.concatenate([j, near_j]), np.concatenate([d, near_d])
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    largest = np.zeros(nodes, np.int64)
    np.maximum.at(largest, labels[i], d)
    group_of = labels[:n]
    members: dict[int, list[int]] = {}
    for k, g in enumerate(group_of.tolist()):
        members.setdefault(g, []).append(k)
    result = Duplicates(group_of=np.asarray(group_of, np.int64), exact_only=exact_only.tolist())
    for g, group in sorted(members.items(), key=lambda item: item[1][0]):
        if len(group) > 1:
            result.groups.append(group)
            result.exact.append(len({digests[k] for k in group}) == 1)
            result.distance.append(int(largest[g]))
    return result


# --- flower overlap ----------------------------------------------------------------------------------------


@dataclass
class PhotoSet:
    """The photos of one side of `flower overlap`: names, content digests, and hashes (several per photo)."""

    spec: str
    kind: str  # "folder" or "split"
    names: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # the photo each hash belongs to
    skipped: list[str] = field(default_factory=list)  # photos that cannot be read, broken links, link loops
    not_photos: list[str] = field(default_factory=list)  # files not named like photos (core.photos), not read
    files: list[str] = field(default_factory=list)  # each photo's file, its folder resolved: not paired with itself

    def add(self, name: str, data: bytes, squares_too: bool, file: str = "",
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        """Hash one photo's bytes (whole, and as its centre square when asked and not square)."""
        image = load_rgb(data, max_pixels)
        variants = [image]
        if squares_too and image.size[0] != image.size[1]:
            variants.append(centre_square(image))
        for variant in variants:
            self.hashes.append(perceptual_hash(variant))
            self.owners.append(len(self.names))
        self.names.append(name)
        self.digests.append(hashlib.sha256(data).hexdigest())
        self.files.append(file or f"{self.spec}\0{name}")

    def exact_only(self) -> list[str]:
        """The photos none of whose hashes carries information (flat or smooth images): matched by bytes only."""
        some = np.zeros(len(self.names), bool)
        if self.hashes:
            some[np.asarray(self.owners, dtype=np.int64)[informative(self.hashes)]] = True
        return [name for name, ok in zip(self.names, some.tolist(), strict=True) if not ok]


def split_spec(spec: str) -> tuple[str, str] | None:
    """(data folder, split) of a `DATA_DIR:split` argument (core.contract's one rule), None for a folder of photos."""
    parsed = parse_split_spec(spec)
    return (parsed.data, parsed.split) if parsed else None


def same_set(a: str, b: str) -> bool:
    """Whether two `flower overlap` arguments name one set: the same folder, or the same split of one data folder."""
    split_a, split_b = split_spec(a), split_spec(b)
    if split_a is None and split_b is None:
        return Path(a).resolve() == Path(b).resolve()
    return (split_a is not None and split_b is not None and split_a[1] == split_b[1]
            and Path(split_a[0]).resolve() == Path(split_b[0]).resolve())


def read_folder(spec: str, squares_too: bool, progress: bool = True,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PhotoSet:
    """Every photo under a folder (core.photos' one rule: recursively, links followed; photos that cannot be read,
    images over max_pixels, broken links and link loops are skipped, files not named like photos listed apart)."""
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"folder not found: {spec} (or, for a split of a data folder, write DATA_DIR:train, "
                        f"DATA_DIR:val or DATA_DIR:test)")
    walk = walk_photos(root)
    photos = PhotoSet(spec, "folder")
    photos.not_photos += [shown(path.relative_to(root).as_posix()) for path in walk.others]
    photos.skipped += [shown(problem.path.relative_to(root).as_posix()) for problem in walk.problems]
    files = walk.photos
    real = root.resolve()  # a file is itself in both sets when one folder holds the other (a link is another file)
    for k, path in enumerate(files):
        relative = path.relative_to(root)
        name = shown(relative.as_posix())
        try:
            photos.add(name, path.read_bytes(), squares_too, str(real / relative), max_pixels)
        except UNREADABLE:
            photos.skipped.append(name)
        if progress and (k + 1) % 1000 == 0:
            print(f"  {spec}: read {k + 1}/{len(files)} files", file=sys.stderr, flush=True)
    return photos


def read_split(spec: str, folder: str, split: str, progress: bool = True,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PhotoSet:
    """Every record of one split of a data folder, at its largest stored size (TensorFlow is imported here)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} in {spec}; expected DATA_DIR:train, DATA_DIR:val or DATA_DIR:test")
    from imaging.records import example_fields, iter_records
    from training.data.layout import available_sizes, split_files

    sizes = available_sizes(folder)
    if not sizes:
        raise DataError(f"no 'tfrecords-jpeg-<S>x<S>' folder in {folder}; expected a data folder written by "
                        "`flower import` or `flower demo-data`")
    size = choose_size(sizes, None)  # the hash wants full resolution: the largest stored size
    photos = PhotoSet(f"{spec} ({size}x{size})", "split")
    for path in split_files(folder, size, split):
        for index, raw in iter_records(path):
            fields = example_fields(raw)
            image, record_id = (fields.image, fields.id) if fields else (b"", "")
            try:
                photos.add(record_id or record_id_fallback(path, index), image, squares_too=False,
                           max_pixels=max_pixels)
            except UNREADABLE:
                photos.skipped.append(f"{path}: record {index}")
        if progress:
            print(f"  {spec}: read {path}", file=sys.stderr, flush=True)
    return photos


def _refuse_split_spec(spec: str) -> None:
    """Say what is wrong with a `DATA_DIR:split` argument that names no split: the folder, or the split name."""
    folder, _, split = spec.rpartition(":")
    if folder and not Path(folder).is_dir():
        raise DataError(f"data folder not found: {folder} (in {spec})")
    if folder:
        raise DataError(f"unknown split {split!r} in {spec}; expected DATA_DIR:train, DATA_DIR:val or DATA_DIR:test")


def read_photos(spec: str, other: str, progress: bool = True,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PhotoSet:
    """One side of `flower overlap`: a folder of photos or `DATA_DIR:split`; refuses a side without photos."""
    parsed = split_spec(spec)
    if parsed:
        photos = read_split(spec, *parsed, progress=progress, max_pixels=max_pixels)
    elif not Path(spec).is_dir() and ":" in spec.rstrip("/"):
        _refuse_split_spec(spec)
    elif is_data_folder(spec):
        name = spec.rstrip("/") or spec
        raise DataError(f"{spec} is a data folder (classes.json and tfrecords-jpeg-* folders), not a folder of "
                        f"photos: name one of its splits, {name}:train, {name}:val or {name}:test")
    else:  # a folder compared with a split is matched as a whole photo and as the centre square the import keeps
        photos = read_folder(spec, squares_too=split_spec(other) is not None, progress=progress,
                             max_pixels=max_pixels)
    if not photos.names:
        left_out = [f"{len(photos.skipped)} unreadable file(s)"] * bool(photos.skipped) + \
                   [f"{len(photos.not_photos)} file(s) not named like photos"] * bool(photos.not_photos)
        raise DataError(f"no images in {spec}" + (f" ({', '.join(left_out)})" if left_out else ""))
    return photos


def identical_groups(photos: PhotoSet) -> tuple[np.ndarray, list[list[int]]]:
    """Each photo's group of identical files (the same bytes), and each group's photos in reading order."""
    first: dict[str, int] = {}
    group_of = np.array([first.setdefault(digest, len(first)) for digest in photos.digests], dtype=np.int64)
    groups: list[list[int]] = [[] for _ in first]
    for k, g in enumerate(group_of.tolist()):
        groups[g].append(k)
    return group_of, groups


def _hash_groups(photos: PhotoSet, group_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct informative hashes of a set, and for each the groups that have it (CSR: indptr, groups)."""
    hashes = np.asarray(photos.hashes, dtype=np.uint64)
    keep = informative(hashes)
    h, g = hashes[keep], group_of[np.asarray(photos.owners, dtype=np.int64)[keep]]
    order = np.lexsort((g, h))
    h, g = h[order], g[order]
    new = np.ones(len(h), bool)
    new[1:] = (h[1:] != h[:-1]) | (g[1:] != g[:-1])  # a group once per hash (its whole and its square may share it)
    h, g = h[new], g[new]
    unique, starts = np.unique(h, return_index=True)
    return unique, np.append(starts, len(h)), g


def _expand(i: np.ndarray, ptr: np.ndarray, members: np.ndarray, j: np.ndarray, ptr_b: np.ndarray,
            members_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (group of A, group of B) behind hash pairs (i, j): the groups of hash i times those of hash j, and
    the hash pair each came from."""
    na, nb = ptr[i + 1] - ptr[i], ptr_b[j + 1] - ptr_b[j]
    per = na * nb
    source = np.repeat(np.arange(len(i)), per)
    offset = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    return members[ptr[i][source] + offset // nb[source]], members_b[ptr_b[j][source] + offset % nb[source]], source


@dataclass
class Overlap:
    """The cross matches of `flower overlap`, by groups of identical files: one entry per (group of A, group of
    B) that match, closest first, with the number of photo pairs it stands for."""

    a: PhotoSet
    b: PhotoSet
    groups_a: list[list[int]]
    groups_b: list[list[int]]
    ga: np.ndarray  # the matching group pairs, closest first (exact before near at one distance)
    gb: np.ndarray
    distance: np.ndarray
    exact: np.ndarray
    pairs: np.ndarray  # photo pairs each group pair stands for (files in both sets not paired with themselves)
    unpaired: tuple[int, int] = (0, 0)  # photos of A, of B in a matching group whose only match is themselves


def cross_groups(a: PhotoSet, b: PhotoSet, max_distance: int | None) -> Overlap:
    """Every (group of identical photos of A, group of B) whose photos are the same bytes or within max_distance
    bits, closest first; memory grows with the matching groups, never with the copies in them.

    Only informative hashes are compared (a flat or smooth photo pairs by its bytes only), each distinct hash
    once, and a file that is in both sets (one folder inside the other) is not paired with itself."""
    (group_a, groups_a), (group_b, groups_b) = identical_groups(a), identical_groups(b)
    digest_b = {b.digests[members[0]]: g for g, members in enumerate(groups_b)}
    exact = [(g, digest_b[a.digests[m[0]]]) for g, m in enumerate(groups_a) if a.digests[m[0]] in digest_b]
    ga, gb = (np.array(col, dtype=np.int64) for col in zip(*exact, strict=True)) if exact else (np.zeros(0, int),) * 2
    d, same = np.zeros(len(ga), np.int64), np.ones(len(ga), bool)
    if max_distance is not None:
        (hashes_a, ptr_a, members_a), (hashes_b, ptr_b, members_b) = _hash_groups(a, group_a), _hash_groups(b, group_b)
        i, j, near = close_pairs(hashes_a, hashes_b, max_distance)
        near_a, near_b, source = _expand(i, ptr_a, members_a, j, ptr_b, members_b)
        ga, gb = np.concatenate([ga, near_a]), np.concatenate([gb, near_b])
        d, same = np.concatenate([d, near[source]]), np.concatenate([same, np.zeros(len(source), bool)])
    order = np.lexsort((~same, d, gb, ga))  # per group pair, its closest match (exact first) comes first
    ga, gb, d, same = ga[order], gb[order], d[order], same[order]
    first = np.ones(len(ga), bool)
    first[1:] = (ga[1:] != ga[:-1]) | (gb[1:] != gb[:-1])
    ga, gb, d, same = ga[first], gb[first], d[first], same[first]
    sizes_a, sizes_b = np.array([len(g) for g in groups_a], np.int64), np.array([len(g) for g in groups_b], np.int64)
    pairs = sizes_a[ga] * sizes_b[gb]
    unpaired = _files_in_both(a, b, group_a, group_b, ga, gb, pairs, sizes_a, sizes_b)
    keep = pairs > 0
    order = np.lexsort((gb[keep], ga[keep], ~same[keep], d[keep]))
    return Overlap(a, b, groups_a, groups_b, *(x[keep][order] for x in (ga, gb, d, same, pairs)), unpaired)


def _files_in_both(a: PhotoSet, b: PhotoSet, group_a: np.ndarray, group_b: np.ndarray, ga: np.ndarray,
                   gb: np.ndarray, pairs: np.ndarray, sizes_a: np.ndarray, sizes_b: np.ndarray) -> tuple[int, int]:
    """Take the self pairs of files in both sets out of `pairs` (in place); the photos of A and of B in a matching
    group whose only match is themselves."""
    index_b = {file: k for k, file in enumerate(b.files)}
    shared = [(k, index_b[file]) for k, file in enumerate(a.files) if file in index_b]
    if not shared:
        return 0, 0
    where = {(x, y): n for n, (x, y) in enumerate(zip(ga.tolist(), gb.tolist(), strict=True))}
    partners_a = np.bincount(ga, weights=sizes_b[gb], minlength=len(sizes_a))
    partners_b = np.bincount(gb, weights=sizes_a[ga], minlength=len(sizes_b))
    alone_a = alone_b = 0
    for k, m in shared:  # the same bytes, so the two groups are an exact pair
        pairs[where[(int(group_a[k]), int(group_b[m]))]] -= 1
        alone_a += int(partners_a[group_a[k]] == 1 and sizes_a[group_a[k]] > 1)  # else the pair is gone
        alone_b += int(partners_b[group_b[m]] == 1 and sizes_b[group_b[m]] > 1)
    return alone_a, alone_b


def _shown_pair(overlap: Overlap, k: int) -> tuple[str, str]:
    """The names a listed group pair is shown by: the first photo of each group, two different files."""
    members_a, members_b = overlap.groups_a[overlap.ga[k]], overlap.groups_b[overlap.gb[k]]
    for i in members_a[:2]:
        for j in members_b[:2]:
            if overlap.a.files[i] != overlap.b.files[j]:
                return overlap.a.names[i], overlap.b.names[j]
    return overlap.a.names[members_a[0]], overlap.b.names[members_b[0]]


def listed_matches(overlap: Overlap, most: int) -> list[dict]:
    """The first `most` group pairs: the names shown, how many identical files each side holds, the photo pairs
    they stand for, distance and kind."""
    rows = []
    for k in range(min(most, len(overlap.ga))):
        a, b = _shown_pair(overlap, k)
        rows.append({"a": a, "b": b, "distance": int(overlap.distance[k]),
                     "kind": "exact" if overlap.exact[k] else "near", "a_files": len(overlap.groups_a[overlap.ga[k]]),
                     "b_files": len(overlap.groups_b[overlap.gb[k]]), "pairs": int(overlap.pairs[k])})
    return rows


def overlap_report(overlap: Overlap, max_distance: int | None, most: int) -> dict:
    """The JSON document of `flower overlap --json`: both sides, the threshold, the counts, the first `most` group
    pairs, and every group of identical files among them."""
    a, b = overlap.a, overlap.b

    def side(photos: PhotoSet) -> dict:
        return {"spec": photos.spec, "kind": photos.kind, "images": len(photos.names), "skipped": photos.skipped,
                "not_photos": photos.not_photos, "exact_only": [] if max_distance is None else photos.exact_only()}

    listed = listed_matches(overlap, most)
    shown = {"a": sorted(set(overlap.ga[:most].tolist())), "b": sorted(set(overlap.gb[:most].tolist()))}
    identical = {letter: [[photos.names[k] for k in groups[g]] for g in shown[letter] if len(groups[g]) > 1]
                 for letter, photos, groups in (("a", a, overlap.groups_a), ("b", b, overlap.groups_b))}
    return {"a": side(a), "b": side(b), "near_duplicate_distance": max_distance, "counts": overlap_counts(overlap),
            "pairs": listed, "identical": identical}


def overlap_counts(overlap: Overlap) -> dict:
    """The photo pairs (exact, near), the photos of each side in one, the group pairs, and the files in both."""
    exact = int(overlap.pairs[overlap.exact].sum())
    photos = {letter: int(np.array([len(groups[g]) for g in np.unique(chosen).tolist()], np.int64).sum()) - alone
              for letter, groups, chosen, alone in (("a", overlap.groups_a, overlap.ga, overlap.unpaired[0]),
                                                    ("b", overlap.groups_b, overlap.gb, overlap.unpaired[1]))}
    return {"pairs": int(overlap.pairs.sum()), "exact": exact, "near": int(overlap.pairs.sum()) - exact,
            "photos_of_a": photos["a"], "photos_of_b": photos["b"], "group_pairs": len(overlap.ga),
            "files_in_both": len(set(overlap.a.files) & set(overlap.b.files))}

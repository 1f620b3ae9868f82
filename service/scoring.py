"""Score many images offline with the service's own decoding and prediction, into a CSV (`flower predict`).

    flower predict demo/ensemble photos/ extra.jpg --out predictions.csv
    flower predict demo/runs/demo-cnn-64 demo/data:test --out test.csv --probabilities
    flower predict demo/ensemble 'photos/**/*.jpg' --out predictions.csv --runner beam

ENSEMBLE_OR_RUN is an ensemble directory (or its ensemble.json) or a run directory (member.json and
saved_model/); it is loaded, checked and warmed up as `flower serve` does. IMAGES are files, folders
(walked recursively in name order: .jpg .jpeg .png .gif .bmp .webp in any case; other files and names
starting with '.' are ignored and counted), glob patterns (quoted, so that the shell leaves them: each
match in name order as if named; ** spans folders) and data splits written DATA:SPLIT (e.g. data/mine:test):
the split's records at the record size the largest member would train on (the smallest >= its input size,
else the largest), each a row whose path is DATA:SPLIT#<record id>. A file named on the command line is
scored whatever its extension. With --runner beam they may also be remote (gs://BUCKET/...: a file, a
folder, a pattern or DATA:SPLIT), and the same rows are scored by an Apache Beam pipeline (docs/SERVING.md).

Each image is decoded exactly as the service decodes an upload (the service's default --max-image-bytes,
--max-pixels and --downscale-pixels) and predicted with the same code, so the probabilities are the
service's. The CSV has one row per image, in input order: path, ok (true/false), error ('<kind>: <message>'
when ok is false: not_an_image, corrupt, too_many_pixels, too_large, unreadable, broken_link, ...), then
top1, top1_probability ... topK, topK_probability, and with --probabilities one column per class (its
name) of blended probabilities. A bad image is a row with ok=false; it never stops the run. A .tfrec file
that stops before the records its name states (a damaged record, or a file cut short) gives the rows of the
records before that point and one row DATA:SPLIT#<file name>@<index> with error corrupt_record; stderr
counts what was lost in records ('198 of 240 records could not be read (<file> from record 42: ...)'). The
CSV is written to a temporary file beside --out and renamed into place when complete.

Exit status: 0 every image scored; 1 the CSV is written but some rows failed or records could not be read
(their count is on stderr), or --submission was refused (why is on stderr; the CSV is written), or the models
cannot be loaded; 2 nothing written: bad options, an input that does not exist, no images
at all, or --out that exists (without --overwrite) or whose folder does not exist.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import os
import re
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from core.contract import (
    CLASSES_FILE,
    IMAGE_FEATURE,
    RECORD_SUFFIX,
    choose_size,
    count_in_name,
    local_size_folders,
    parse_split_spec,
    record_id_fallback,
)
from core.errors import FlowerError
from core.files import check_output_file, pattern_matches, write_atomic
from core.members import (
    ArtifactError,
    is_ensemble_directory,
    is_run_directory,
    read_ensemble,
    read_json_file,
    read_member,
)
from core.names import shown
from core.photos import PHOTO_EXTENSIONS, entry_problem, is_photo_name, walk_photos
from core.runtimes import TENSORFLOW
from service.images import ImageError
from service.inference import EncodedImage, InferencePath, Result, direct
from service.predictor import EnsemblePredictor, load_ensemble, load_run
from service.settings import Settings

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 32
PROGRESS_SECONDS = 2.0


class InputError(FlowerError):
    """The run cannot start or finish as asked (an input not found, no images, --out refused); nothing written."""


# --- inputs: files, folders, DATA:SPLIT -------------------------------------------------------------------


@dataclass(frozen=True)
class FileInput:
    """One image file: its path as shown in the CSV, and why it cannot be read when that is known already."""

    shown: str
    path: Path
    problem: ImageError | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One image in a remote file system (gs://...), read through Beam's file systems: its URL is its path."""

    shown: str
    url: str


@dataclass(frozen=True)
class SplitInput:
    """A data directory's split: the spec as written, and its .tfrec files at each record size that holds it."""

    spec: str
    files: dict[int, list[str]]

    def size_for(self, image_size: int) -> int:
        """The record size to read for a model of `image_size` (core.contract's one rule, as training)."""
        return choose_size(list(self.files), image_size)


@dataclass
class Inputs:
    """Everything to score, in order, and what the walk left out."""

    sources: list[FileInput | RemoteFile | SplitInput] = field(default_factory=list)
    ignored: int = 0  # files that are not images by extension, and hidden names
    notes: list[str] = field(default_factory=list)  # link loops not followed


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # gs://bucket/..., s3://...: a remote file system's path
RemoteLister = Callable[[str, "Inputs"], None]


def collect_inputs(specs: list[str], remote: RemoteLister | None = None) -> Inputs:
    """Files, folders (walked), glob patterns and DATA:SPLIT specs -> the inputs in order; InputError naming one that
    is not there. A URL (gs://...) goes to `remote`, which adds its inputs (the Beam runner's file systems)."""
    if not specs:
        raise InputError("no images given: name files, folders or DATA:SPLIT (e.g. data/mine:test)")
    inputs = Inputs()
    for spec in specs:
        if URL.match(spec):
            if remote is None:
                raise InputError(f"{shown(spec)}: a remote path is read by `--runner beam` (Beam's file systems); "
                                 "this runner reads local files")
            remote(spec, inputs)
            continue
        matches = pattern_matches(spec)
        if matches:  # as if each match were named on the command line
            for match in matches:
                _add_path(Path(match), inputs)
            continue
        if os.path.lexists(spec):
            _add_path(Path(spec), inputs)
            continue
        if matches is not None:
            raise InputError(f"{shown(spec)} matches no file")
        split = _split_input(spec)
        if split is None:
            raise InputError(f"{shown(spec)} not found (not a file, a folder, or DATA:SPLIT of a data directory)")
        inputs.sources.append(split)
    if not inputs.sources:
        ignored = f"; {inputs.ignored} other file(s) ignored" if inputs.ignored else ""
        raise InputError(f"no images in {', '.join(shown(s) for s in specs)}: no file ends in "
                         f"{', '.join(sorted(PHOTO_EXTENSIONS))}{ignored}")
    return inputs


def _add_path(path: Path, inputs: Inputs) -> None:
    """A folder's photos, or one file whatever its name."""
    if path.is_dir():
        _add_folder(path, inputs)
    else:
        inputs.sources.append(_file_input(path))


def _file_input(path: Path) -> FileInput:
    """A file named on the command line or found in a folder; a broken link, a loop or a pipe as its problem."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except OSError as err:
        return FileInput(shown(str(path)), path, _stat_problem(path, err))
    if not stat.S_ISREG(mode):
        return FileInput(shown(str(path)), path, ImageError("unreadable", "not a regular file (a pipe, device, socket "
                                                                          "or folder)"))
    return FileInput(shown(str(path)), path)


def _stat_problem(path: Path, err: OSError) -> ImageError:
    """Why a path cannot be opened (core.photos.entry_problem): a broken link, a link loop, or the system's reason."""
    problem = entry_problem(path, err)
    return ImageError(problem.code, problem.detail)


def _add_folder(folder: Path, inputs: Inputs) -> None:
    """Add a folder's photos (core.photos' one rule) in name order; a photo that cannot be read is a row with its
    problem, a link loop a note, other files and hidden names are counted as ignored."""
    walk = walk_photos(folder)
    loops = [p for p in walk.problems if p.code == "link_loop"]
    rows = {p.path: p for p in walk.problems if p not in loops and (p.path.is_dir() or is_photo_name(p.path.name))}
    inputs.ignored += len(walk.hidden) + len(walk.others) + len(walk.problems) - len(loops) - len(rows)
    inputs.notes += [f"{shown(str(p.path))}: {p.reason}" for p in loops]
    for path in sorted([*walk.photos, *rows]):
        problem = rows.get(path)
        inputs.sources.append(FileInput(shown(str(path)), path,
                                        ImageError(problem.code, problem.detail) if problem else None))


def _split_input(spec: str) -> SplitInput | None:
    """DATA:SPLIT as a split's record files per size; None when DATA is no folder, InputError when the split is not
    in it."""
    parsed = parse_split_spec(spec)
    if parsed is None:
        return None
    data, split = parsed.data, parsed.split
    try:
        folders = local_size_folders(data)
    except OSError as err:
        raise InputError(f"{shown(spec)}: {shown(data)} cannot be read ({err.strerror or err})") from None
    if not folders:
        raise InputError(f"{shown(spec)}: {shown(data)} holds no tfrecords-jpeg-<S>x<S> folder (not a data directory "
                         "in the competition layout)")
    files = {}
    for size, folder in folders.items():
        found = sorted(str(p) for p in (folder / split).glob(f"*{RECORD_SUFFIX}")) if (folder / split).is_dir() else []
        if found:
            files[size] = found
    if not files:
        there = sorted({p.name for folder in folders.values() for p in folder.iterdir() if p.is_dir()})
        raise InputError(f"{shown(spec)}: no .tfrec files of split {split!r} in {shown(data)} (splits there: "
                         f"{', '.join(there) or 'none'})")
    return SplitInput(spec, files)


def count_images(inputs: Inputs, image_size: int) -> int:
    """How many rows the inputs give when nothing is damaged: files, and the splits' records."""
    return sum(not isinstance(source, SplitInput) for source in inputs.sources) + count_records(inputs, image_size)


def count_records(inputs: Inputs, image_size: int) -> int:
    """The records of the DATA:SPLIT inputs (counted from the `-<count>.tfrec` names, else by reading)."""
    total = 0
    for source in inputs.sources:
        if isinstance(source, SplitInput):
            for path in source.files[source.size_for(image_size)]:
                stated = count_in_name(path)
                total += stated if stated is not None else _count_records(path)
    return total


def _count_records(path: str) -> int:
    """The records of one .tfrec file, by reading it (those before a damaged one)."""
    import tensorflow as tf

    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            count += 1
    except tf.errors.OpError:
        pass
    return count


# --- reading: (path shown, bytes or the problem) in order ---------------------------------------------------


def iter_images(inputs: Inputs, image_size: int, max_bytes: int) -> Iterator[tuple[str, bytes | ImageError]]:
    """Every input's row path and its encoded bytes (or why there are none), in order, read lazily."""
    for source in inputs.sources:
        if isinstance(source, FileInput):
            yield source.shown, read_file(source, max_bytes)
        elif isinstance(source, SplitInput):
            for path in source.files[source.size_for(image_size)]:
                yield from iter_record_file(source.spec, path, max_bytes)
        else:
            raise InputError(f"{source.shown}: a remote path is read by `--runner beam`")


def read_file(source: FileInput, max_bytes: int) -> bytes | ImageError:
    """A file's bytes, at most `max_bytes` of them (else ImageError 'too_large', as the service answers)."""
    if source.problem is not None:
        return source.problem
    try:
        with open(source.path, "rb") as f:
            return read_at_most(f, max_bytes)
    except OSError as err:
        return _stat_problem(source.path, err)


def read_at_most(stream: BinaryIO, max_bytes: int) -> bytes | ImageError:
    """An open file's bytes, or ImageError 'too_large' when it holds more than `max_bytes`."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        return ImageError("too_large", f"the image is larger than the limit of {max_bytes} bytes")
    return data


@dataclass
class DamagedFile(ImageError):
    """A .tfrec file that stops early: its record `index` and every one after it cannot be read (`lost` of them,
    None when the file name states no count), and why."""

    file: str = ""
    index: int = 0
    lost: int | None = None
    reason: str = ""


def _damaged(path: str, index: int, reason: str) -> DamagedFile | None:
    """The error of a file that could be read up to record `index` only (None when that is all its name states)."""
    stated = count_in_name(path)
    if not reason and (stated is None or index >= stated):
        return None
    lost = stated - index if stated is not None and stated > index else None
    span = (f"record {index} and those after it" if lost is None else f"record {index}" if lost == 1 else
            f"records {index} to {stated - 1} ({lost} records)")
    return DamagedFile("corrupt_record", f"{shown(path)}: {span} cannot be read ({reason or 'the file ends early'})",
                       shown(path), index, lost, reason or "the file ends early")


def iter_record_file(spec: str, path: str, max_bytes: int) -> Iterator[tuple[str, bytes | ImageError]]:
    """One .tfrec file of a split's records: SPEC#<id> and the image bytes, in order. A file that stops before the
    records its name states (a damaged record, or cut short) ends in one error row, SPEC#<file name>@<index>."""
    import tensorflow as tf

    index, reason = 0, ""
    try:
        for raw in tf.data.TFRecordDataset(path):
            record_id, data = _parse_record(raw.numpy(), record_id_fallback(path, index))
            if isinstance(data, bytes) and len(data) > max_bytes:
                data = ImageError("too_large", f"the image is larger than the limit of {max_bytes} bytes")
            yield f"{spec}#{record_id}", data
            index += 1
    except tf.errors.OpError as err:
        reason = f"{type(err).__name__}: {err.message.splitlines()[0]}"
    damaged = _damaged(path, index, reason)
    if damaged is not None:
        yield f"{spec}#{Path(path).name}@{index}", damaged


def _parse_record(raw: bytes, fallback_id: str) -> tuple[str, bytes | ImageError]:
    """A serialized tf.train.Example's id (`fallback_id` when it has none, as training does) and image bytes."""
    from imaging.records import example_fields

    fields = example_fields(raw)
    if fields is None:
        return fallback_id, ImageError("corrupt_record", "the record is not a tf.train.Example")
    record_id = fields.id or fallback_id
    if not fields.image:
        return record_id, ImageError("no_image", f"the record has no '{IMAGE_FEATURE}' feature (features: "
                                                 f"{list(fields.features)})")
    return record_id, fields.image


# --- scoring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How to score: the CSV's columns, the batch size, and the service's decoding limits."""

    top_k: int = DEFAULT_TOP_K
    probabilities: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    max_image_bytes: int = Settings.model_fields["max_image_bytes"].default
    max_pixels: int = Settings.model_fields["max_pixels"].default
    downscale_pixels: int = Settings.model_fields["downscale_pixels"].default


@dataclass
class Summary:
    """What a run scored: rows, failed rows by error kind, seconds; the records of the DATA:SPLIT inputs and the
    files among them that stop early (each is one error row)."""

    rows: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    records: int = 0
    damaged: list[DamagedFile] = field(default_factory=list)

    def count(self, row: list[str]) -> None:
        """Count one CSV row (its ok and error columns)."""
        self.rows += 1
        if row[1] == "false":
            self.failed[row[2].partition(":")[0]] += 1

    @property
    def failures(self) -> int:
        """How many rows have ok=false."""
        return sum(self.failed.values())

    @property
    def unread(self) -> int | None:
        """How many records of the damaged files were not read (None when a file's name states no count)."""
        lost = [d.lost for d in self.damaged]
        return None if None in lost else sum(lost)

    def damage_line(self) -> str | None:
        """What the damaged files cost, counted in records, for the end of the run (None when no file was)."""
        if not self.damaged:
            return None
        first, unread = self.damaged[0], self.unread
        what = f"{unread} of {self.records} records" if unread is not None else f"some of the {self.records} records"
        more = f"; and {len(self.damaged) - 1} more damaged file(s)" if len(self.damaged) > 1 else ""
        return (f"{what} could not be read ({first.file} from record {first.index}: {first.reason}{more}): each "
                "damaged file is one error row (corrupt_record) in the CSV")


def header(classes: list[str], top_k: int, probabilities: bool) -> list[str]:
    """The CSV's columns: path, ok, error, topN and topN_probability for N = 1..k, then the classes if asked."""
    columns = ["path", "ok", "error"]
    for n in range(1, top_k + 1):
        columns += [f"top{n}", f"top{n}_probability"]
    if not probabilities:
        return columns
    taken = sorted(set(columns) & set(classes))
    if taken:  # a CSV reader would see one column twice, and read one of them only
        raise InputError(f"--probabilities: class {taken[0]!r} is also the name of one of the CSV's own columns "
                         f"({', '.join(columns[:5])}, ...); score without --probabilities")
    return columns + list(classes)


def _number(value: float) -> str:
    """A probability as the shortest text that reads back as the same float32."""
    return str(np.float32(value))


def infer_batch(predictor: EnsemblePredictor, batch: list[tuple[str, bytes | ImageError]],
                options: Options) -> list[Result]:
    """One result per image of a batch, in order: the service's inference path, the good images predicted in one
    call."""
    path = InferencePath(direct(predictor), options.max_pixels, max(m.image_size for m in predictor.members),
                         options.downscale_pixels)
    return asyncio.run(path.infer([EncodedImage.of(name, data) for name, data in batch]))


def score_batch(predictor: EnsemblePredictor, batch: list[tuple[str, bytes | ImageError]], options: Options,
                top_k: int) -> list[list[str]]:
    """CSV rows for a batch (infer_batch's results)."""
    results = infer_batch(predictor, batch, options)
    classes, blank = predictor.classes, [""] * (2 * top_k + (len(predictor.classes) if options.probabilities else 0))
    rows = []
    for (shown_path, _), result in zip(batch, results, strict=True):
        if isinstance(result, ImageError):
            rows.append([shown_path, "false", f"{result.kind}: {result.message}"] + blank)
            continue
        probs = result.blended
        row = [shown_path, "true", ""]
        for c in np.argsort(-probs)[:top_k]:  # the service's order, ties included
            row += [classes[int(c)], _number(probs[c])]
        rows.append(row + ([_number(p) for p in probs] if options.probabilities else []))
    return rows


class Progress:
    """A line on stderr every few seconds while scoring: count/total, failures, images per second."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None) -> None:
        """Start the clock."""
        self.total, self.quiet, self.stream = total, quiet, stream or sys.stderr
        self.start = self.last = time.perf_counter()

    def update(self, done: int, failed: int) -> None:
        """Report `done` images so far, at most every PROGRESS_SECONDS (the summary line ends the run)."""
        now = time.perf_counter()
        if self.quiet or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(f"  {done}/{self.total} images, {failed} failed, {rate:.1f} images/s", file=self.stream, flush=True)


def score(predictor: EnsemblePredictor, inputs: Inputs, out: str | Path, options: Options, overwrite: bool = False,
          quiet: bool = True) -> Summary:
    """Score every input into the CSV `out` (temporary file beside it, renamed into place when complete)."""
    out = Path(out)
    check_out(out, overwrite)
    size = max(m.image_size for m in predictor.members)
    top_k = min(options.top_k, len(predictor.classes))
    columns = header(predictor.classes, top_k, options.probabilities)  # refused before any image is read
    summary = Summary(records=count_records(inputs, size))
    progress = Progress(count_images(inputs, size), quiet)

    def rows() -> Iterator[list[str]]:
        for batch in batches(iter_images(inputs, size, options.max_image_bytes), options.batch_size):
            summary.damaged += [data for _, data in batch if isinstance(data, DamagedFile)]
            for row in score_batch(predictor, batch, options, top_k):
                summary.count(row)
                yield row
            progress.update(summary.rows, summary.failures)

    write_rows(out, columns, rows(), overwrite)
    summary.seconds = time.perf_counter() - progress.start
    return summary


def write_rows(out: Path, columns: list[str], rows: Iterable[list[str]], overwrite: bool) -> None:
    """Write the CSV: the header, then the rows as they come, to a temporary file renamed into place when complete
    (an --out that appeared meanwhile is left as it is, unless overwrite)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)

    try:
        write_atomic(out, write, overwrite)
    except FileExistsError:
        raise InputError(f"--out {shown(str(out))} appeared while scoring; it was left as it is (pass --overwrite "
                         "to replace it)") from None


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that exists (unless overwrite), is a folder, or whose folder does not exist or take files."""
    check_output_file(out, "--out", overwrite)


# --- the model -----------------------------------------------------------------------------------------------


def model_kind(path: str) -> str:
    """'ensemble' or 'run' for what ENSEMBLE_OR_RUN names; InputError when it is neither or not there."""
    target = Path(path)
    if not os.path.lexists(target):
        raise InputError(f"{shown(path)} not found")
    if target.is_file() or is_ensemble_directory(target):
        return "ensemble"
    if is_run_directory(target):
        return "run"
    raise InputError(f"{shown(path)} is neither an ensemble directory (ensemble.json) nor a run directory "
                     "(member.json and saved_model/)")


def model_facts(path: str) -> tuple[list[str], int]:
    """The class names and the largest member's input size of ENSEMBLE_OR_RUN, from its JSON files (no TensorFlow:
    what a Beam launcher needs before its workers load the model)."""
    if model_kind(path) == "run":
        classes = read_json_file(Path(path) / CLASSES_FILE)
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ArtifactError(f"{Path(path) / CLASSES_FILE} must be a list of class names")
        return [c.strip() for c in classes], read_member(path).image_size
    ensemble = read_ensemble(path)
    sizes = []
    for entry in ensemble.members:
        run_dir = entry.run_dir(ensemble.path)
        if not run_dir.is_dir():
            raise ArtifactError(f"{ensemble.path}: members[{entry.index}] ({entry.name!r}): run directory not found: "
                                f"{run_dir}")
        sizes.append(read_member(run_dir).image_size)
    if not sizes:
        raise ArtifactError(f"{ensemble.path} names no members")
    return list(ensemble.classes), max(sizes)


def load_predictor(path: str, runtime: str = TENSORFLOW, tta: int = 1) -> EnsemblePredictor:
    """Load, check and warm up an ensemble (directory or ensemble.json) or a run directory, each member's pixel model
    on `runtime` (service.runtimes) with `tta` passes per image."""
    load = load_ensemble if model_kind(path) == "ensemble" else load_run
    return load(path, tta=tta, runtime=runtime)


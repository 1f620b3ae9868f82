"""The file contract between the parts (docs/ARCHITECTURE.md), each fact stated once; TensorFlow-free.

The data folder: `<data>/tfrecords-jpeg-<S>x<S>/{train,val,test}/*.tfrec` of `tf.train.Example` records
with the features named here, `classes.json`, and for imports `import_report.json` and `test_answers.csv`.
A run directory holds `member.json` (core.members), an ensemble directory `ensemble.json`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")

SIZE_FOLDER = re.compile(r"tfrecords-jpeg-(\d+)x(\d+)$")
SIZE_FOLDER_GLOB = "tfrecords-jpeg-*x*"  # every size folder, as a glob pattern (listing a remote data folder)
COUNT_IN_NAME = re.compile(r"-(\d+)\.tfrec$")
RECORD_SUFFIX = ".tfrec"

# The features of one record (a tf.train.Example): JPEG bytes, the int64 label (train and val), the id (bytes).
IMAGE_FEATURE = "image"
CLASS_FEATURE = "class"
ID_FEATURE = "id"
MISSING_CLASS = -1  # the label of a record read as labelled that has none (refused by the pipeline)

# Every JPEG decode of the project (records in training, photos in the service and the SavedModel) uses the
# accurate integer IDCT: it gives PIL's pixels (the import tool's decoder) exactly, where TensorFlow's default
# (INTEGER_FAST) is 1 grey level off on average, and it is no slower.
JPEG_DCT = "INTEGER_ACCURATE"

CLASSES_FILE = "classes.json"
IMPORT_REPORT_FILE = "import_report.json"
TEST_ANSWERS_FILE = "test_answers.csv"
MEMBER_FILE = "member.json"
ENSEMBLE_FILE = "ensemble.json"
SAVED_MODEL_DIR = "saved_model"
COMPETITION_CLASSES_FILE = Path(__file__).with_name("competition_classes.json")


def join(*parts: str) -> str:
    """Join path parts for local paths and `gs://` URLs alike."""
    return "/".join(p.rstrip("/") for p in parts if p)


def size_folder_name(size: int) -> str:
    """The name of the folder that holds the records of one image size."""
    return f"tfrecords-jpeg-{size}x{size}"


def folder_size(name: str) -> int | None:
    """The image size a folder name stands for (`tfrecords-jpeg-S x S`), None for any other name."""
    match = SIZE_FOLDER.match(name.rstrip("/"))
    if match is None or match.group(1) != match.group(2):
        return None
    return int(match.group(1))


def count_in_name(path: str) -> int | None:
    """The record count a `-<count>.tfrec` file name states, None when the name states none."""
    match = COUNT_IN_NAME.search(path)
    return int(match.group(1)) if match else None


def record_id_fallback(path: str, index: int) -> str:
    """The id of a record that has none: `<file stem>-<index in file>` (the training pipeline forms the same in
    the graph, training.data.dataset)."""
    stem = path.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{stem.removesuffix(RECORD_SUFFIX)}-{index}"


def choose_size(sizes: list[int], wanted: int | None) -> int:
    """The one rule for which stored size a reader takes: the smallest at least `wanted`, else the largest.

    A reader that wants full resolution (the overlap check) passes None and gets the largest."""
    if not sizes:
        raise ValueError("no stored sizes to choose from")
    ordered = sorted(sizes)
    larger = [s for s in ordered if wanted is not None and s >= wanted]
    return larger[0] if larger else ordered[-1]


def competition_classes() -> list[str]:
    """The 104 'Petals to the Metal' class names in label order, stripped."""
    return [n.strip() for n in json.loads(COMPETITION_CLASSES_FILE.read_text())]


def class_name_problem(names: list[str]) -> str | None:
    """Why these names cannot be one data set's classes, None when they can: every part shows and compares a class
    name stripped of surrounding spaces (as the competition's own are), so none may be empty once stripped and no
    two may be one name once stripped."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.strip()
        if not key:
            return f"class name {name!r} is empty once its surrounding spaces are stripped"
        if key in seen:
            return (f"class names {seen[key]!r} and {name!r} are one class, {key!r}, once their surrounding spaces "
                    "are stripped")
        seen[key] = name
    return None


@dataclass(frozen=True)
class SplitSpec:
    """A `DATA:SPLIT` argument: a data folder and the name of one of its splits."""

    data: str
    split: str

    def __str__(self) -> str:
        return f"{self.data}:{self.split}"


SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+$")


def parse_split_spec(spec: str) -> SplitSpec | None:
    """`DATA:SPLIT` as a SplitSpec when DATA is an existing folder and SPLIT a plain name; None otherwise.

    The one rule: the text after the last colon is a split when it is a plain name (letters, digits, `_.-`) and
    the text before it is a folder; so `photos/`, `C:/x`, `a:b/c` and a folder whose own name holds a colon are
    not split specs."""
    if os.path.isdir(spec):
        return None
    data, sep, split = spec.rpartition(":")
    if not sep or not data or not SPLIT_NAME.match(split) or not os.path.isdir(data):
        return None
    return SplitSpec(data, split)


def local_size_folders(data: str | Path) -> dict[int, Path]:
    """The `tfrecords-jpeg-<S>x<S>` folders of a local data folder by size (OSError when it cannot be listed)."""
    found = {}
    for name in os.listdir(data):
        size = folder_size(name)
        if size is not None and os.path.isdir(os.path.join(data, name)):
            found[size] = Path(data, name)
    return dict(sorted(found.items()))


def is_data_folder(folder: str | Path) -> bool:
    """Whether a local folder is a data folder: classes.json and at least one size folder."""
    root = Path(folder)
    try:
        return (root / CLASSES_FILE).is_file() and bool(local_size_folders(root))
    except OSError:
        return False

"""A folder of unlabeled photos as records a distilled student trains on (`flower distil --unlabeled FOLDER`).

The photos (core.photos' walk: every photo under the folder, in name order) are made squares as `flower import`
makes them (the fit of the training data, Lanczos, JPEG quality 95 at 4:4:4) at the student's record size and
written as the `test` split (records without labels) of a data folder of their own; each record's id is the
photo's path relative to the folder. Both the teacher and the student then read the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from core.contract import size_folder_name
from core.errors import DataError
from core.files import Unit
from core.names import shown
from core.photos import DEFAULT_MAX_PIXELS, PhotoError, load_rgb, walk_photos
from imaging.records import Record, write_split
from training.data.importer.squares import encode, fit_square

Log = Callable[[str], None]
UNLABELED_SPLIT = "test"  # the split of records without labels
RECORDS = Unit(lambda entry: entry.name.startswith("tfrecords-jpeg-"), "unlabeled records folder")


def write_unlabeled_records(folder: Path, out: Path, size: int, fit: str, log: Log = print) -> str:
    """Write every photo under `folder` as a size x size record of the data folder `out` (replaced as a whole);
    returns the DATA:SPLIT of the records. DataError when no photo can be read."""
    photos = walk_photos(folder).photos
    skipped: list[str] = []

    def records() -> Iterator[Record]:
        for path in photos:
            try:
                square = fit_square(load_rgb(path, DEFAULT_MAX_PIXELS), size, fit)
            except (PhotoError, OSError) as err:
                skipped.append(f"{shown(str(path))}: {err}")
                continue
            yield Record(encode(square, size), path.relative_to(folder).as_posix())

    def write(stage: Path) -> None:
        if not write_split(str(stage / size_folder_name(size) / UNLABELED_SPLIT), size, records()):
            raise DataError(f"no photo under {shown(str(folder))} could be read as an unlabeled image"
                            + (f" ({len(skipped)} skipped, e.g. {skipped[0]})" if skipped else ""))

    RECORDS.publish(out, write, lambda strangers: DataError(f"{out} holds {strangers}: not records of unlabeled "
                                                             "photos; name another output"))
    log(f"unlabeled: {len(photos) - len(skipped)} photos of {shown(str(folder))} as {size}x{size} records ({fit}) "
        f"in {out}" + (f"; skipped {len(skipped)}, e.g. {skipped[0]}" if skipped else ""))
    return f"{out}:{UNLABELED_SPLIT}"

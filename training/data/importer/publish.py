"""The import's output as one unit: staged inside OUT, swapped in for the old data set, a killed swap recovered."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from core.contract import CLASSES_FILE, IMPORT_REPORT_FILE, SIZE_FOLDER, TEST_ANSWERS_FILE
from core.errors import DataError
from core.files import folder_lock
from core.names import shown

OUTPUT_FILES = (CLASSES_FILE, TEST_ANSWERS_FILE, IMPORT_REPORT_FILE)
STAGING, NEW, OLD, INCOMING = ".import-staging", ".import-new", ".import-old", ".import-incoming"


def _output_names(out: Path) -> list[str]:
    """The entries of OUT that belong to its data set (size folders, classes.json, ...), sorted."""
    if not out.is_dir():
        return []
    return sorted(name for name in os.listdir(out) if name in OUTPUT_FILES or SIZE_FOLDER.match(name))


def _listed(names: Sequence[str], most: int = 8) -> str:
    """Names joined with commas, the first `most` of them."""
    names = [shown(str(name)) for name in names]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def refuse_existing(out: Path, overwrite: bool, classes: list[str], sizes: Sequence[int]) -> None:
    """Without overwrite, refuse a folder that already holds a data set, naming what is there."""
    names = _output_names(out)
    if overwrite or not names:
        return
    there = []
    if CLASSES_FILE in names:
        try:
            old = json.loads((out / CLASSES_FILE).read_text())
            there.append(f"classes {_listed(old)} in classes.json" if isinstance(old, list) else
                         "classes.json (not a list of classes)")
        except (OSError, ValueError):
            there.append("classes.json (unreadable)")
    there += [name for name in names if name != CLASSES_FILE]
    raise DataError(f"{out} already holds a data set ({'; '.join(there)}); this import writes classes "
                    f"{_listed(classes)} at {', '.join(f'{s}x{s}' for s in sizes)}: pass overwrite=True "
                    "(--overwrite) to replace the whole data set, or import into another folder")


def locked(out: Path) -> AbstractContextManager[None]:
    """Hold OUT's import lock (an flock on the folder; released when the process ends, even when it is killed)."""
    return folder_lock(out, f"another import (or flower demo-data) is writing to {out} right now; wait for it to "
                            "end and try again")


def publish(out: Path, stage: Callable[[Path], None], overwrite: bool, classes: list[str], sizes: Sequence[int],
             progress: bool) -> None:
    """Write the whole data set into OUT/.import-staging, then swap it in for the old one (see _swap)."""
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        recover(out, progress)
        refuse_existing(out, overwrite, classes, sizes)
        staging = out / STAGING
        staging.mkdir()
        try:
            stage(staging)
            os.replace(staging, out / NEW)  # complete: from here on it can be swapped in
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap(out)


def _swap(out: Path) -> None:
    """Move the old data set aside into .import-old, rename .import-new to .import-incoming, move its entries into
    OUT, and remove the emptied .import-incoming (the commit); only then delete the old data set. On a failure the
    old data set is put back at once; after a kill, recover does it on the next import."""
    old, incoming = out / OLD, out / INCOMING
    try:
        old.mkdir()
        for name in _output_names(out):
            os.replace(out / name, old / name)
        os.replace(out / NEW, incoming)
        for name in sorted(os.listdir(incoming)):
            os.replace(incoming / name, out / name)
        os.rmdir(incoming)  # the commit: the new data set is complete and in place
    except BaseException as err:  # a failure, or Ctrl-C: put the old data set back now
        try:
            recover(out, progress=False)
        except Exception as second:
            raise DataError(f"the import could not move its data into place in {out} ({err}), nor put the earlier "
                            f"data back ({second}); it is in {old}, and the next import into {out} puts it "
                            "back") from err
        if not isinstance(err, Exception):
            raise
        raise DataError(f"the import could not move its data into place in {out} ({err}); the earlier data is "
                        "back in place") from err
    try:
        shutil.rmtree(old)
    except OSError as err:
        print(f"note: the earlier data in {old} could not be deleted ({err}); the next import into {out} deletes "
              "it", file=sys.stderr)


def recover(out: Path, progress: bool) -> None:
    """Finish or undo an import killed while staging or swapping, from what is on disk (see _swap).

    .import-staging: a partial stage, deleted. .import-incoming: killed before the commit, the new entries moved in
    so far go back to it, it becomes .import-new again; then .import-new: the old entries in .import-old go back
    into OUT and the new data set is deleted. .import-old alone: killed after the commit, while the old data set
    was deleted: deleted. Each step can be killed and redone."""
    old, new, incoming = out / OLD, out / NEW, out / INCOMING
    staged = os.path.lexists(out / STAGING)
    undone, finished = os.path.lexists(new) or os.path.lexists(incoming), os.path.lexists(old)
    if staged:
        _remove(out / STAGING)
    if incoming.is_dir():
        for name in _output_names(out):  # all new: every old entry was moved aside before .import-incoming existed
            os.replace(out / name, incoming / name)
        os.replace(incoming, new)
    if os.path.lexists(new):
        if old.is_dir():
            for name in sorted(os.listdir(old)):
                os.replace(old / name, out / name)
            os.rmdir(old)
        _remove(new)
    elif os.path.lexists(old):
        _remove(old)
    if progress and (staged or undone or finished):
        what = ("undone: the earlier data set is back in place" if undone else
                "finished: its data set was in place, the earlier one left behind is deleted" if finished else
                "cleaned up: the earlier data set was not touched")
        print(f"  an interrupted import into {out} was {what}", flush=True)


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

"""Writing files and folders so that readers, and a process killed at any point, never see half of one.

- `write_atomic`: a file written under a temporary name beside it, flushed to disk, renamed into place.
- `publish_folder`: a folder written as a staging folder beside it and swapped in as one unit.
- `folder_lock`: an exclusive flock on a folder, released when the process ends, even when it is killed.
- `umask`: the process's file-creation mask, so files get the mode a plain open() gives.
- `zip_inflation_problem`: whether reading members of a zip (a .pth, an .npz) would inflate it too far;
  `npz_problem` adds the arrays' declared shapes of an .npz; `read_npz_arrays` loads named arrays after both checks.
- `sha256_file`: a file's SHA-256, read a MiB at a time.
- `pattern_matches`: the one rule for a command-line argument that may be a glob pattern.
TensorFlow-free; every part writes through here.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from core.errors import ConfigError, DataError
from core.names import shown

try:
    import fcntl
except ImportError:  # Windows has no fcntl: folders are then not locked
    fcntl = None

T = TypeVar("T")


def pattern_matches(argument: str) -> list[str] | None:
    """The paths a glob pattern matches, sorted (`**` spans folders); None when `argument` is no pattern: a path that
    exists is a path, whatever characters it holds, and so is one without `*`, `?` or `[`."""
    if os.path.lexists(argument) or not any(ch in argument for ch in "*?["):
        return None
    return sorted(glob.glob(argument, recursive=True))


def umask() -> int:
    """The process umask: from /proc where it is there, else by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flush a file or folder to disk; a folder on a file system that cannot is skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def is_tmp(path: Path) -> bool:
    """A temporary file of write_atomic (`.<name>.<random>.tmp`, or `.tmp.<suffix>`), left by a killed write."""
    name = path.name
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name) and path.is_file()


def _writer_tag() -> str:
    """This process as write_atomic names it in a temporary file: `<host hash>-<pid>`."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}-{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether a process of this host has this id (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_tmps(path: Path, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporary files that killed writes of `path` left beside it: write_atomic names them
    `.<name>.<host hash>-<pid>.<8 random><suffix>`, and one of this host whose process is gone is stale (one of
    another host, or of a live process, is kept: it may be being written). Returns the removed ones; POSIX only."""
    if os.name != "posix" or not path.parent.is_dir():
        return []
    host = _writer_tag().split("-")[0]
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([0-9a-f]{{8}})-(\d+)\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    removed = []
    for tmp in path.parent.iterdir():
        match = pattern.fullmatch(tmp.name)
        if match is None or match.group(1) != host or _alive(int(match.group(2))) or not is_tmp(tmp):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to remove: the write goes on beside it
            pass
    return removed


def write_atomic(path: str | Path, write: Callable[[str], None], overwrite: bool = True, suffix: str = ".tmp") -> Path:
    """Call `write(tmp_path)` and rename the result onto path, so readers never see a partial file.

    The file gets the mode a plain open() would give (0666 less the umask, not mkstemp's 0600) and is
    flushed to disk before the rename. Without `overwrite`, FileExistsError (path kept as it is) when path
    exists, also when it appeared while writing. `suffix` ends the temporary name (a writer that insists on
    its own, e.g. Keras's `.weights.h5`). An OSError names `path`, not the temporary file. Temporary files of
    earlier writes of `path` whose process is gone (kill -9, a power cut) are removed first (remove_stale_tmps).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmps(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        if not publish_file(tmp, path, overwrite):
            raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(path))
    except OSError as err:
        if isinstance(err, FileExistsError) or err.filename not in (None, tmp):
            raise  # about another file: its own name stays
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        fsync_path(path.parent)  # the rename itself, across a power cut
    except OSError:
        pass
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_npz_atomic(path: str | Path, arrays: dict) -> Path:
    """Write arrays as an .npz atomically (to exactly this path: np.savez would append .npz to a temp name)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return write_atomic(path, write)


MAX_INFLATION = 16  # zip members written by numpy and torch are stored (1x); deflated weights or predictions, ~1-3x


def zip_inflation_problem(members: Iterable[zipfile.ZipInfo]) -> str | None:
    """Why reading these members of a zip would inflate it too far (more than MAX_INFLATION times their compressed
    bytes, plus 1 MiB: a zip bomb), from their declared sizes before any is read; None when it would not."""
    members = list(members)
    inflated, compressed = sum(m.file_size for m in members), sum(m.compress_size for m in members)
    if inflated > MAX_INFLATION * compressed + (1 << 20):
        return (f"it would inflate to {inflated} bytes, more than {MAX_INFLATION} times its {compressed} compressed "
                "bytes")
    return None


def npz_problem(archive: zipfile.ZipFile, keys: Iterable[str]) -> str | None:
    """Why loading these arrays of an .npz would take more memory than its bytes justify, from what it declares
    before any array is inflated: the zip's sizes (zip_inflation_problem) and each .npy header's shape and dtype
    against the bytes its member holds (a 300-byte file may declare a (2**40, 5) array); None when neither."""
    import numpy as np

    infos = [archive.getinfo(f"{k}.npy") for k in keys if f"{k}.npy" in archive.namelist()]
    problem = zip_inflation_problem(infos)
    if problem:
        return problem
    for info in infos:
        with archive.open(info) as member:
            try:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:  # another format: numpy's own reading judges it
                    continue
                shape, _, dtype = read_header(member)
            except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError):  # corrupt: numpy's
                # reading says so
                continue
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared > info.file_size and not dtype.hasobject:  # (object arrays are pickles: np.load refuses them)
            return f"{info.filename} declares {shape} {dtype} ({declared} bytes) in {info.file_size} bytes"
    return None


class NpzRefused(Exception):
    """An .npz whose arrays were not loaded: `problem` (they declare more than the file's bytes justify) or
    `missing` keys (with `present`, the keys it has); the caller words the error for its own file."""

    def __init__(self, problem: str | None = None, missing: Iterable[str] = (), present: Iterable[str] = ()):
        self.problem = problem
        self.missing = list(missing)
        self.present = sorted(present)
        super().__init__(problem or f"lacks {self.missing} (has {self.present})")


def read_npz_arrays(path: str | Path, keys: Iterable[str]) -> dict:
    """The named arrays of an .npz, loaded only after `npz_problem` finds nothing (NpzRefused otherwise, or when a
    key is missing); errors of reading (OSError, ValueError, BadZipFile, zlib.error, EOFError) reach the caller."""
    import numpy as np

    keys = list(keys)
    with zipfile.ZipFile(path) as archive:  # the arrays' declared sizes, before numpy inflates any
        problem = npz_problem(archive, keys)
    if problem:
        raise NpzRefused(problem)
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise NpzRefused(missing=missing, present=data.files)
        try:
            arrays = {k: data[k] for k in keys}
        except tokenize.TokenError as err:  # numpy parses a garbled .npy header with Python's tokenizer
            raise ValueError(f"a garbled .npy header ({err})") from None
    raw = [k for k, value in arrays.items() if not isinstance(value, np.ndarray)]
    if raw:  # a zip member named without .npy: numpy hands back its bytes
        raise NpzRefused(f"{raw[0]!r} is not stored as an .npy array")
    return arrays


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A zip member's bytes, inflated a piece at a time no further than its declared size: ZipFile.read inflates
    up to 1 GiB at once before it cuts the data to that size (a 256 KiB member declared 64 bytes took 0.5 GiB)."""
    with archive.open(info) as member:
        return member.read(info.file_size)


def publish_file(tmp: str | Path, out: Path, overwrite: bool) -> bool:
    """Give a complete temporary file the umask's mode and rename it onto out; False (tmp kept) when out
    appeared meanwhile and overwrite is off: no check-then-rename race where hard links exist."""
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it owner-only; a plain open() honours the umask
    if overwrite:
        os.replace(tmp, out)
        return True
    try:
        os.link(tmp, out)  # fails when out exists
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        if os.path.lexists(out):
            return False
        os.replace(tmp, out)
        return True
    os.remove(tmp)
    return True


def check_output_file(path: str | Path, option: str, overwrite: bool = True) -> Path:
    """An output file checked before any work (ConfigError naming the option): not a folder, not an existing file
    unless overwrite (nor anything but a regular file), in an existing folder that takes files (a probe file is
    made there and removed)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {shown(str(path))} is a folder; name a file, e.g. {shown(str(target / 'out'))}")
    if os.path.lexists(target) and not overwrite:
        raise ConfigError(f"{option} {shown(str(path))} exists; pass --overwrite to replace it")
    if target.exists() and not target.is_file():
        raise ConfigError(f"{option} {shown(str(path))} exists and is not a regular file")
    if not target.parent.is_dir():
        what = "is not a folder" if target.parent.exists() else "does not exist"
        raise ConfigError(f"{option} {shown(str(path))}: the folder {shown(str(target.parent))} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise ConfigError(f"{option} {shown(str(path))} cannot be written: {err.strerror or err}") from None
    os.close(fd)
    os.remove(probe)
    return target


# --- locks ------------------------------------------------------------------------------------------------


def lock_folder(folder: Path) -> int | None:
    """Open folder and take an exclusive lock on it; the open descriptor (None where locks are not supported).

    BlockingIOError when another process holds it; a file system without flock goes on unlocked."""
    fd = os.open(folder, os.O_RDONLY)
    if fcntl is None:
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # a file system without flock: the lock is only advisory anyway
        pass
    return fd


@contextmanager
def folder_lock(folder: Path, busy: str | None = None) -> Iterator[None]:
    """Hold folder's lock for the block; when another process holds it, BlockingIOError, or with `busy` a
    DataError saying so."""
    try:
        fd = lock_folder(folder)
    except BlockingIOError:
        if busy is None:
            raise
        raise DataError(busy) from None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# --- a folder as one unit: staging, swap, leftovers -------------------------------------------------------


def _leftover_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.(staging|old)-[0-9a-f]{{16}}")


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name beside out for a staging folder or the set-aside old folder."""
    return out.parent / f".{out.name}.{kind}-{secrets.token_hex(8)}"


def set_aside(out: Path) -> Path | None:
    """Rename the current folder to a fresh name beside it (None when there is none)."""
    if not out.exists():
        return None
    aside = _sibling(out, "old")
    os.rename(out, aside)
    return aside


def move_in(stage: Path, out: Path) -> None:
    """Rename a finished staging folder to the folder's own name."""
    os.rename(stage, out)


def remove_if_stale(folder: Path) -> None:
    """Remove a folder (a staging folder, a server's metrics folder) unless a live process holds its lock."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # gone meanwhile, or not ours
        return
    try:
        if fcntl is None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live process, or no flock here: kept
        shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        return
    finally:
        os.close(fd)


class Unit:
    """A folder replaced as a whole: which entries are its own (`owns`), and what to say of others."""

    def __init__(self, owns: Callable[[Path], bool], what: str = "folder") -> None:
        self.owns, self.what = owns, what

    def strangers(self, entries: list[Path]) -> list[str]:
        """Entries the folder does not own (temporary files of killed writes are its own)."""
        return sorted(p.name for p in entries if not is_tmp(p) and not self.owns(p))

    def remove_old(self, folder: Path) -> None:
        """Remove a set-aside folder: its own entries only; anything else found there is kept, with a warning."""
        for path in folder.iterdir():
            if not self.strangers([path]):
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError:
                    pass
        try:
            folder.rmdir()
        except OSError:
            import sys

            print(f"warning: kept {folder}: it holds files this {self.what} did not write (saved there meanwhile?)",
                  file=sys.stderr)

    def clean_leftovers(self, out: Path) -> None:
        """Remove what interrupted writes of `out` left beside it; put back a set-aside folder when the writer
        was killed between setting the old folder aside and renaming the new one in."""
        out = Path(out)
        if not out.parent.is_dir():
            return
        pattern = _leftover_pattern(out)
        found = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        aside = sorted((p for p in found if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
        if aside and not out.exists():
            try:
                os.rename(aside.pop(), out)
            except OSError:
                pass
        for folder in aside:
            self.remove_old(folder)
        for folder in found:
            if ".staging-" in folder.name:
                remove_if_stale(folder)
        if out.is_dir():
            for path in out.iterdir():
                if is_tmp(path):
                    try:
                        path.unlink()
                    except OSError:  # best effort: the folder is replaced as a whole anyway
                        pass

    def swap(self, stage: Path, out: Path, refuse: Callable[[list[str]], Exception]) -> None:
        """Replace out by stage: old aside, new in, old removed; the old one is put back if the new cannot go
        in. `refuse(strangers)` is raised, nothing changed, when out gained files it does not own meanwhile."""
        fsync_path(stage)
        if out.is_dir() and self.strangers(list(out.iterdir())):
            raise refuse(self.strangers(list(out.iterdir())))
        aside = set_aside(out)
        try:
            move_in(stage, out)
        except BaseException:
            if aside is not None and not out.exists():
                try:
                    os.rename(aside, out)
                except OSError:  # the next write puts it back (clean_leftovers)
                    pass
            raise
        if aside is not None:
            self.remove_old(aside)
        try:
            fsync_path(out.parent)
        except OSError:  # the swap is done; only its durability across a power cut is not forced
            pass

    def publish(self, out: Path, write: Callable[[Path], T], refuse: Callable[[list[str]], Exception]) -> T:
        """Call `write(staging_folder)`, then make the staging folder the folder `out`, as one unit.

        Leftovers of interrupted writes are removed first. On any error the staging folder is removed and
        `out` is what it was. An OSError names the file as it is named in out, not in the staging folder."""
        stage, lock = None, None
        try:
            self.clean_leftovers(out)
            stage, lock = _make_stage(out)
            result = write(stage)
            self.swap(stage, out, refuse)
            return result
        except OSError as err:
            if err.filename is None:
                raise
            raise OSError(err.errno, err.strerror or str(err), str(self.names_in(err.filename, out, stage))) from None
        finally:
            if stage is not None and stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
            if lock is not None:
                os.close(lock)

    def names_in(self, path: str | Path, out: Path, stage: Path | None) -> Path:
        """A path in the staging or a set-aside folder as the path it stands for in out."""
        shown = Path(os.path.abspath(path))
        try:
            first, *rest = shown.relative_to(out.parent).parts
            if (stage is not None and first == stage.name) or _leftover_pattern(out).fullmatch(first):
                return out.joinpath(*rest)
        except ValueError:
            pass
        return shown


def _make_stage(out: Path) -> tuple[Path, int | None]:
    """A fresh, locked staging folder beside out, with out's mode if out exists (else 0777 less the umask)."""
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(out, "staging")
    os.mkdir(stage)
    try:
        if out.is_dir():
            os.chmod(stage, stat.S_IMODE(out.stat().st_mode))
        return stage, lock_folder(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

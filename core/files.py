"""Atomic file writing: write to a temporary name beside the target, then rename into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and rename the result onto path, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only; a plain open() honours the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_npz_atomic(path: str | Path, arrays: dict) -> Path:
    """Write arrays as an .npz atomically (to exactly this path: np.savez would append .npz to a temp name)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))

"""How a name is shown: a file name on one line and as valid UTF-8, whatever bytes it holds; to a client of the
service, without the server's paths; any name as a markdown table cell (TensorFlow-free)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def shown(text: str) -> str:
    """A file name as it can be printed on one line and stored as UTF-8: bytes that are not UTF-8 and control
    characters (a newline, say) escaped (`bad\\xff.jpg`)."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL)


_PART = r"[^/\s'\"(),;:]+"  # one folder or file name, up to a space, a slash or punctuation
# A path from the root: its folders may hold single spaces ('/home/my repo/x'), the last part may not.
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~:/-])/(?:{_PART}(?: {_PART})*/)*(?:{_PART})?")
_PATH_END = r"(?=[/\s'\"(),;:]|$)"  # where a folder's name ends inside a longer text


def without_paths(text: str, folders: dict[Path, str]) -> str:
    """`text` fit to show a client who must not learn the server's paths: each of `folders` (as written, or
    absolute) replaced by the name given for it, and any other absolute path by its last part."""
    for folder, name in folders.items():
        spellings = {str(folder), str(folder.absolute()), str(folder.resolve())} - {"", "."}
        spellings |= {repr(os.fsencode(s))[2:-1] for s in spellings}  # as TensorFlow writes a path: b'/caf\xc3\xa9'
        for spelling in sorted(spellings, key=len, reverse=True):
            text = re.sub(re.escape(spelling) + _PATH_END, lambda _, name=name: name, text)
    return _ABSOLUTE_PATH.sub(lambda match: match.group().rstrip("/").rpartition("/")[2] or "/", text)


def table_cell(text: str) -> str:
    """Text as one cell of a markdown table: `|` and `\\` escaped, line breaks as spaces (a class or run name that
    holds `|` would otherwise split its row into more cells)."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())

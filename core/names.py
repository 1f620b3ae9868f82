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


# A folder's name and its slash: any characters but a slash and spaces, or words apart by single spaces without a
# quote, ';' or ':' ('/home/o'brien/runs (old)/' is one path; in "'/a/b'; ratio 1/2" the path ends at the quote).
_FOLDER = r"(?:[^/\s\x00]+|[^/\s\x00'\";:]+(?: [^/\s\x00'\";:]+)+)/"
_LAST = r"[^/\s'\"(),;:\x00]+"  # the last part, up to a space or punctuation ('/x/y.npz': ...)
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~:/\x00-])/(?:{_FOLDER})*(?:{_LAST})?")  # a path from the root
_PATH_END = r"(?=[/\s'\"(),;:]|$)"  # where a folder's name ends inside a longer text


def without_paths(text: str, folders: dict[Path, str]) -> str:
    """`text` fit to show a client who must not learn the server's paths: each of `folders` (as written, or
    absolute) replaced by the name given for it, and any other absolute path by its last part."""
    names = []
    for folder, name in folders.items():
        spellings = {str(folder), str(folder.absolute()), str(folder.resolve())} - {"", "."}
        spellings |= {repr(os.fsencode(s))[2:-1] for s in spellings}  # as TensorFlow writes a path: b'/caf\xc3\xa9'
        token = f"\x00{len(names)}\x00"  # a stand-in that no path pattern below can take for a path or a part
        names.append(name)
        for spelling in sorted(spellings, key=len, reverse=True):
            text = re.sub(re.escape(spelling) + _PATH_END, token, text)
    text = _ABSOLUTE_PATH.sub(lambda match: match.group().rstrip("/").rpartition("/")[2] or "/", text)
    return re.sub(r"\x00(\d+)\x00", lambda match: names[int(match.group(1))], text)


def table_cell(text: str) -> str:
    """Text as one cell of a markdown table: `|` and `\\` escaped, line breaks as spaces (a class or run name that
    holds `|` would otherwise split its row into more cells)."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())

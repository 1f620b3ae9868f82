"""How a name is shown: a file name on one line and as valid UTF-8, whatever bytes it holds; any name as a markdown
table cell (TensorFlow-free)."""

from __future__ import annotations

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)}


def shown(text: str) -> str:
    """A file name as it can be printed on one line and stored as UTF-8: bytes that are not UTF-8 and control
    characters (a newline, say) escaped (`bad\\xff.jpg`)."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL)


def table_cell(text: str) -> str:
    """Text as one cell of a markdown table: `|` and `\\` escaped, line breaks as spaces (a class or run name that
    holds `|` would otherwise split its row into more cells)."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())

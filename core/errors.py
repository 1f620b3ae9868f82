"""One base error for what a user can act on, with a kind; importable without TensorFlow.

A `FlowerError` is a bad input (a file, a record, a config, a request, an option) whose message names the
problem and the culprit. The commands show it as one line and exit with status 2; the service answers it
with the HTTP status of its kind (one table, service/errors.py). Any other exception is a bug and is shown
as one, with its traceback.
"""

from __future__ import annotations

import re
from enum import Enum


class Kind(str, Enum):
    """What went wrong, in words a command's exit and an HTTP status can be chosen by."""

    INVALID = "invalid"  # the input is wrong: a value, a file's content, a config, a request
    NOT_FOUND = "not_found"  # a named file, folder, model or version is not there
    CONFLICT = "conflict"  # the target exists or is in use (an output folder that holds other files, a lock)
    TOO_LARGE = "too_large"  # over a documented limit (pixels, bytes, images)
    UNAVAILABLE = "unavailable"  # cannot be had now or here (weights offline, a model not ready)


class FlowerError(Exception):
    """An error a user can act on: one line naming the problem and the culprit, its kind, and a code (a stable
    word an HTTP client matches on; the kind's own word unless a finer one is given)."""

    kind: Kind = Kind.INVALID

    def __init__(self, message: str, kind: Kind | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.code = code or self.kind.value


class DataError(FlowerError, ValueError):
    """Bad input data: the message names the problem and the file or folder at fault."""


class ConfigError(FlowerError, ValueError):
    """A bad option, config value or argument: the message names the option and the value received."""


def said(err: BaseException) -> str:
    """An exception's type and the first line of its message (a converter's or a runtime's run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def tf_reason(err: Exception) -> str:
    """The line of a TensorFlow error's message that says what went wrong, without TensorFlow's own decoration.

    A graph error starts with "Graph execution error:" and where it was detected; the reason is the first line
    that is neither a heading (ending in ":") nor a node or stack line. TensorFlow's `{{function_node ...}}`
    prefix and `[Op:...] name: ...` suffix are removed; a path that merely contains braces or brackets is kept.
    """
    text = str(getattr(err, "message", None) or err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.endswith(":") and not line.startswith(("[[", "Detected at", "<"))]
    line = (reasons or lines or [""])[0]
    line = re.sub(r"^(\{\{function_node [^}]*\}\}\s*)+", "", line)
    return re.sub(r"\s*\[Op:\w+\](\s*name:.*)?$", "", line).strip()

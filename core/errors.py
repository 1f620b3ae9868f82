"""Errors of the training part that name the culprit; importable without TensorFlow."""

from __future__ import annotations

import re


class DataError(ValueError):
    """Bad input data: the message names the problem and the file or folder at fault."""


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

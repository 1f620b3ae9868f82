"""Errors of the training part that name the culprit; importable without TensorFlow."""

from __future__ import annotations

import re


class DataError(ValueError):
    """Bad input data: the message names the problem and the file or folder at fault."""


def tf_reason(err: Exception) -> str:
    """The first line of a TensorFlow error's message without its graph node names ({{function_node ...}}, [Op:...])."""
    text = str(getattr(err, "message", None) or err)
    first = (text.splitlines() or [""])[0]
    return re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", first).strip()

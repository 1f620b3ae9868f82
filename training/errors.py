"""Errors of the training part that name the culprit; importable without TensorFlow."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the problem and the file or folder at fault."""

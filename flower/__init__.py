"""The `flower` command: one entry point for the toolkit's training, ensemble and service parts."""

from __future__ import annotations


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("flower-ensemble")
    except PackageNotFoundError:
        return "0+unknown"

"""Command-line `key=value` overrides, with values read as TOML (numbers, booleans, lists, strings)."""

from __future__ import annotations

import sys
from typing import Any

from core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_value(text: str) -> Any:
    """Read one value as TOML (`3`, `0.5`, `true`, `[0.1, 0.3]`, `"x"`); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """Turn ['a=1', 'b.c=true'] into {'a': 1, 'b.c': True}; a malformed item is a ValueError naming it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = parse_value(value.strip())
    return out

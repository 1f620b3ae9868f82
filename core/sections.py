"""Typed config sections from TOML tables: unknown keys and wrong types name the option (TensorFlow-free)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from core.errors import ConfigError

TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _coerce(expected: str, value: Any, where: str) -> Any:
    """Check a value against a field's annotation (ints are accepted for floats, lists for tuples)."""
    pair = re.fullmatch(r"tuple\[(\w+), (\w+)\]", expected)
    if pair:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ConfigError(f"{where}: expected a pair [{pair.group(1)}, {pair.group(2)}], got {value!r}")
        return tuple(_coerce(pair.group(i + 1), v, f"{where}[{i}]") for i, v in enumerate(value))
    kind = TYPES.get(expected)
    if kind is None:
        raise TypeError(f"{where}: no coercion for type {expected}")  # a new field type needs a rule here
    if isinstance(value, bool) and expected != "bool" or not isinstance(value, kind):
        hint = " (quote text that looks like a number: --set 'name=\"2024\"')" if expected == "str" else ""
        raise ConfigError(f"{where}: expected {expected}, got {value!r}{hint}")
    if expected == "float" and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value) if expected == "float" else value


def section_from_dict(cls: type, values: Any, section: str) -> Any:
    """Build one config section from a table: unknown keys and wrong types name the option."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {[f'{section}.{u}' for u in unknown]}; [{section}] knows "
                          f"{sorted(fields)}")
    return cls(**{k: _coerce(fields[k], v, f"{section}.{k}") for k, v in values.items()})

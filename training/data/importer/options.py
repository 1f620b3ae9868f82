"""The import's options, checked before anything is read, with the names the API and the command use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.errors import ConfigError
from core.members import FIT_MODES
from core.photos import DEFAULT_MAX_PIXELS, check_max_pixels
from training.data.near_duplicates import (
    DEFAULT_DISTANCE,
    check_distance,
)

MAX_SIZE = 4096  # the largest square written (each photo is held in memory at the largest size)


API_NAMES = {"sizes": "sizes", "val": "val_fraction", "test": "test_fraction", "records": "records_per_file",
             "fit": "fit", "distance": "near_duplicate_distance", "max_pixels": "max_pixels"}


CLI_NAMES = {"sizes": "--sizes", "val": "--val", "test": "--test", "records": "--records-per-file", "fit": "--fit",
             "distance": "--near-duplicate-distance", "max_pixels": "--max-pixels"}


def check_import_options(sizes: Sequence[int], val_fraction: float, test_fraction: float, records_per_file: int,
                         fit: str = "crop", names: dict[str, str] = API_NAMES,
                         near_duplicate_distance: int | None = DEFAULT_DISTANCE,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse options an import cannot use, before anything is read or written (ConfigError naming the option)."""
    check_distance(near_duplicate_distance, names["distance"])
    check_max_pixels(max_pixels, names["max_pixels"])
    if fit not in FIT_MODES:
        raise ConfigError(f"{names['fit']} must be one of {FIT_MODES}, got {fit!r}")
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 8 for s in sizes):
        raise ConfigError(f"{names['sizes']} must be a non-empty list of whole numbers >= 8, got {sizes}")
    if max(sizes) > MAX_SIZE:
        raise ConfigError(f"{names['sizes']} allows squares up to {MAX_SIZE}, got {sizes}")
    twice = [s for i, s in enumerate(sizes) if s in sizes[:i]]
    if twice:
        raise ConfigError(f"{names['sizes']} lists {twice[0]} twice")
    if isinstance(records_per_file, bool) or not isinstance(records_per_file, int | np.integer) \
            or records_per_file < 1:
        raise ConfigError(f"{names['records']} must be a whole number >= 1, got {records_per_file!r}")
    for key, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"{names[key]} must be a fraction above 0 and below 1 (training needs train, val and "
                             f"test images), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"{names['val']} + {names['test']} must be below 1 to leave training images, "
                         f"got {val_fraction} + {test_fraction}")

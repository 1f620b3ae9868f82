"""What an import did: counts, skipped files with their reasons, duplicate groups, warnings (import_report.json)."""


from __future__ import annotations

from dataclasses import dataclass, field

from core.photos import DEFAULT_MAX_PIXELS
from training.data.near_duplicates import (
    DEFAULT_DISTANCE,
)


@dataclass
class ImportReport:
    """What an import did: classes, counts per split and class, and every skipped file with the reason."""

    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    near_duplicate_distance: int | None = DEFAULT_DISTANCE  # None: exact copies only
    duplicates: dict[str, int] = field(default_factory=dict)  # counts of the groups below
    duplicate_groups: list[dict] = field(default_factory=list)  # files, classes, kind, distance, split
    exact_only: list[str] = field(default_factory=list)  # files whose hash says nothing (flat): grouped by bytes
    targets: dict[str, dict[str, int]] = field(default_factory=dict)  # val and test count each class aims at
    warnings: list[str] = field(default_factory=list)  # label conflicts, classes short of a val/test target
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images were skipped without being decoded
    fit: str = "crop"  # how each photo became a square (imaging.geometry: runs and the service read it)
    filter: str = "lanczos"  # the antialiased resize filter (PIL); the service uses TensorFlow's lanczos3

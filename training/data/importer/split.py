"""The import's split: stratified by class, seeded, whole duplicate groups to one split."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from core.errors import DataError


def image_id(relative_path: str, taken: set[str]) -> str:
    """A stable id from the file's path under the source (9 hex digits, longer only on a clash); a name that is not
    valid UTF-8 is hashed as the bytes it is on disk."""
    digest = hashlib.sha1(os.fsencode(relative_path)).hexdigest()
    for length in range(9, len(digest) + 1):
        if digest[:length] not in taken:
            taken.add(digest[:length])
            return digest[:length]
    raise DataError(f"cannot make a unique id for {relative_path}")


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int,
    groups: Sequence[int] | None = None,
) -> dict[str, list[int]]:
    """Indices per split, every class split in the same proportions (at least one train image each).

    With `groups` (a group id per item), items of one group stay in one split: each group of a class draws
    its split at random in the class's proportions and goes there if it fits the remaining count (else to
    train), the single items then fill test and val to their exact counts in a random order, and a split
    still short takes the train group that brings it closest. Without duplicates this is the plain per-class
    shuffle cut at the exact counts, drawing the same random numbers. A group spanning classes goes to train.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val/test fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    units, conflicts = _class_units(labels, groups)
    out: dict[str, list[int]] = {"train": list(conflicts), "val": [], "test": []}
    for label in np.unique(labels):
        n_val, n_test = split_targets(int(np.sum(labels == label)), val_fraction, test_fraction)
        order = rng.permutation(len(units[label]))
        placed = _place_units([units[label][k] for k in order], {"test": n_test, "val": n_val},
                              int(sum(labels[i] == label for i in conflicts)), rng)
        for split in ("test", "val", "train"):
            out[split] += [i for unit in placed[split] for i in unit]
    return {k: rng.permutation(v).tolist() for k, v in out.items()}


def split_targets(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """A class's (val, test) counts for `total` images: the rounded fractions, leaving one or more for train."""
    n_test = int(round(total * test_fraction))
    n_val = int(round(total * val_fraction))
    while n_test + n_val >= total and n_test + n_val > 0:  # keep one training image per class
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _class_units(labels: np.ndarray, groups: Sequence[int] | None) -> tuple[dict[int, list[list[int]]], list[int]]:
    """Each class's groups (lists of indices, in order of their first index), and the items of mixed groups."""
    units: dict[int, list[list[int]]] = {int(label): [] for label in np.unique(labels)}
    if groups is None:
        for i, label in enumerate(labels.tolist()):
            units[label].append([i])
        return units, []
    if len(groups) != len(labels):
        raise ValueError(f"groups must give one group per item: {len(groups)} groups for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for i, group in enumerate(np.asarray(groups).tolist()):
        members.setdefault(group, []).append(i)
    mixed = {g for g, items in members.items() if len({int(labels[i]) for i in items}) > 1}
    for group, items in sorted(members.items(), key=lambda item: item[1][0]):
        if group not in mixed:
            units[int(labels[items[0]])].append(items)
    return units, sorted(i for g in mixed for i in members[g])


def _place_units(units: list[list[int]], targets: dict[str, int], fixed_train: int,
                 rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Assign a class's groups (in the given order) to test, val, train, as close to the targets as they allow."""
    placed: dict[str, list[list[int]]] = {"test": [], "val": [], "train": []}
    count = {"test": 0, "val": 0, "train": 0}
    total = sum(map(len, units)) + fixed_train
    for unit in (u for u in units if len(u) > 1):  # a group: a split drawn in proportion, if the group fits there
        draw = rng.random() * total
        split = "test" if draw < targets["test"] else "val" if draw < targets["test"] + targets["val"] else "train"
        split = split if split == "train" or count[split] + len(unit) <= targets[split] else "train"
        placed[split].append(unit)
        count[split] += len(unit)
    for unit in (u for u in units if len(u) == 1):  # single items: test, then val, to exactly the targets
        split = next((s for s in ("test", "val") if count[s] < targets[s]), "train")
        placed[split].append(unit)
        count[split] += 1
    for split in ("test", "val"):  # a split left short takes train groups while that brings it closer
        while True:
            spare = sum(map(len, placed["train"])) + fixed_train
            error = abs(targets[split] - count[split])
            moves = [(abs(targets[split] - count[split] - len(u)), k) for k, u in enumerate(placed["train"])
                     if abs(targets[split] - count[split] - len(u)) < error and spare - len(u) >= 1]
            if not moves:
                break
            unit = placed["train"].pop(min(moves)[1])
            placed[split].append(unit)
            count[split] += len(unit)
    return placed

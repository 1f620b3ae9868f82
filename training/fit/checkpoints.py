"""Checkpoints of a run: one folder per finished epoch, switched into place by a single rename.

    checkpoints/epoch-0003/  weights.weights.h5 (model and optimizer variables), state.json, config.json
    checkpoints/best.weights.h5   the best epoch's weights (by validation macro F1)

An epoch's files are written into `checkpoints/.epoch-0003.tmp/` and renamed to `epoch-0003/` only
when all are complete, so weights, optimizer state and state.json always agree: a kill during the
write leaves the previous epoch's folder standing. Older epoch folders are removed afterwards.
A checkpoint remembers the config it was made with; resuming with a config that changes the model,
the data or the optimisation is refused, naming the options that differ.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError, DataError, FlowerError, Kind
from core.files import is_tmp, write_atomic, write_text_atomic
from training.config import RunConfig

if TYPE_CHECKING:  # only for annotations: `flower compare` reads state.json without TensorFlow
    import keras

Log = Callable[[str], None]
EPOCH_FOLDER = re.compile(r"^epoch-(\d+)$")
HISTORY_KEYS = ("epoch", "learning_rate", "loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds")
# Options that may change between a run and its resume: how long it runs and what it writes at the end.
RESUMABLE_CHANGES = ("name", "output", "train.epochs", "train.eval_batch_size", "train.steps_per_execution",
                     "train.time_budget_minutes", "train.cluster_timeout_seconds", "data.shard", "data.fit",
                     "predict.tta", "predict.tta_seed", "export.runtimes")


@dataclass(kw_only=True)
class EpochState:
    """What an epoch folder's state.json holds: epochs finished, best validation macro F1, history, setup."""

    epoch: int  # epochs finished
    best_f1: float  # the best validation macro F1 so far (-1.0 before the first epoch)
    history: list[dict[str, float]]  # one row per finished epoch, keys HISTORY_KEYS (history.csv's columns)
    precision: str  # the Keras precision policy trained with: mixed_float16, mixed_bfloat16 or float32
    replicas: int  # the replica count trained with

    @classmethod
    def fresh(cls, precision: str, replicas: int) -> EpochState:
        """The state of a run before its first epoch."""
        return cls(epoch=0, best_f1=-1.0, history=[], precision=precision, replicas=replicas)

    def to_json(self) -> str:
        """The text of state.json."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: Path) -> EpochState:
        """Parse state.json's text; a malformed document is refused with a ValueError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source} is not valid JSON ({err})") from None
        problem = _state_problem(data)
        if problem:
            raise DataError(f"{source} is not an epoch state ({problem})")
        return cls(epoch=data["epoch"], best_f1=float(data["best_f1"]), history=data["history"],
                   precision=data["precision"], replicas=data["replicas"])

    @classmethod
    def read(cls, path: Path) -> EpochState:
        """Read a state.json file."""
        return cls.from_json(path.read_text(), path)

    def write(self, path: Path) -> None:
        """Write a state.json file atomically."""
        write_text_atomic(path, self.to_json())


def _is_number(value: Any) -> bool:
    """An int or float from JSON (true and false are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _state_problem(data: Any) -> str | None:
    """What is wrong with a parsed state.json document, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    missing = [k for k in ("epoch", "best_f1", "history", "precision", "replicas") if k not in data]
    if missing:
        return f"missing {', '.join(missing)}"
    checks = (("epoch", isinstance(data["epoch"], int) and not isinstance(data["epoch"], bool) and data["epoch"] >= 0,
               "a whole number >= 0"), ("best_f1", _is_number(data["best_f1"]), "a number"),
              ("history", isinstance(data["history"], list), "a list"),
              ("precision", isinstance(data["precision"], str), "a string"),
              ("replicas", isinstance(data["replicas"], int) and not isinstance(data["replicas"], bool)
               and data["replicas"] >= 1, "a whole number >= 1"))
    for key, ok, expected in checks:
        if not ok:
            return f"{key} is {data[key]!r}, expected {expected}"
    for i, row in enumerate(data["history"]):
        if not isinstance(row, dict) or not all(_is_number(row.get(k)) for k in HISTORY_KEYS):
            return f"history row {i} is {row!r}, expected numbers for {', '.join(HISTORY_KEYS)}"
    return None


def ensure_room_for_weights(model: keras.Model, folder: Path) -> None:
    """Refuse (OSError ENOSPC) a weights write that cannot fit: h5py crashes the process on a full disk."""
    variables = list(model.weights) + list(getattr(getattr(model, "optimizer", None), "variables", []) or [])
    needed = sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in variables) * 11 // 10 + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: writing weights needs about {needed:,} bytes, "
                      f"{free:,} free", str(folder))


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """model.save_weights through a temporary name (Keras insists on the .weights.h5 suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_room_for_weights(model, path.parent)
    write_atomic(path, model.save_weights, suffix=".tmp.weights.h5")  # a full disk leaves no partial file


def load_best_weights(model: keras.Model, checkpoints: Path) -> None:
    """Load `best.weights.h5` into a model; the optimizer state in the file (of its phase) is not wanted."""
    with warnings.catch_warnings():  # the best epoch may predate an unfreeze, or the model is not compiled
        warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
        model.load_weights(checkpoints / "best.weights.h5")


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete epoch folder under `folder` (one with its state.json), or None.

    A folder holding only the single-folder layout of earlier versions (state.json directly in it) is
    refused rather than overwritten by a fresh start.
    """
    epochs = sorted((int(m.group(1)), p) for p in folder.glob("epoch-*")
                    if (m := EPOCH_FOLDER.match(p.name)) and (p / "state.json").is_file())
    if epochs:
        return epochs[-1][1]
    if (folder / "state.json").is_file():
        raise DataError(f"{folder} holds a checkpoint in the single-folder layout of earlier versions, which this "
                         f"version does not resume; remove {folder} to start over")
    return None


def compiled_with(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> bool:
    """Whether the model was compiled with this optimizer (under float16, Keras wraps it for loss scaling)."""
    if optimizer is None:
        return False
    return model.optimizer is optimizer or getattr(model.optimizer, "inner_optimizer", None) is optimizer


def saved_epoch(folder: Path) -> int:
    """The number of epochs the newest checkpoint under `folder` has finished (0 without one)."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return 0
    return read_state(folder, checkpoint).epoch


def read_state(folder: Path, checkpoint: Path) -> EpochState:
    """The EpochState of one epoch folder under `folder`; a malformed one is refused naming the folder to remove."""
    try:
        return EpochState.read(checkpoint / "state.json")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{err}; remove {folder} to start over") from None


def save_checkpoint(folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: EpochState,
                    config: dict[str, Any]) -> Path:
    """Write epoch `state.epoch`'s weights and optimizer variables, state and config as one folder.

    A compiled model's weights file holds its optimizer's variables too (moments, iteration count).
    """
    if not compiled_with(model, optimizer):  # refused before anything is written
        raise ValueError("save_checkpoint needs the model compiled with this optimizer")
    name = f"epoch-{state.epoch:04d}"
    tmp, final = folder / f".{name}.tmp", folder / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ensure_room_for_weights(model, tmp)
        model.save_weights(tmp / "weights.weights.h5")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(tmp / "config.json", json.dumps(config, indent=1))
    state.write(tmp / "state.json")
    shutil.rmtree(final, ignore_errors=True)  # a rerun of this same epoch replaces it
    os.replace(tmp, final)
    for old in folder.iterdir():  # earlier epochs, leftovers of killed writes (folders, and files of write_atomic)
        if old != final and (EPOCH_FOLDER.match(old.name) or old.name.endswith(".tmp")) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif is_tmp(old):
            old.unlink(missing_ok=True)
    return final


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The options that differ between a checkpoint's config and this one, except those safe to change.

    An option the saved config lacks (it predates the option) counts as its default from `defaults`.
    """
    before, after = {**_flatten(defaults or {}), **_flatten(saved)}, _flatten(current)
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys
            if k not in RESUMABLE_CHANGES and _plain(before.get(k)) != _plain(after.get(k))]


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON turns one into the other)."""
    return list(value) if isinstance(value, tuple | list) else value


def check_resumable(folder: Path, config: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint made with another config; say which options differ."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return
    source = checkpoint / "config.json"
    if not source.is_file():
        return
    try:
        saved = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{source} is not valid JSON ({err}); remove {folder} to start over") from None
    changes = config_changes(saved, config, RunConfig().to_dict())
    if changes:
        raise ConfigError(f"{folder.parent} holds a run made with another config ({'; '.join(changes)}); resume with "
                          f"the same config (only {', '.join(RESUMABLE_CHANGES)} may change), or write to another "
                          f"output folder, or remove {folder} to start over")


class CheckpointMismatch(FlowerError, RuntimeError):
    """A checkpoint's weights or optimizer state do not fit the model this config builds."""

    kind = Kind.CONFLICT


def load_checkpoint(
    folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, log: Log = print
) -> EpochState | None:
    """Restore the last finished epoch, if any; returns its state."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    state = read_state(folder, checkpoint)
    if not compiled_with(model, optimizer):
        raise ValueError("load_checkpoint needs the model compiled with this optimizer")
    optimizer.build(model.trainable_variables)  # built, the optimizer's variables load from the weights file too
    try:
        model.load_weights(checkpoint / "weights.weights.h5")
    except (ValueError, OSError) as err:
        raise CheckpointMismatch(f"the checkpoint in {checkpoint} does not fit this model "
                                 f"({str(err).splitlines()[0][:200]}); it belongs to another config: remove {folder} "
                                 "to start over") from None
    log(f"resuming after epoch {state.epoch} (best validation macro F1 so far {state.best_f1:.4f})")
    return state

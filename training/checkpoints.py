"""Checkpoints of a run: model weights, optimizer variables and the run's state after each epoch.

A run's `checkpoints/` folder holds `last.weights.h5`, `optimizer.npz`, `state.json` (the finished
epoch, the best validation macro F1, the history) and `best.weights.h5` (the best epoch's weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from training.writing import write_npz_atomic, write_text_atomic

Log = Callable[[str], None]


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """model.save_weights through a temporary name (Keras insists on the .weights.h5 suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len('.weights.h5')]}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: dict) -> None:
    """Save weights, optimizer variables and state; state.json is written last and names a finished epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    save_weights_atomic(model, folder / "last.weights.h5")
    variables = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    write_npz_atomic(folder / "optimizer.npz", variables)
    write_text_atomic(folder / "state.json", json.dumps(state, indent=1))


def load_checkpoint(
    folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, log: Log = print
) -> dict | None:
    """Restore the last finished epoch, if any; returns its state."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    try:
        model.load_weights(folder / "last.weights.h5")
    except (ValueError, OSError) as err:
        raise RuntimeError(f"the checkpoint in {folder} does not fit this model ({str(err).splitlines()[0][:200]}); "
                           "it belongs to another config: remove that folder to start over") from None
    optimizer.build(model.trainable_variables)
    with np.load(folder / "optimizer.npz") as saved:
        values = [saved[f"v{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise RuntimeError(f"the checkpoint in {folder} does not match this model/optimizer; remove it to start over")
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)
    log(f"resuming after epoch {state['epoch']} (best validation macro F1 so far {state['best_f1']:.4f})")
    return state

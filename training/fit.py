"""Fit one ensemble member and write its run directory (see ARCHITECTURE.md).

Resumable: after every epoch the model weights, the optimizer state and the history are saved under
`checkpoints/`; the same command run again after a kill or a TPU preemption continues from the last
finished epoch. The best weights by validation macro F1 are kept and used for export.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from training.config import RunConfig
from training.dataset import SplitInfo, split_info, train_dataset
from training.export import (
    export_saved_model,
    folder_bytes,
    predict_split,
    weights_bytes,
    write_predictions,
)
from training.layout import load_classes
from training.metrics import classification_scores
from training.model import build_classifier, parameter_counts
from training.schedules import learning_rate, plot_schedule
from training.strategy import detect_strategy, set_precision
from training.writing import write_atomic, write_npz_atomic, write_text_atomic

# Keras warns that shuffle=True is ignored for a tf.data.Dataset: the pipeline shuffles itself.
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")

Log = Callable[[str], None]
HISTORY_FIELDS = ("epoch", "learning_rate", "loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds")
# Test hook: SIGKILL this process right after epoch N's checkpoint (to prove resuming works).
KILL_AFTER_EPOCH_ENV = "FLOWER_KILL_AFTER_EPOCH"


class StepProgress(keras.callbacks.Callback):
    """Prints progress about ten times per epoch: step, running loss, images per second."""

    def __init__(self, epoch: int, epochs: int, steps: int, batch: int, log=print) -> None:
        super().__init__()
        self.epoch, self.epochs, self.steps, self.batch, self.log = epoch, epochs, steps, batch, log
        self.every = max(1, steps // 10)

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1
        if step % self.every == 0 or step == self.steps:
            rate = step * self.batch / (time.perf_counter() - self.start)
            self.log(f"  epoch {self.epoch + 1}/{self.epochs} step {step}/{self.steps} "
                     f"loss {logs.get('loss', float('nan')):.4f} ({rate:.0f} img/s)")


def make_loss(config: RunConfig, class_weights: np.ndarray | None) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Categorical cross-entropy with label smoothing, or focal loss; optionally class-weighted."""
    t = config.train
    if t.loss == "focal":
        base = keras.losses.CategoricalFocalCrossentropy(gamma=t.focal_gamma, label_smoothing=t.label_smoothing,
                                                         reduction=None)
    else:
        base = keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing, reduction=None)
    if class_weights is None:
        return lambda y_true, y_pred: tf.reduce_mean(base(y_true, y_pred))
    weights = tf.constant(class_weights, tf.float32)
    return lambda y_true, y_pred: tf.reduce_mean(base(y_true, y_pred) * tf.linalg.matvec(y_true, weights))


def class_counts(files: tuple[str, ...], num_classes: int) -> np.ndarray:
    """Count training labels (reads the records' class feature only)."""
    spec = {"class": tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(list(files)).map(lambda r: tf.io.parse_single_example(r, spec)["class"])
    return np.bincount(np.fromiter(ds.as_numpy_iterator(), np.int64), minlength=num_classes)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, augmentation and dropout: a function of (seed, epoch) only.

    So an epoch run after a resume sees exactly what it would have seen in an uninterrupted run.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


def reseed_layers(model: keras.Model, seed: int) -> None:
    """Set the state of every random layer's seed generator (dropout) from one seed."""
    generators = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    for i, variable in enumerate(generators):
        layer_seed = np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0]
        variable.assign(np.array([layer_seed, 0], dtype=variable.dtype))


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: dict) -> None:
    """Save weights, optimizer variables and state; state.json is written last and names a finished epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    save_weights_atomic(model, folder / "last.weights.h5")
    variables = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    write_npz_atomic(folder / "optimizer.npz", variables)
    write_text_atomic(folder / "state.json", json.dumps(state, indent=1))


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """model.save_weights through a temporary name (Keras insists on the .weights.h5 suffix)."""
    tmp = path.with_name(f".{path.name[: -len('.weights.h5')]}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


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


# --- outputs ----------------------------------------------------------------------------------

def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv (one row per epoch) and curves.png."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "history.csv", buffer.getvalue())
    plot_curves(run_dir / "curves.png", history)


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss and validation accuracy / macro F1 per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [h["loss"] for h in history], marker="o", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro F1")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def versions() -> dict[str, str]:
    """Library versions recorded in member.json."""
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}


# --- the run ----------------------------------------------------------------------------------

def train_member(config: RunConfig, log: Log = print) -> Path:
    """Train, evaluate, export and predict; return the run directory."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.train.seed)
    strategy, kind = detect_strategy(log)
    policy = set_precision(config.train.mixed_precision, kind, log)
    data, size = config.data, config.data.image_size
    classes = load_classes(data.dir)
    infos = {s: split_info(data.dir, s, size, data.file_size or None) for s in ("train", "val", "test")}
    replicas = strategy.num_replicas_in_sync
    global_batch = data.batch_size * replicas
    train_count = infos["train"].count + (infos["val"].count if data.train_on_val else 0)
    steps = config.train.steps_per_epoch or max(1, train_count // global_batch)
    log(f"data: {data.dir} records {infos['train'].file_size}px -> model {size}px; train {infos['train'].count}, "
        f"val {infos['val'].count}, test {infos['test'].count}; {len(classes)} classes; "
        f"global batch {global_batch}, {steps} steps/epoch")
    if data.deterministic:
        tf.config.experimental.enable_op_determinism()

    def epoch_data(epoch: int) -> tf.data.Dataset:
        return train_dataset(data.dir, size, global_batch, augment=config.augment,
                             seed=epoch_seed(config.train.seed, epoch), file_size=infos["train"].file_size,
                             include_val=data.train_on_val, shuffle_buffer=data.shuffle_buffer,
                             num_classes=len(classes), deterministic=data.deterministic)
    weights = None
    if config.train.class_weights:
        counts = class_counts(infos["train"].files, len(classes)).astype(float)
        weights = np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0)

    with strategy.scope():
        model = build_classifier(config.model.backbone, size, len(classes), weights=config.model.weights,
                                 dropout=config.model.dropout, trainable=config.model.trainable)
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate(config.schedule, 0, config.train.epochs,
                                                                       replicas),
                                           weight_decay=config.train.weight_decay)
        model.compile(optimizer=optimizer, loss=make_loss(config, weights))
    params = parameter_counts(model)
    log(f"model: {config.model.backbone} ({config.model.weights} weights), trainable {params['trainable']:,} "
        f"parameters, frozen {params['frozen']:,}")
    plot_schedule(run_dir / "schedule.png", config.schedule, config.train.epochs, replicas)
    write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=1) + "\n")

    checkpoints = run_dir / "checkpoints"
    state = load_checkpoint(checkpoints, model, optimizer, log) or {"epoch": 0, "best_f1": -1.0, "history": []}
    history = state["history"]
    for epoch in range(state["epoch"], config.train.epochs):
        lr = learning_rate(config.schedule, epoch, config.train.epochs, replicas)
        optimizer.learning_rate.assign(lr)
        reseed_layers(model, epoch_seed(config.train.seed, epoch))
        start = time.perf_counter()
        fit = model.fit(epoch_data(epoch), initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps, verbose=0,
                        callbacks=[StepProgress(epoch, config.train.epochs, steps, global_batch, log)])
        seconds = time.perf_counter() - start
        _, val_labels, val_probs = predict_split(model, infos["val"], size, config.train.eval_batch_size,
                                                 num_classes=len(classes))
        scores = classification_scores(val_labels, val_probs)
        history.append({"epoch": epoch + 1, "learning_rate": lr, "loss": float(fit.history["loss"][-1]),
                        "val_loss": scores["loss"], "val_accuracy": scores["accuracy"],
                        "val_macro_f1": scores["macro_f1"], "seconds": round(seconds, 2)})
        improved = scores["macro_f1"] > state["best_f1"]
        if improved:
            state["best_f1"] = scores["macro_f1"]
            checkpoints.mkdir(parents=True, exist_ok=True)
            save_weights_atomic(model, checkpoints / "best.weights.h5")
        log(f"epoch {epoch + 1}/{config.train.epochs}: lr {lr:.2e} loss {history[-1]['loss']:.4f} "
            f"val_loss {scores['loss']:.4f} val_accuracy {scores['accuracy']:.4f} "
            f"val_macro_f1 {scores['macro_f1']:.4f}{' (best)' if improved else ''} [{seconds:.1f} s, "
            f"{steps * global_batch / seconds:.0f} img/s]")
        state.update(epoch=epoch + 1, history=history)
        save_checkpoint(checkpoints, model, optimizer, state)
        write_history(run_dir, history)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(epoch + 1):
            os.kill(os.getpid(), signal.SIGKILL)

    model.load_weights(checkpoints / "best.weights.h5")
    facts = RunFacts(infos, classes, params, policy, replicas, steps * global_batch)
    return finish_run(config, model, facts, history, log)


@dataclass(frozen=True)
class RunFacts:
    """What a finished run reports about its data, model and machine."""

    infos: dict[str, SplitInfo]
    classes: list[str]
    params: dict[str, int]
    policy: str
    replicas: int
    images_per_epoch: int


def finish_run(config: RunConfig, model: keras.Model, facts: RunFacts, history: list[dict], log: Log = print) -> Path:
    """Predict val/test (with TTA), export the SavedModel, write classes.json and member.json."""
    run_dir, size = config.run_dir, config.data.image_size
    infos, classes = facts.infos, facts.classes
    p = config.predict
    log(f"predicting validation and test rows (TTA {p.tta} pass{'es' if p.tta > 1 else ''})")
    val_ids, val_labels, val_probs = predict_split(model, infos["val"], size, config.train.eval_batch_size,
                                                   p.tta, p.tta_seed, len(classes))
    test_ids, _, test_probs = predict_split(model, infos["test"], size, config.train.eval_batch_size, p.tta,
                                            p.tta_seed, len(classes))
    write_predictions(run_dir / "predictions" / "val.npz", val_ids, val_probs, val_labels)
    write_predictions(run_dir / "predictions" / "test.npz", test_ids, test_probs)
    export_saved_model(model, size, run_dir / "saved_model")
    write_text_atomic(run_dir / "classes.json", json.dumps(classes, indent=1) + "\n")
    final = classification_scores(val_labels, val_probs)
    seconds_per_epoch = float(np.mean([h["seconds"] for h in history]))
    member = {
        "version": 1, "name": config.name, "backbone": config.model.backbone, "weights": config.model.weights,
        "image_size": size, "num_classes": len(classes), "parameters": facts.params, "precision": facts.policy,
        "replicas": facts.replicas, "config": config.to_dict(),
        "data": {"dir": config.data.dir, "file_size": infos["train"].file_size,
                 "counts": {s: i.count for s, i in infos.items()}},
        "versions": versions(),
        "metrics": {"val_accuracy": final["accuracy"], "val_macro_f1": final["macro_f1"], "val_loss": final["loss"],
                    "tta": p.tta},
        "timings": {"seconds_per_epoch": seconds_per_epoch,
                    "images_per_second": facts.images_per_epoch / seconds_per_epoch},
        "saved_model": {"bytes": folder_bytes(run_dir / "saved_model"), "weights_bytes": weights_bytes(model)},
    }
    write_text_atomic(run_dir / "member.json", json.dumps(member, indent=1) + "\n")
    log(f"done: validation macro F1 {final['macro_f1']:.4f}, accuracy {final['accuracy']:.4f}; wrote {run_dir}")
    return run_dir

"""Fit one ensemble member: the epoch loop, from a config to a finished run directory (see ARCHITECTURE.md).

Resumable: after every epoch the model weights, the optimizer state and the history are saved under
`checkpoints/` (training/fit/checkpoints.py); the same command run again after a kill or a TPU preemption
continues from the last finished epoch. Each epoch's data order, augmentation and dropout depend only
on (seed, epoch), so a resumed run sees what an uninterrupted one would have seen (exactly, with
`data.deterministic`). The best weights by validation macro F1 are exported (training/fit/outputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from core.contract import CLASS_FEATURE
from core.errors import ConfigError, DataError, tf_reason
from core.files import write_text_atomic
from core.members import ArtifactError, data_fit, validation_source_problem
from core.runtimes import parse_export_runtimes
from imaging.records import find_bad_record
from training.config import RunConfig, check_unfreeze_reachable, trainable_at
from training.data.dataset import SplitInfo, split_info, train_dataset
from training.data.layout import count_records, load_classes
from training.data.soft_targets import SoftTargets, soft_targets
from training.fit.checkpoints import (
    EpochState,
    check_resumable,
    load_best_weights,
    load_checkpoint,
    save_checkpoint,
    save_weights_atomic,
    saved_epoch,
)
from training.fit.cluster import WorkerLost, lost_task, this_task, worker_count, worker_index
from training.fit.distillation import distillation_loss
from training.fit.evaluation import classification_scores
from training.fit.export import predict_split
from training.fit.outputs import RunFacts, finish_run, write_history
from training.fit.runtimes import check_converters
from training.fit.schedules import learning_rate, plot_schedule
from training.fit.strategy import any_worker, detect_strategy, same_on_every_worker, set_precision, shard_policy
from training.models.model import backbone_blocks, build_classifier, features_of, parameter_counts, set_trainable

# Keras warns that shuffle=True is ignored for a tf.data.Dataset: the pipeline shuffles itself.
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")

Log = Callable[[str], None]
AfterEpoch = Callable[[int], None]


class StepProgress(keras.callbacks.Callback):
    """Prints progress about ten times per epoch: step, running loss, images per second."""

    def __init__(self, epoch: int, epochs: int, steps: int, batch: int, log: Log = print) -> None:
        super().__init__()
        self.epoch, self.epochs, self.steps, self.batch, self.log = epoch, epochs, steps, batch, log
        self.every = max(1, steps // 10)

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.reported = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1  # with steps_per_execution > 1, called once per execution (its last step)
        if step // self.every > self.reported // self.every or step == self.steps:
            self.reported = step
            rate = step * self.batch / (time.perf_counter() - self.start)
            self.log(f"  epoch {self.epoch + 1}/{self.epochs} step {step}/{self.steps} "
                     f"loss {logs.get('loss', float('nan')):.4f} ({rate:.0f} img/s)")


def make_loss(config: RunConfig, class_weights: np.ndarray | None) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-example categorical cross-entropy with label smoothing, or focal loss; optionally class-weighted.

    The loss returns one value per example, never a mean: Keras then averages over the batch and
    divides by the number of replicas, so the summed gradients of N replicas equal those of one
    replica on the same global batch. (A loss that returns its own mean is not rescaled by Keras and
    gives N times too large gradients on N replicas.)
    """
    t = config.train
    if config.distil.teacher:  # soft targets of a teacher (training.data.soft_targets)
        return distillation_loss(config.distil.temperature)
    if t.loss == "focal":
        base = keras.losses.CategoricalFocalCrossentropy(gamma=t.focal_gamma, label_smoothing=t.label_smoothing,
                                                         reduction=None)
    else:
        base = keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing, reduction=None)
    if class_weights is None:
        return lambda y_true, y_pred: base(y_true, y_pred)
    weights = tf.constant(class_weights, tf.float32)
    return lambda y_true, y_pred: base(y_true, y_pred) * tf.linalg.matvec(y_true, weights)


def class_counts(splits: list[SplitInfo], num_classes: int) -> np.ndarray:
    """Count the labels of the splits a run trains on (reads the records' class feature only)."""
    spec = {CLASS_FEATURE: tf.io.FixedLenFeature([], tf.int64)}
    files = [f for info in splits for f in info.files]
    ds = tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec)[CLASS_FEATURE])
    return np.bincount(np.fromiter(ds.as_numpy_iterator(), np.int64), minlength=num_classes)


def inverse_frequency_weights(counts: np.ndarray) -> np.ndarray:
    """Class weights n / (C * n_c): 1 for every class of a balanced set; 0 for a class never seen."""
    counts = counts.astype(float)
    return np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, augmentation and dropout: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


def reseed_layers(model: keras.Model, seed: int) -> None:
    """Set the state of every random layer's seed generator (dropout) from one seed."""
    generators = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    for i, variable in enumerate(generators):
        layer_seed = np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0]
        variable.assign(np.array([layer_seed, 0], dtype=variable.dtype))


@dataclass(kw_only=True)
class Run:
    """A run ready for its epochs: strategy, located data, compiled model and the batch arithmetic."""

    config: RunConfig
    infos: dict[str, SplitInfo]
    train_splits: list[SplitInfo]
    classes: list[str]
    model: keras.Model
    optimizer: keras.optimizers.Optimizer | None
    policy: str
    replicas: int
    global_batch: int
    steps: int
    class_weights: np.ndarray | None
    strategy: tf.distribute.Strategy
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    trainable: str  # what trains now: model.trainable, or model.unfreeze after the switch
    steps_per_execution: int
    shard: str  # off | file | data: how the training batches are split among workers
    geometry: dict  # imaging.geometry.data_fit: read once, written to member.json and the SavedModel
    targets: SoftTargets | None = None  # a distilled student's targets by record id (else the labels)

    @property
    def fit_splits(self) -> list[SplitInfo]:
        """What the epochs read: train_splits, and a distilled student's unlabeled split."""
        return splits_to_fit(self.train_splits, self.targets)

    def compile(self) -> None:
        """A fresh optimizer for the current trainable variables, and the model compiled with it."""
        with self.strategy.scope():
            self.optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=self.config.train.weight_decay)
            self.model.compile(optimizer=self.optimizer, loss=self.loss, steps_per_execution=self.steps_per_execution)
            width = len(self.classes) * (2 if self.targets is not None else 1)  # a student's targets: [soft | hard]
            build_without_data(self.model, self.config.data.image_size, len(self.classes), width)

    def set_phase(self, trainable: str, log: Log) -> None:
        """Switch what trains (head-then-unfreeze fine-tuning); the optimizer starts afresh for the new set."""
        with self.strategy.scope():
            set_trainable(features_of(self.model), trainable, self.config.model.batch_norm)
        self.trainable = trainable
        self.compile()
        params = parameter_counts(self.model)
        log(f"now training {trainable}: {params['trainable']:,} trainable parameters, frozen {params['frozen']:,}")

    def epoch_data(self, epoch: int) -> tf.data.Dataset:
        """The training batches of one epoch."""
        data, targets = self.config.data, self.targets
        return train_dataset(self.fit_splits, data.image_size, self.global_batch, num_classes=len(self.classes),
                             augment=self.config.augment, seed=epoch_seed(self.config.train.seed, epoch),
                             shuffle_buffer=data.shuffle_buffer, deterministic=data.deterministic, shard=self.shard,
                             worker=(worker_index(), worker_count()),
                             targets=None if targets is None else (targets.table(), targets.rows))


def splits_to_fit(train_splits: list[SplitInfo], targets: SoftTargets | None) -> list[SplitInfo]:
    """The splits a run's epochs read: its training splits, and a distilled student's unlabeled split if any."""
    return train_splits + ([targets.unlabeled] if targets and targets.unlabeled else [])


def build_without_data(model: keras.Model, image_size: int, classes: int, targets: int | None = None) -> None:
    """Build a compiled model's loss, metric and optimizer state from shapes, inside the strategy's scope.

    Under a distribution strategy Keras does this at every fit and predict from a batch it pulls
    from the dataset and averages across replicas, which a multi-worker strategy cannot do (it fails
    to reduce the per-replica batch) and which costs a batch of input work each time. Built here,
    that pull is skipped. `targets` is the width of a target row (default: `classes`).
    """
    if not hasattr(model, "_symbolic_build") or not hasattr(model, "_maybe_symbolic_build"):
        return  # another Keras: it builds as it does (the multi-worker test says whether that still works)
    images = keras.KerasTensor((None, image_size, image_size, 3), "float32")
    model._symbolic_build(data_batch=(images, keras.KerasTensor((None, targets or classes), "float32")))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def prepare_run(config: RunConfig, log: Log = print, start_epoch: int = 0) -> Run:
    """Pick the strategy, locate and check the data, build and compile the model.

    The model is built in the phase of the last epoch before `start_epoch` (what a checkpoint holds).
    """
    keras.utils.set_random_seed(config.train.seed)
    strategy, kind = detect_strategy(log, config.train.cluster_timeout_seconds)
    policy = set_precision(config.train.mixed_precision, kind, log)
    data, size = config.data, config.data.image_size
    classes = load_classes(data.dir)
    infos = {s: split_info(data.dir, s, size, data.file_size or None) for s in ("train", "val", "test")}
    train_splits = [infos["train"], infos["val"]] if data.train_on_val else [infos["train"]]
    targets = student_targets(config, infos, classes, log)
    fitted = splits_to_fit(train_splits, targets)
    rows = len(targets.ids) if targets else sum(i.count for i in train_splits)
    replicas = strategy.num_replicas_in_sync
    global_batch = data.batch_size * replicas
    steps = config.train.steps_per_epoch or max(1, rows // global_batch)
    trained_on = "train+val" if data.train_on_val else "train" if len(fitted) == 1 else "train+unlabeled"
    per_execution = min(config.train.steps_per_execution or (32 if kind == "tpu" else 1), steps)
    log(f"data: {data.dir} records {infos['train'].file_size}px -> model {size}px; train {infos['train'].count}, "
        f"val {infos['val'].count}, test {infos['test'].count}; fitting on {trained_on} ({rows} images); "
        f"{len(classes)} classes; global batch {global_batch}, {steps} steps/epoch, {per_execution} per execution")
    geometry = data_fit(data.dir, data.fit)  # read now: a bad import_report.json is refused before training
    log(f"photos become squares by {geometry['fit']} (from {geometry['from']}), as the service will make them")
    hosts = getattr(strategy.extended, "num_hosts", 1) if kind == "tpu" else 1
    if hosts > 1:  # a TPU pod: tf.distribute splits each batch among the input hosts
        shard = "data"
        log(f"data sharding: by data over {hosts} TPU hosts")
    else:
        files = [f for info in fitted for f in info.files]
        shard = shard_policy(data.shard, worker_count(), [count_records([f]) for f in files], log)
    if data.deterministic:
        tf.config.experimental.enable_op_determinism()
    weights = None
    if config.train.class_weights:
        weights = inverse_frequency_weights(class_counts(train_splits, len(classes)))
    trainable = trainable_at(config, max(start_epoch - 1, 0))
    with strategy.scope():
        model = build_classifier(config.model.backbone, size, len(classes), weights=config.model.weights,
                                 dropout=config.model.dropout, trainable=trainable,
                                 batch_norm=config.model.batch_norm)
    _check_blocks(config, model)
    run = Run(config=config, infos=infos, train_splits=train_splits, classes=classes, model=model, optimizer=None,
              policy=policy, replicas=replicas, global_batch=global_batch, steps=steps, class_weights=weights,
              strategy=strategy, loss=make_loss(config, weights), trainable=trainable,
              steps_per_execution=per_execution, shard=shard, geometry=geometry, targets=targets)
    run.compile()
    return run


def student_targets(config: RunConfig, infos: dict[str, SplitInfo], classes: list[str], log: Log) -> SoftTargets | None:
    """A distilled student's targets (distil.teacher), read and joined to the records before the first step; None for
    a run on the labels."""
    distil = config.distil
    if not distil.teacher:
        return None
    targets = soft_targets(distil.teacher, infos, classes, distil, config.train.label_smoothing, config.data.image_size)
    facts, unlabeled = targets.facts, targets.facts["unlabeled"]
    extra = ("" if unlabeled is None else f"; {unlabeled['trained']} of {unlabeled['rows']} unlabeled records of "
             f"{unlabeled['data']} " + (f"as pseudo-labels (teacher >= {distil.pseudo_threshold:g})"
                                         if distil.pseudo_threshold else "as soft targets"))
    log(f"distilling {facts['kind']} {facts['name']} ({facts['fingerprint'][:12]}, {distil.teacher}): soft targets at "
        f"T={distil.temperature:g} for {facts['train_rows']} training records, hard-label weight "
        f"{distil.hard_weight:g}{extra}")
    return targets


def _check_blocks(config: RunConfig, model: keras.Model) -> None:
    """model.unfreeze of the form last:N fits the backbone's block count, before epoch 1 (model.trainable is
    checked as the model is built)."""
    value = config.model.unfreeze
    if not config.model.unfreeze_epoch or not value.startswith("last:"):
        return
    blocks = len(backbone_blocks(features_of(model)))
    if int(value[5:]) > blocks:
        raise ConfigError(f"model.unfreeze={value!r} but {config.model.backbone} has only {blocks} blocks")


def run_epoch(run: Run, epoch: int, state: EpochState, log: Log) -> float:
    """Train one epoch, score it on the whole validation split, checkpoint it, write the history.

    Returns the seconds the validation pass took (what the time budget reserves for the final predictions).
    """
    config, model = run.config, run.model
    epochs, checkpoints = config.train.epochs, config.run_dir / "checkpoints"
    if trainable_at(config, epoch) != run.trainable:
        run.set_phase(trainable_at(config, epoch), log)
    lr = learning_rate(config.schedule, epoch, epochs, run.replicas, config.model.unfreeze_epoch)
    run.optimizer.learning_rate.assign(lr)
    reseed_layers(model, epoch_seed(config.train.seed, epoch))
    start = time.perf_counter()
    try:
        fit = model.fit(run.epoch_data(epoch), initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=run.steps,
                        verbose=0, callbacks=[StepProgress(epoch, epochs, run.steps, run.global_batch, log)])
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as err:  # a bad record, found in the graph
        for info in run.fit_splits:
            culprit = find_bad_record(list(info.files), info.labelled, info.file_size)
            if culprit is not None:
                raise culprit from None
        raise DataError(f"epoch {epoch + 1}: training failed: {tf_reason(err)}") from None
    seconds = time.perf_counter() - start
    loss = float(fit.history["loss"][-1])
    if not math.isfinite(loss):
        raise ConfigError(f"epoch {epoch + 1}: the training loss is {loss}: stopping before this epoch is saved (the "
                          f"checkpoint of epoch {epoch} stands); lower schedule.max (now {config.schedule.max:g}) or "
                          "make the augment options milder, then rerun")
    _, val_labels, val_probs = predict_split(model, run.infos["val"], config.data.image_size,
                                             config.train.eval_batch_size, num_classes=len(run.classes))
    val_seconds = time.perf_counter() - start - seconds
    scores = classification_scores(val_labels, val_probs)
    state.history.append({"epoch": epoch + 1, "learning_rate": lr, "loss": float(fit.history["loss"][-1]),
                             "val_loss": scores["loss"], "val_accuracy": scores["accuracy"],
                             "val_macro_f1": scores["macro_f1"], "seconds": round(seconds, 2)})
    improved = scores["macro_f1"] > state.best_f1
    if improved:
        state.best_f1 = scores["macro_f1"]
        save_weights_atomic(model, checkpoints / "best.weights.h5")
    log(f"epoch {epoch + 1}/{epochs}: lr {lr:.2e} loss {state.history[-1]['loss']:.4f} "
        f"val_loss {scores['loss']:.4f} val_accuracy {scores['accuracy']:.4f} "
        f"val_macro_f1 {scores['macro_f1']:.4f}{' (best)' if improved else ''} [{seconds:.1f} s, "
        f"{run.steps * run.global_batch / seconds:.0f} img/s]")
    state.epoch = epoch + 1
    save_checkpoint(checkpoints, model, run.optimizer, state, config.to_dict())
    write_history(config.run_dir, state.history)
    return val_seconds


@dataclass
class Budget:
    """train.time_budget_minutes: whether one more epoch, then the final predictions and export, still fit."""

    seconds: float
    started: float = field(default_factory=time.monotonic)
    epochs: list[float] = field(default_factory=list)
    finish: float = 0.0  # estimated seconds to predict val and test with TTA and export

    def record(self, epoch_seconds: float, val_seconds: float, run: Run) -> None:
        """Remember an epoch's wall time, and estimate the finish from its validation pass."""
        self.epochs.append(epoch_seconds)
        infos = run.infos
        passes = run.config.predict.tta * (1 + infos["test"].count / max(infos["val"].count, 1))
        self.finish = val_seconds * passes + 30.0  # + the SavedModel export and the small files

    def exhausted(self) -> bool:
        """True when the next epoch (as long as the longest so far) and the finish would overrun the budget."""
        if not self.seconds or not self.epochs:
            return False
        return time.monotonic() - self.started + max(self.epochs) + self.finish > self.seconds


def check_validation_source(config: RunConfig) -> None:
    """Refuse, before the first step, a data.validation_from run that flower blend would refuse to stand for this
    refit (core.members.validation_source_problem): missing, trained on val itself, other classes than the data's,
    no predictions/val.npz, or not as many validation rows as the data's validation split."""
    source, data = config.data.validation_from, config.data
    if not source:
        return
    val = split_info(data.dir, "val", data.image_size, data.file_size or None)
    try:
        problem = validation_source_problem(Path(source), load_classes(data.dir), val.count)
    except ArtifactError as err:
        problem = str(err)
    if problem:
        raise ConfigError(f"data.validation_from={source!r}: {problem}; name the finished run (trained on train "
                          f"only, on {data.dir}) that this one refits")


def train_member(config: RunConfig, log: Log = print, after_epoch: AfterEpoch | None = None) -> Path:
    """Train, evaluate, export and predict; return the run directory.

    `after_epoch(n)` is called once epoch n (1-based) is checkpointed: for progress reporting, or for
    tests that interrupt a run there.
    """
    budget = Budget(config.train.time_budget_minutes * 60)  # counts from here: the session's clock is running
    check_resumable(config.run_dir / "checkpoints", config.to_dict())
    check_validation_source(config)
    check_converters(parse_export_runtimes(config.export.runtimes))  # before the training, not after it
    chief, task = this_task()
    if chief:
        with naming_a_lost_worker(config):
            return _train(config, config, budget, log, after_epoch)
    # Another worker of a multi-worker run: it computes what the chief computes (every step is collective)
    # but writes to a folder of its own, removed at the end; it resumes from the chief's checkpoints. The
    # folder is named by the task and the run, so a worker restarted after a kill clears its predecessor's.
    key = zlib.crc32(str(config.run_dir.resolve()).encode())
    scratch = Path(tempfile.gettempdir()) / f"flower-{task.replace(' ', '')}-{key:08x}"
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"{task} (not the chief): writes go to {scratch}, removed at the end; {config.run_dir} is the chief's")
    try:
        with naming_a_lost_worker(config):
            _train(config, dataclasses.replace(config, output=str(scratch / "run")), budget, log, after_epoch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return config.run_dir


@contextmanager
def naming_a_lost_worker(config: RunConfig) -> Iterator[None]:
    """In a multi-worker run, a collective that failed because another task went away (TensorFlow's
    'tasks have crashed' or 'failed to connect') becomes one WorkerLost naming that task and the last checkpoint."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as err:
        lost = lost_task(str(err)) if worker_count() > 1 else None
        if lost is None:
            raise
        done = saved_epoch(config.run_dir / "checkpoints")
        last = (f"the last checkpoint is epoch {done} in {config.run_dir / 'checkpoints'}" if done else
                f"no epoch was checkpointed yet in {config.run_dir / 'checkpoints'} (the chief's checkpoints, "
                "where the run directory is shared)")
        raise WorkerLost(f"{lost} was lost (it stopped, was killed, or cannot be reached), so this worker stops "
                         f"too; {last}") from None


def check_resumed_setup(state: EpochState, run: Run, log: Log) -> None:
    """A resumed run on another precision is refused (the optimizer state would not load); on another
    replica count it goes on with a warning (the global batch, steps and learning rate change)."""
    saved = state.precision
    if saved != run.policy:
        raise ConfigError(f"the checkpoint was trained with precision policy {saved} and this device picks "
                          f"{run.policy}: the optimizer state would not load; resume with --set "
                          f"train.mixed_precision={saved.removeprefix('mixed_') if saved != 'float32' else 'off'}")
    replicas = state.replicas
    if replicas != run.replicas:
        log(f"warning: the checkpoint was trained on {replicas} replica(s), this run has {run.replicas}: the global "
            f"batch, the steps per epoch and the learning rate scale change from here on")
    state.replicas = run.replicas


def check_workers_agree(run: Run, config: RunConfig, state: EpochState) -> None:
    """Refuse, on every worker at once, a multi-worker run whose workers resume from different epochs or
    run different configs (a run directory not shared, another command line): gradients of different
    models would be averaged. A collective: every worker calls it at the same point."""
    document = config.to_dict()
    for key in ("name", "output"):
        document.pop(key, None)
    document["data"].pop("dir", None)  # may be mounted at another path on each machine
    document["train"].pop("cluster_timeout_seconds", None)  # each worker's own patience
    digest = zlib.crc32(json.dumps([document, run.policy], sort_keys=True).encode()) & 0xFFFFF
    same_epoch = same_on_every_worker(run.strategy, state.epoch)
    same_config = same_on_every_worker(run.strategy, digest)
    if not (same_epoch and same_config):
        what = "the epoch they resume after" if not same_epoch else "the config"
        raise ConfigError(f"the workers disagree on {what} "
                          f"(this one: epoch {state.epoch} from {config.run_dir}, config digest {digest:05x}): "
                          "start every worker with the same command, its output on storage all of them share")


def _train(config: RunConfig, writes: RunConfig, budget: Budget, log: Log, after_epoch: AfterEpoch | None) -> Path:
    """The body of train_member: resume from config.run_dir, write to writes.run_dir (the same on the chief)."""
    done = saved_epoch(config.run_dir / "checkpoints")
    check_unfreeze_reachable(config, done)
    run = prepare_run(writes, log, done)
    params = parameter_counts(run.model)
    log(f"model: {config.model.backbone} ({config.model.weights} weights), trainable {params['trainable']:,} "
        f"parameters, frozen {params['frozen']:,}")
    state = (load_checkpoint(config.run_dir / "checkpoints", run.model, run.optimizer, log)
             or EpochState.fresh(run.policy, run.replicas))
    check_resumed_setup(state, run, log)
    if worker_count() > 1:
        check_workers_agree(run, config, state)
    run_dir, checkpoints = writes.run_dir, writes.run_dir / "checkpoints"
    best = config.run_dir / "checkpoints" / "best.weights.h5"
    if writes is not config and best.is_file():  # the best epoch so far, for the end (the chief writes only
        checkpoints.mkdir(parents=True, exist_ok=True)  # after the next collective step, so it is stable now)
        shutil.copyfile(best, checkpoints / "best.weights.h5")
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_schedule(run_dir / "schedule.png", config.schedule, config.train.epochs, run.replicas,
                  config.model.unfreeze_epoch)
    write_text_atomic(run_dir / "config.json", json.dumps(writes.to_dict(), indent=1) + "\n")
    stopped = None
    for epoch in range(state.epoch, config.train.epochs):
        if any_worker(run.strategy, budget.exhausted()):  # every worker stops together, or none does
            stopped = {"reason": "time_budget", "epochs_trained": epoch, "epochs": config.train.epochs,
                       "budget_minutes": config.train.time_budget_minutes}
            log(f"stopping after epoch {epoch} of {config.train.epochs}: another epoch and the final predictions "
                f"would not fit in train.time_budget_minutes={config.train.time_budget_minutes:g} (rerun to go on)")
            break
        start = time.monotonic()
        val_seconds = run_epoch(run, epoch, state, log)
        budget.record(time.monotonic() - start, val_seconds, run)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    if config.data.train_on_val:  # validation rows were trained on: no honest "best" epoch, keep the last
        log("trained on train+val: exporting the last epoch's weights")
    else:
        load_best_weights(run.model, checkpoints)
    params = parameter_counts(run.model)  # of the last phase, resumed or not
    facts = RunFacts(run.infos, run.classes, params, run.policy, run.replicas, run.steps * run.global_batch,
                     run.geometry, stopped, run.targets.facts if run.targets is not None else None)
    return finish_run(writes, run.model, facts, state.history, log)

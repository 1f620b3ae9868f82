"""Training configuration: TOML files plus `section.key=value` overrides, resolved into dataclasses.

Every option, its default and meaning is listed by `flower train --help`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import MEMBER_FILE
from core.errors import ConfigError
from core.members import FIT_MODES, read_json_file, read_member
from core.runtimes import parse_export_runtimes
from core.sections import section_from_dict
from imaging.augment_config import AugmentConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is batched."""

    dir: str = "demo/data"  # competition layout, local folder or gs:// path
    image_size: int = 64  # model input size; records of another size are resized in the pipeline
    file_size: int = 0  # record size to read (0: the smallest >= image_size, else the largest)
    batch_size: int = 32  # per replica; the global batch is this times the number of replicas
    train_on_val: bool = False  # final fit on train+val (validation scores then flatter)
    shuffle_buffer: int = 2048
    deterministic: bool = False  # same batches in the same order for a seed and epoch (slower input; exact resume)
    shard: str = "auto"  # several workers: auto (by file when every worker gets one, else by data) | file | data
    fit: str = "auto"  # photo to square at serve time: auto (from import_report.json) | crop | pad | stretch
    validation_from: str = ""  # with train_on_val: the run (on train only) whose val predictions stand in a blend


@dataclass(frozen=True)
class ModelConfig:
    """The network."""

    backbone: str = "small-cnn"  # see training.models.backbones.list_backbones()
    weights: str = "none"  # imagenet | noisy-student | none | a local weights file
    dropout: float = 0.2
    trainable: str = "all"  # all | head | last:N (backbone blocks); with unfreeze_epoch, the first phase
    unfreeze_epoch: int = 0  # train `trainable` for this many epochs, then `unfreeze` (0: never switch)
    unfreeze: str = "all"  # what trains from unfreeze_epoch on: all | last:N
    batch_norm: str = "train"  # train | frozen (backbone batch norm stays in inference mode even where it trains)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate per epoch."""

    kind: str = "rampup"  # rampup (ramp-up, sustain, exponential decay) | cosine | constant
    start: float = 1e-4  # rampup: LR of epoch 0
    max: float = 1e-3  # peak LR for a single replica; scaled by the number of replicas
    min: float = 1e-5  # floor of the decay
    rampup_epochs: int = 2
    sustain_epochs: int = 0
    decay: float = 0.8  # rampup: exponential decay factor per epoch after the sustain
    warmup_epochs: int = 1  # cosine: linear warm-up from `start` to `max`
    unfreeze_scale: float = 0.1  # LR multiplier from model.unfreeze_epoch on (fine-tune the backbone gently)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and fitting."""

    epochs: int = 8
    steps_per_epoch: int = 0  # 0: train images // global batch
    loss: str = "cce"  # cce (categorical cross-entropy) | focal
    label_smoothing: float = 0.1
    focal_gamma: float = 2.0
    class_weights: bool = False  # weight the loss by inverse class frequency
    weight_decay: float = 1e-4  # AdamW
    mixed_precision: str = "auto"  # auto (bf16: TPU, GPU >= 8.0; fp16: older GPU; CPU: none) | float16 | bfloat16 | off
    seed: int = 0
    eval_batch_size: int = 64
    steps_per_execution: int = 0  # training steps per host round trip; 0: auto (32 on a TPU, 1 elsewhere)
    time_budget_minutes: float = 0.0  # stop after the last epoch that fits, leaving time to predict and export
    cluster_timeout_seconds: float = 300.0  # several workers (TF_CONFIG): how long to wait for the others to be up


@dataclass(frozen=True)
class PredictConfig:
    """Predictions written after training."""

    tta: int = 1  # test-time augmentation passes; 1 = none
    tta_seed: int = 1


@dataclass(frozen=True)
class DistilConfig:
    """Distillation: a student trained on a teacher's probabilities (flower distil sets the teacher)."""

    teacher: str = ""  # teacher.npz (ids and the teacher's probabilities), written by flower distil; empty: labels
    temperature: float = 2.0  # soft targets p^(1/T), renormalised, against the student's softmax(logits / T); x T^2
    hard_weight: float = 0.0  # weight of the cross-entropy on the true labels of the training rows (soft: weight 1)
    pseudo_threshold: float = 0.0  # unlabeled: 0 all, soft; > 0 those whose top probability reaches it, as labels


@dataclass(frozen=True)
class ExportConfig:
    """What the export writes beside the SavedModel."""

    runtimes: str = "litert"  # the pixel model converted for faster runtimes: litert | onnx | litert,onnx | none


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    name: str = ""  # member name; empty: the run directory's folder name
    output: str = ""  # run directory; empty: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory this config writes."""
        return Path(self.output or f"runs/{self.name or 'member'}")

    @property
    def member_name(self) -> str:
        """The member's name: `name`, else the run directory's folder name (so runs blend without renaming)."""
        return self.name or self.run_dir.resolve().name

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain data."""
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "schedule": ScheduleConfig, "train": TrainConfig,
            "augment": AugmentConfig, "predict": PredictConfig, "distil": DistilConfig,
            "export": ExportConfig}


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or keys and wrong types name the culprit."""
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            top[key] = section_from_dict(SECTIONS[key], value, key)
        elif key in ("name", "output"):
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string, got {value!r} (quote text that looks like a number: "
                                  f"--set '{key}=\"{value}\"')")
            top[key] = value
        else:
            raise ConfigError(f"unknown option {key!r}; top-level keys: name, output, {', '.join(SECTIONS)}")
    config = RunConfig(**top)
    validate(config)
    return config


RANGES = {  # option: (lowest, highest), inclusive; None = unbounded
    "data.image_size": (8, 2048), "data.batch_size": (1, 65536), "data.file_size": (0, 8192),
    "data.shuffle_buffer": (1, 10_000_000), "train.epochs": (1, 100_000), "train.steps_per_epoch": (0, 10_000_000),
    "train.eval_batch_size": (1, 65536), "train.focal_gamma": (0.0, 10.0), "train.weight_decay": (0.0, 1.0),
    "predict.tta": (1, 64), "schedule.start": (0.0, 10.0), "schedule.max": (0.0, 10.0), "schedule.min": (0.0, 10.0),
    "schedule.rampup_epochs": (0, 100_000), "schedule.sustain_epochs": (0, 100_000),
    "schedule.warmup_epochs": (0, 100_000), "schedule.unfreeze_scale": (0.0, 10.0),
    "model.unfreeze_epoch": (0, 100_000), "train.steps_per_execution": (0, 100_000),
    "train.time_budget_minutes": (0.0, 1e6), "train.cluster_timeout_seconds": (0.0, 1e6),
    "augment.shift_reference_size": (1, 8192),
    "train.seed": (0, 2**31 - 1), "predict.tta_seed": (0, 2**31 - 1),
    "distil.temperature": (0.1, 100.0), "distil.hard_weight": (0.0, 100.0), "distil.pseudo_threshold": (0.0, 1.0),
}


def validate(config: RunConfig) -> None:
    """Cross-field and range checks with messages that name the option."""
    for dotted, (low, high) in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if not low <= value <= high:
            raise ConfigError(f"{dotted} must be between {low} and {high}, got {value!r}")
    if config.schedule.kind not in ("rampup", "cosine", "constant"):
        raise ConfigError(f"schedule.kind must be rampup, cosine or constant, got {config.schedule.kind!r}")
    if not 0 < config.schedule.decay <= 1:
        raise ConfigError(f"schedule.decay must be in (0, 1], got {config.schedule.decay!r}")
    if config.train.loss not in ("cce", "focal"):
        raise ConfigError(f"train.loss must be cce or focal, got {config.train.loss!r}")
    if config.train.mixed_precision not in ("auto", "float16", "bfloat16", "off"):
        raise ConfigError(f"train.mixed_precision must be auto, float16, bfloat16 or off, got "
                          f"{config.train.mixed_precision!r}")
    if not 0 <= config.model.dropout < 1 or not 0 <= config.train.label_smoothing < 1:
        raise ConfigError("model.dropout and train.label_smoothing must be in [0, 1)")
    _validate_trainable(config)
    if config.data.shard not in ("auto", "file", "data"):
        raise ConfigError(f"data.shard must be auto, file or data, got {config.data.shard!r}")
    if config.data.fit not in ("auto", *FIT_MODES):
        raise ConfigError(f"data.fit must be auto, {', '.join(FIT_MODES)}, got {config.data.fit!r}")
    if config.data.validation_from and not config.data.train_on_val:
        raise ConfigError("data.validation_from is for a refit on train+val: set data.train_on_val = true too")
    if "://" in config.output:
        raise ConfigError(f"output must be a local folder (or a mounted shared one), got {config.output!r}: "
                          "run directories are written with local file operations")
    if not config.data.dir.strip():
        raise ConfigError("data.dir must name the data folder")
    parse_export_runtimes(config.export.runtimes)
    _validate_distil(config)


def _validate_distil(config: RunConfig) -> None:
    """A student trains on soft targets of its training rows only: no validation rows, no loss that reads labels."""
    if not config.distil.teacher:
        return
    refused = [f"{option}={value!r}" for option, value, default in (
        ("data.train_on_val", config.data.train_on_val, False), ("train.loss", config.train.loss, "cce"),
        ("train.class_weights", config.train.class_weights, False)) if value != default]
    if refused:
        raise ConfigError(f"distillation (distil.teacher) trains on the teacher's probabilities of the training rows: "
                          f"{', '.join(refused)} does not apply (validation rows are never trained on)")


TRAINABLE = re.compile(r"all|head|last:[1-9]\d*")


def trainable_rank(trainable: str) -> float:
    """How much of the backbone a trainable setting trains: head 0 < last:N = N < all."""
    return 0 if trainable == "head" else math.inf if trainable == "all" else int(trainable.split(":")[1])


def _validate_trainable(config: RunConfig) -> None:
    """model.trainable / unfreeze / unfreeze_epoch name a valid two-phase fine-tuning schedule."""
    m = config.model
    if not TRAINABLE.fullmatch(m.trainable):
        raise ConfigError(f"model.trainable must be all, head or last:N (N >= 1), got {m.trainable!r}")
    if not TRAINABLE.fullmatch(m.unfreeze) or m.unfreeze == "head":
        raise ConfigError(f"model.unfreeze must be all or last:N (N >= 1), got {m.unfreeze!r}")
    if m.unfreeze_epoch and trainable_rank(m.unfreeze) <= trainable_rank(m.trainable):
        raise ConfigError(f"model.unfreeze={m.unfreeze!r} must train more than model.trainable={m.trainable!r} "
                          "(the second phase unfreezes more of the backbone)")
    if m.batch_norm not in ("train", "frozen"):
        raise ConfigError(f"model.batch_norm must be train or frozen, got {m.batch_norm!r}")
    if config.schedule.unfreeze_scale <= 0:
        raise ConfigError(f"schedule.unfreeze_scale must be > 0, got {config.schedule.unfreeze_scale!r}")


def check_unfreeze_reachable(config: RunConfig, epochs_done: int) -> None:
    """Refuse a run that would stop before its unfreeze (unless it is already past it: a shortened resume)."""
    switch = config.model.unfreeze_epoch
    if switch and epochs_done < switch and switch >= config.train.epochs:
        raise ConfigError(f"model.unfreeze_epoch={switch} but train.epochs={config.train.epochs}: the backbone would "
                          "never be unfrozen (unfreeze_epoch counts the epochs before the switch)")


def trainable_at(config: RunConfig, epoch: int) -> str:
    """What trains in a 0-based epoch: model.trainable, or model.unfreeze from unfreeze_epoch on."""
    switch = config.model.unfreeze_epoch
    return config.model.unfreeze if switch and epoch >= switch else config.model.trainable


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults) and apply `section.key` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return config_from_dict(with_overrides(values, overrides or {}))


def with_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply `section.key` overrides to nested config values (in place; returned for convenience)."""
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            values[section] = value
        elif not isinstance(values.setdefault(section, {}), dict):
            raise ConfigError(f"{dotted}: {section!r} is a single value here, not a section with options")
        else:
            values[section][key] = value
    return values


def refit_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config of a refit: run_dir's config on train+val for its best epoch count (by validation macro F1).

    The refit writes to `<run_dir>-refit` and names run_dir as the run whose validation predictions
    stand for it in a blend (`data.validation_from`); `overrides` apply on top.
    """
    run_dir = Path(run_dir)
    files = {name: run_dir / name for name in ("config.json", "history.csv", MEMBER_FILE)}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ConfigError(f"--refit-of needs a finished run directory; missing {', '.join(missing)}")
    values = read_json_file(files["config.json"])
    if not isinstance(values, dict) or not all(isinstance(values.get(k), dict) for k in ("data", "train", "model")):
        raise ConfigError(f"{files['config.json']} is not a run's config (no data, train and model sections)")
    if values["data"].get("train_on_val"):
        raise ConfigError(f"{run_dir} was trained on train+val: refit a run trained on train only")
    epochs = best_epoch(files["history.csv"])
    name = read_member(run_dir).name
    values.update(name=f"{name}-refit", output=str(run_dir.parent / f"{run_dir.name}-refit"))
    values["data"].update(train_on_val=True, validation_from=str(run_dir))
    values["train"]["epochs"] = epochs
    if values["model"].get("unfreeze_epoch", 0) >= epochs:  # the best epoch came before the unfreeze
        values["model"]["unfreeze_epoch"] = 0
    return config_from_dict(with_overrides(values, overrides or {}))


def best_epoch(history: Path) -> int:
    """The epoch of history.csv with the best validation macro F1 (the first of equals; epochs without a finite F1
    never count); ConfigError naming the file when it holds none."""
    try:
        with history.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{history} is not a history.csv this toolkit wrote ({err})") from None
    scored = []
    for row in rows:
        try:
            f1, epoch = float(row.get("val_macro_f1") or "nan"), int(row.get("epoch") or "")
        except ValueError:
            continue
        if math.isfinite(f1):
            scored.append((f1, -epoch, epoch))
    if not scored:
        raise ConfigError(f"{history} holds no epoch with a validation macro F1: refit a run that finished an epoch")
    return max(scored)[2]


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in a dataclass's source: the option's explanation."""
    import inspect

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def describe_options() -> str:
    """Every option with its default and meaning, for --help."""
    lines = ["options (TOML sections, or --set section.key=value):",
             "  name = ''    member name (default: the run directory's folder name)",
             "  output = ''    run directory (default runs/<name>, or runs/member without a name)"]
    for section, cls in SECTIONS.items():
        lines.append(f"  [{section}]  {cls.__doc__.splitlines()[0]}")
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            note = comments.get(f.name, "")
            lines.append(f"    {f.name} = {default!r}" + (f"    {note}" if note else ""))
    return "\n".join(lines)

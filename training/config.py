"""Training configuration: TOML files plus `section.key=value` overrides, resolved into dataclasses.

Every option, its default and meaning is listed by `python -m training.train --help`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.augment import AugmentConfig

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


@dataclass(frozen=True)
class ModelConfig:
    """The network."""

    backbone: str = "small-cnn"  # see training.backbones.list_backbones()
    weights: str = "none"  # imagenet | noisy-student | none | a local weights file
    dropout: float = 0.2
    trainable: str = "all"  # all | head | last:N (backbone blocks)


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
    mixed_precision: str = "auto"  # auto (bfloat16 on TPU, never on CPU) | float16 | bfloat16 | off
    seed: int = 0
    eval_batch_size: int = 64


@dataclass(frozen=True)
class PredictConfig:
    """Predictions written after training."""

    tta: int = 1  # test-time augmentation passes; 1 = none
    tta_seed: int = 1


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    name: str = "member"
    output: str = ""  # run directory; empty: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory this config writes."""
        return Path(self.output or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain data."""
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "schedule": ScheduleConfig, "train": TrainConfig,
            "augment": AugmentConfig, "predict": PredictConfig}


def _coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check a value against the dataclass field's type (ints are accepted for floats)."""
    expected = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    names = {"int": int, "float": (int, float), "str": str, "bool": bool}
    kind = names.get(str(expected))
    if kind is None:
        return value
    if isinstance(value, bool) and str(expected) != "bool" or not isinstance(value, kind):
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    return float(value) if str(expected) == "float" else value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or keys and wrong types name the culprit."""
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"[{key}] must be a table")
            cls = SECTIONS[key]
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown option(s) {[f'{key}.{u}' for u in unknown]}; [{key}] knows {sorted(known)}")
            if cls is AugmentConfig:
                top[key] = AugmentConfig.from_dict(value)
            else:
                top[key] = cls(**{k: _coerce(cls, k, v, f"{key}.{k}") for k, v in value.items()})
        elif key in ("name", "output"):
            if not isinstance(value, str):
                raise ValueError(f"{key}: expected a string, got {value!r}")
            top[key] = value
        else:
            raise ValueError(f"unknown option {key!r}; top-level keys: name, output, {', '.join(SECTIONS)}")
    config = RunConfig(**top)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Cross-field checks with messages that name the option."""
    if config.data.image_size < 8 or config.data.batch_size < 1:
        raise ValueError("data.image_size must be >= 8 and data.batch_size >= 1")
    if config.schedule.kind not in ("rampup", "cosine", "constant"):
        raise ValueError(f"schedule.kind must be rampup, cosine or constant, got {config.schedule.kind!r}")
    if config.train.loss not in ("cce", "focal"):
        raise ValueError(f"train.loss must be cce or focal, got {config.train.loss!r}")
    if config.train.mixed_precision not in ("auto", "float16", "bfloat16", "off"):
        raise ValueError(f"train.mixed_precision must be auto, float16, bfloat16 or off, got "
                         f"{config.train.mixed_precision!r}")
    if config.train.epochs < 1 or config.predict.tta < 1:
        raise ValueError("train.epochs and predict.tta must be >= 1")
    if not 0 <= config.model.dropout < 1 or not 0 <= config.train.label_smoothing < 1:
        raise ValueError("model.dropout and train.label_smoothing must be in [0, 1)")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults) and apply `section.key` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if key:
            values.setdefault(section, {})[key] = value
        else:
            values[section] = value
    return config_from_dict(values)


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in a dataclass's source: the option's explanation."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def describe_options() -> str:
    """Every option with its default and meaning, for --help."""
    lines = ["options (TOML sections, or --set section.key=value):",
             f"  name = {RunConfig().name!r}    run name", "  output = ''    run directory (default runs/<name>)"]
    for section, cls in SECTIONS.items():
        lines.append(f"  [{section}]  {cls.__doc__.splitlines()[0]}")
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            note = comments.get(f.name, "")
            lines.append(f"    {f.name} = {default!r}" + (f"    {note}" if note else ""))
    return "\n".join(lines)

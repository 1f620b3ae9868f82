"""List run directories side by side, to see what each choice (size, backbone, trainable parameters,
augmentation, regularisation, schedule) did to validation macro F1.

    flower compare runs/* [--sort f1] [--markdown]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core.errors import DataError, FlowerError
from core.members import is_run_directory, read_json_file, read_member
from core.names import table_cell
from training.fit.checkpoints import EpochState, latest_checkpoint

COLUMNS = ("run", "backbone", "size", "weights", "trainable", "augmentation", "regularisation", "schedule",
           "epochs", "val_macro_f1", "s/epoch")


def augmentation_summary(augment: dict) -> str:
    """A short description of the augmentation settings of a run."""
    if not augment.get("enabled", True):
        return "off"
    parts = []
    if augment.get("flip_left_right"):
        parts.append("flip")
    for key, short in (("rotation", "rot"), ("shear", "shear"), ("zoom", "zoom"), ("shift", "shift"),
                       ("brightness", "bright"), ("hue", "hue"), ("erase_prob", "erase"), ("cutmix_prob", "cutmix"),
                       ("mixup_prob", "mixup")):
        if augment.get(key):
            parts.append(f"{short}{augment[key]:g}")
    return " ".join(parts) or "none"


def run_row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory's member.json (finished runs) or checkpoint state (running ones); a
    member.json, config.json or state.json that is not what a run writes is a DataError naming the run and the
    field. What only some runs have (timings, parameter counts, an F1) shows as '-' when absent."""
    try:
        return _row(run_dir)
    except FlowerError:
        raise
    except (TypeError, AttributeError, ValueError) as err:  # a field of the wrong type, or a file that is no JSON
        raise DataError(f"{run_dir}: not a run directory's files ({type(err).__name__}: {err})") from None


def _field(document: dict, path: str, where: str, prefix: str = "") -> Any:
    """document["a"]["b"] for path "a.b"; a DataError naming the file and the field (as `prefix` + path) when it
    is not there."""
    value: Any = document
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{where} has no '{prefix}{path}' (not a run directory's files, or of another version)")
        value = value[key]
    return value


def _optional(document: dict, path: str) -> Any:
    """document["a"]["b"] for path "a.b", None when it is not there."""
    value: Any = document
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _finite(value: Any) -> float | None:
    """A number that is finite, else None (absent, null, NaN, infinite, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _row(run_dir: Path) -> dict[str, str]:
    """run_row's work, any malformed field raising as it is met."""
    if is_run_directory(run_dir):
        member = read_member(run_dir)
        where, prefix = str(member.path), "config."
        config = _field(member.document, "config", where)
        f1 = member.val_macro_f1
        seconds = _finite(_optional(member.document, "timings.seconds_per_epoch"))
        trainable = _optional(member.document, "parameters.trainable")
        epochs = str(_field(config, "train.epochs", where, prefix))
    else:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise DataError(f"{run_dir} is not a run directory (no member.json or checkpoints/epoch-NNNN/state.json)")
        if not (run_dir / "config.json").is_file():
            raise DataError(f"{run_dir} is still running and has no config.json")
        config = read_json_file(run_dir / "config.json")
        where, prefix = str(run_dir / "config.json"), ""
        state = EpochState.read(checkpoint / "state.json")
        f1, trainable = (state.best_f1 if state.best_f1 >= 0 else None), None
        seconds = sum(h["seconds"] for h in state.history) / max(len(state.history), 1)
        epochs = f"{state.epoch}/{_field(config, 'train.epochs', where)}"
    f1 = _finite(f1)
    return _cells(run_dir.name, config, where, prefix) | {
        "trainable": f"{trainable:,}" if _whole(trainable) else str(_field(config, "model.trainable", where, prefix)),
        "epochs": epochs, "val_macro_f1": f"{f1:.4f}" if f1 is not None else "-",
        "s/epoch": f"{seconds:.1f}" if seconds else "-",
    }


def _cells(name: str, config: Any, where: str, prefix: str) -> dict[str, str]:
    """The columns a run's config gives."""
    def get(path: str) -> Any:
        return _field(config, path, where, prefix)

    return {
        "run": name, "backbone": get("model.backbone"), "size": str(get("data.image_size")),
        "weights": get("model.weights"), "augmentation": augmentation_summary(get("augment")),
        "regularisation": f"drop {get('model.dropout'):g} ls {get('train.label_smoothing'):g} "
                          f"wd {get('train.weight_decay'):g}",
        "schedule": f"{get('schedule.kind')} max {get('schedule.max'):g}",
    }


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def by_f1(row: dict[str, str]) -> tuple[bool, float, str]:
    """The sort key of --sort f1: best F1 first, runs without one ('-', NaN in the file) last, then by name."""
    f1 = float(row["val_macro_f1"]) if row["val_macro_f1"] != "-" else math.nan
    return (math.isnan(f1), -f1 if not math.isnan(f1) else 0.0, row["run"])


def format_table(rows: list[dict[str, str]], markdown: bool) -> str:
    """Aligned plain text or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(table_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)

"""List run directories side by side, to see what each choice (size, backbone, trainable parameters,
augmentation, regularisation, schedule) did to validation macro F1.

    flower compare runs/* [--sort f1] [--markdown]
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import DataError
from core.members import is_run_directory, read_member
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
    member.json, config.json or state.json that is not what a run writes is a DataError naming the run."""
    try:
        return _row(run_dir)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:  # a damaged or foreign file
        raise DataError(f"{run_dir}: not a run directory's files ({type(err).__name__}: {err})") from None


def _row(run_dir: Path) -> dict[str, str]:
    """run_row's work, any malformed field raising as it is met."""
    if is_run_directory(run_dir):
        member = read_member(run_dir).document
        config = member["config"]
        f1 = member["metrics"]["val_macro_f1"]
        seconds = member["timings"]["seconds_per_epoch"]
        trainable = member["parameters"]["trainable"]
        epochs = str(config["train"]["epochs"])
    else:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise DataError(f"{run_dir} is not a run directory (no member.json or checkpoints/epoch-NNNN/state.json)")
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else None
        state = EpochState.read(checkpoint / "state.json")
        if config is None:
            raise DataError(f"{run_dir} is still running and has no config.json")
        f1, trainable = state.best_f1, None
        seconds = sum(h["seconds"] for h in state.history) / max(len(state.history), 1)
        epochs = f"{state.epoch}/{config['train']['epochs']}"
    model, schedule, train = config["model"], config["schedule"], config["train"]
    return {
        "run": run_dir.name, "backbone": model["backbone"], "size": str(config["data"]["image_size"]),
        "weights": model["weights"], "trainable": f"{trainable:,}" if trainable is not None else model["trainable"],
        "augmentation": augmentation_summary(config["augment"]),
        "regularisation": f"drop {model['dropout']:g} ls {train['label_smoothing']:g} wd {train['weight_decay']:g}",
        "schedule": f"{schedule['kind']} max {schedule['max']:g}", "epochs": epochs,
        "val_macro_f1": f"{f1:.4f}", "s/epoch": f"{seconds:.1f}" if seconds else "-",
    }


def format_table(rows: list[dict[str, str]], markdown: bool) -> str:
    """Aligned plain text or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
        return "\n".join(lines)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)

"""What a finished run writes besides its checkpoints: history, curves, predictions, SavedModel, member.json."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from core.contract import CLASSES_FILE, SAVED_MODEL_DIR
from core.files import write_atomic, write_text_atomic
from core.members import write_member
from core.runtimes import parse_export_runtimes
from training.config import RunConfig
from training.data.dataset import SplitInfo
from training.fit.evaluation import classification_scores
from training.fit.export import export_saved_model, folder_bytes, predict_split, weights_bytes, write_predictions
from training.fit.runtimes import export_runtimes

Log = Callable[[str], None]
HISTORY_FIELDS = ("epoch", "learning_rate", "loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds")


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


@dataclass(frozen=True)
class RunFacts:
    """What a finished run reports about its data, model and machine."""

    infos: dict[str, SplitInfo]
    classes: list[str]
    params: dict[str, int]
    policy: str
    replicas: int
    images_per_epoch: int
    geometry: dict[str, str]  # member.json "geometry": how a photo becomes the model's square (imaging.geometry)
    stopped: dict | None = None  # why training ended before train.epochs (the time budget), else None
    teacher: dict | None = None  # a distilled student's teacher (training.data.soft_targets), else None


def member_document(config: RunConfig, facts: RunFacts, final: dict[str, float], history: list[dict],
                    saved_model: dict[str, int]) -> dict:
    """The content of member.json."""
    seconds_per_epoch = float(np.mean([h["seconds"] for h in history]))
    return {
        "version": 1, "name": config.member_name, "backbone": config.model.backbone, "weights": config.model.weights,
        "image_size": config.data.image_size, "num_classes": len(facts.classes), "parameters": facts.params,
        "precision": facts.policy, "replicas": facts.replicas, "config": config.to_dict(),
        "data": {"dir": config.data.dir, "file_size": facts.infos["train"].file_size,
                 "counts": {s: i.count for s, i in facts.infos.items()}},
        "versions": versions(),
        "metrics": {"val_accuracy": final["accuracy"], "val_macro_f1": final["macro_f1"], "val_loss": final["loss"],
                    "tta": config.predict.tta},
        "timings": {"seconds_per_epoch": seconds_per_epoch,
                    "images_per_second": facts.images_per_epoch / seconds_per_epoch},
        SAVED_MODEL_DIR: saved_model,
        "epochs_trained": len(history),
        "validation_from": (os.path.relpath(Path(config.data.validation_from).resolve(), config.run_dir.resolve())
                            if config.data.validation_from else None),
        "stopped": facts.stopped,
        "geometry": facts.geometry,
        "teacher": teacher_record(config.run_dir, facts.teacher),
    }


def teacher_record(run_dir: Path, teacher: dict | None) -> dict | None:
    """member.json "teacher": the teacher's facts with its path and the teacher file's relative to the run directory."""
    if teacher is None:
        return None
    here = run_dir.resolve()
    return {**teacher, "path": os.path.relpath(Path(teacher["path"]).resolve(), here),
            "file": os.path.relpath(Path(teacher["file"]).resolve(), here)}


def finish_run(config: RunConfig, model: keras.Model, facts: RunFacts, history: list[dict], log: Log = print) -> Path:
    """Predict val/test (with TTA), export the SavedModel (and its `export.runtimes` conversions), write classes.json
    and member.json."""
    run_dir, size, p = config.run_dir, config.data.image_size, config.predict
    infos, classes = facts.infos, facts.classes
    log(f"predicting validation and test rows (TTA {p.tta} pass{'es' if p.tta > 1 else ''})")
    val_ids, val_labels, val_probs = predict_split(model, infos["val"], size, config.train.eval_batch_size,
                                                   p.tta, p.tta_seed, len(classes))
    test_ids, _, test_probs = predict_split(model, infos["test"], size, config.train.eval_batch_size, p.tta,
                                            p.tta_seed, len(classes))
    write_predictions(run_dir / "predictions" / "val.npz", val_ids, val_probs, val_labels)
    write_predictions(run_dir / "predictions" / "test.npz", test_ids, test_probs)
    export_saved_model(model, size, run_dir / SAVED_MODEL_DIR, facts.geometry["fit"], infos["train"].file_size)
    write_text_atomic(run_dir / CLASSES_FILE, json.dumps(classes, indent=1) + "\n")
    final = classification_scores(val_labels, val_probs)
    saved_model = {"bytes": folder_bytes(run_dir / SAVED_MODEL_DIR), "weights_bytes": weights_bytes(model)}
    member = member_document(config, facts, final, history, saved_model)
    write_member(run_dir, member)
    export_runtimes(run_dir, parse_export_runtimes(config.export.runtimes), log)  # the run is complete without them
    log(f"done: validation macro F1 {final['macro_f1']:.4f}, accuracy {final['accuracy']:.4f}; wrote {run_dir}")
    return run_dir

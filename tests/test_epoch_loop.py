"""One epoch of the training loop in this process (tests/test_training.py trains in subprocesses, which mutation
testing cannot attribute): what an epoch writes, scores and logs, and how a non-finite loss stops it."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from training.checkpoints import latest_checkpoint
from training.config import load_config
from training.evaluation import classification_scores
from training.export import predict_split
from training.fit import Budget, prepare_run, run_epoch
from training.schedules import learning_rate


def _config(tiny_data, out, **settings):
    """The small CNN at 32 px on the tiny demo data, two epochs."""
    return load_config(None, {"data.dir": str(tiny_data), "output": str(out), "name": "tiny", "data.image_size": 32,
                              "data.batch_size": 16, "train.epochs": 2, "train.eval_batch_size": 32,
                              "predict.tta": 1, "data.deterministic": True, **settings})


def test_an_epoch_trains_scores_the_whole_validation_split_checkpoints_and_logs(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "run", **{"schedule.warmup_epochs": 1})
    lines: list[str] = []
    run = prepare_run(config, lines.append)
    state = {"epoch": 0, "best_f1": -1.0, "history": []}
    before = [w.numpy().copy() for w in run.model.trainable_weights]
    val_seconds = run_epoch(run, 0, state, lines.append)
    assert val_seconds > 0
    assert any(np.abs(a - b.numpy()).max() > 0 for a, b in zip(before, run.model.trainable_weights, strict=True))
    row = state["history"][0]
    lr = learning_rate(config.schedule, 0, 2, run.replicas, config.model.unfreeze_epoch)
    assert row["epoch"] == 1 and row["learning_rate"] == lr and np.isfinite(row["loss"]) and row["seconds"] > 0
    assert float(run.optimizer.learning_rate.numpy()) == pytest.approx(lr)
    _, labels, probs = predict_split(run.model, run.infos["val"], 32, 32, num_classes=len(run.classes))
    assert len(labels) == run.infos["val"].count  # the whole split, not a sample
    scores = classification_scores(labels, probs)
    assert row["val_macro_f1"] == pytest.approx(scores["macro_f1"]) and row["val_loss"] == pytest.approx(scores["loss"])
    assert row["val_accuracy"] == pytest.approx(scores["accuracy"])
    assert state["epoch"] == 1 and state["best_f1"] == row["val_macro_f1"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "epoch-0001"
    assert json.loads((checkpoints / "epoch-0001" / "state.json").read_text()) == json.loads(json.dumps(state))
    assert json.loads((checkpoints / "epoch-0001" / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict()))
    assert (checkpoints / "best.weights.h5").is_file()
    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["val_macro_f1"]) == pytest.approx(row["val_macro_f1"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    epoch_line = next(line for line in lines if line.startswith("epoch 1/2: "))
    assert f"lr {lr:.2e} loss {row['loss']:.4f} " in epoch_line and "(best)" in epoch_line
    assert f"val_macro_f1 {row['val_macro_f1']:.4f}" in epoch_line and epoch_line.endswith(" img/s]")
    # A second epoch that does not beat the best keeps the best weights file as it was.
    best = (checkpoints / "best.weights.h5").read_bytes()
    state["best_f1"] = 2.0  # nothing can beat it
    run_epoch(run, 1, state, lines.append)
    assert state["epoch"] == 2 and len(state["history"]) == 2 and state["best_f1"] == 2.0
    assert (checkpoints / "best.weights.h5").read_bytes() == best
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.weights.h5", "epoch-0002"]
    assert "(best)" not in next(line for line in lines if line.startswith("epoch 2/2: "))


def test_a_non_finite_loss_stops_before_the_epoch_is_saved_and_says_what_to_change(tiny_data, tmp_path):
    run = prepare_run(_config(tiny_data, tmp_path / "run"), lambda _: None)
    run.model.fit = lambda *args, **kwargs: SimpleNamespace(history={"loss": [float("nan")]})
    state = {"epoch": 0, "best_f1": -1.0, "history": []}
    with pytest.raises(ValueError) as stopped:
        run_epoch(run, 0, state, lambda _: None)
    assert str(stopped.value) == ("epoch 1: the training loss is nan: stopping before this epoch is saved (the "
                                  "checkpoint of epoch 0 stands); lower schedule.max (now 0.001) or make the augment "
                                  "options milder, then rerun")
    assert state == {"epoch": 0, "best_f1": -1.0, "history": []}
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_time_budget_reserves_the_longest_epoch_and_the_final_predictions(monkeypatch):
    import training.fit as fit

    now = {"t": 1000.0}
    monkeypatch.setattr(fit.time, "monotonic", lambda: now["t"])
    infos = {"val": SimpleNamespace(count=20), "test": SimpleNamespace(count=30)}
    run = SimpleNamespace(infos=infos, config=SimpleNamespace(predict=SimpleNamespace(tta=2)))
    budget = Budget(600.0, started=now["t"])
    assert not budget.exhausted()  # nothing measured yet
    budget.record(100.0, 10.0, run)
    budget.record(150.0, 10.0, run)
    assert budget.finish == 10.0 * 2 * (1 + 30 / 20) + 30.0  # val and test, each pass, plus the export
    now["t"] += 600.0 - 150.0 - 80.0 - 0.5  # elapsed + the longest epoch + the finish: just inside 600 s
    assert not budget.exhausted()
    now["t"] += 1.0
    assert budget.exhausted()
    assert not Budget(0.0, epochs=[1e9]).exhausted()  # no budget: never exhausted


def _progress_lines(monkeypatch, steps: int, calls: list[int], logs=None) -> list[str]:
    """What StepProgress prints for epoch 3 of 5 (batch 8) when Keras reports after the given 0-based steps,
    each half a second after the last."""
    import training.fit as fit

    now = {"t": 50.0}
    monkeypatch.setattr(fit.time, "perf_counter", lambda: now["t"])
    lines: list[str] = []
    progress = fit.StepProgress(2, 5, steps, 8, lines.append)
    progress.on_epoch_begin(2)
    for i, batch in enumerate(calls):
        now["t"] = 50.0 + 0.5 * (i + 1)
        progress.on_train_batch_end(batch, {"loss": 1.0 / (batch + 1)} if logs is None else logs)
    return lines


def test_progress_is_printed_about_ten_times_an_epoch_with_its_running_loss_and_rate(monkeypatch):
    lines = _progress_lines(monkeypatch, 25, list(range(25)))  # every 2nd step, and the last
    steps = [*range(2, 25, 2), 25]
    assert lines == [f"  epoch 3/5 step {s}/25 loss {1.0 / s:.4f} ({s * 8 / (0.5 * s):.0f} img/s)" for s in steps]
    assert _progress_lines(monkeypatch, 3, [0, 1, 2])[0] == "  epoch 3/5 step 1/3 loss 1.0000 (16 img/s)"
    assert len(_progress_lines(monkeypatch, 3, [0, 1, 2])) == 3  # fewer than ten steps: every step
    # With steps_per_execution 4 Keras reports every 4th step: a line whenever a tenth of the epoch was crossed.
    lines = _progress_lines(monkeypatch, 100, [*range(3, 100, 4)])
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [12, 20, 32, 40, 52, 60, 72, 80, 92, 100]
    assert _progress_lines(monkeypatch, 1, [0], logs={}) == ["  epoch 3/5 step 1/1 loss nan (16 img/s)"]
